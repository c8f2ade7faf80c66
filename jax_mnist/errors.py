"""The one base class of errors caused by the user's input or environment.

``jax-mnist`` prints these as one line and exits 2; anything else is a bug and keeps its
traceback. Subclasses also derive from ``ValueError`` where the input was a bad value, so
library callers can catch either.
"""

from __future__ import annotations


class JaxMnistError(Exception):
    """A bad argument, file or directory: the message names it and says what was expected."""


class ConfigError(JaxMnistError, ValueError):
    """A recipe, model name or option with a value outside what it accepts."""


class CheckpointError(JaxMnistError, ValueError):
    """A checkpoint or state_dict that does not fit what it is loaded into."""
