"""What each JSON file of a run holds, checked before any of it is used.

A run's ``config.json``, the rows of its ``metrics.jsonl`` and the record inside each checkpoint
are read by every command that reads a run. A file of the wrong shape (hand-edited, truncated
into another valid JSON value, written by another program) is a ``SchemaError``: one line that
names the file, the field, what it must hold and what it holds. Nothing here reads or writes a
file: callers pass what they decoded and where it came from.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

from jax_mnist.errors import ConfigError, JaxMnistError
from jax_mnist.recipes import Recipe


class SchemaError(JaxMnistError, ValueError):
    """A run file that decodes but does not hold what jax-mnist writes there."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# kind -> (test, what it is called in a message)
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "text": (lambda v: isinstance(v, str), "text"),
    "whole": (_is_int, "a whole number"),
    "count": (lambda v: _is_int(v) and v >= 1, "a whole number >= 1"),
    "number": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}

# field -> (kind, required). Fields written by later versions are optional, so older runs read.
CONFIG = {
    "recipe": ("object", True),
    "seed": ("whole", True),
    "train_examples": ("count", True),
    "versions": ("object", False),
    "code": ("object", False),
    "device": ("object", False),
    "best_checkpoint": ("text", False),
    "validation_split": ("object", False),
    "teacher": ("object", False),
}
METRICS_ROW = {
    "epoch": ("count", True),
    "lr": ("number", True),
    "train_loss": ("number", True),
    "train_accuracy": ("number", True),
    "epoch_seconds": ("number", True),
}
# A row is scored on the test set, or on a screening run's validation split: one of the two pairs.
SCORED = (("test_loss", "test_accuracy"), ("val_loss", "val_accuracy"))
RECORD = {
    "format": ("whole", False),
    "epoch": ("count", False),
    "step": ("whole", True),
    "history": ("list", True),
    "digests": ("object", True),
    "versions": ("object", False),
}


def _found(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def check_fields(where: str, value: Any, fields: dict[str, tuple[str, bool]], prefix: str = "") -> dict:
    """``value`` if it is an object whose ``fields`` have their kinds, else SchemaError naming the
    field. ``where``: the file (and line) it came from; fields not listed are left alone."""
    if not isinstance(value, dict):
        what = f"field {prefix.rstrip('.')!r}" if prefix else "its content"
        raise SchemaError(f"{where}: {what} must be an object, found {_found(value)}")
    for name, (kind, required) in fields.items():
        if name not in value:
            if required:
                raise SchemaError(f"{where}: field {prefix + name!r} is missing")
            continue
        test, said = _KINDS[kind]
        if not test(value[name]):
            raise SchemaError(f"{where}: field {prefix + name!r} must be {said}, found {_found(value[name])}")
    return value


def check_recipe(where: str, value: Any) -> Recipe:
    """The ``recipe`` object of a config as a Recipe (fields added later take their defaults)."""
    if not isinstance(value, dict):
        raise SchemaError(f"{where}: field 'recipe' must be an object, found {_found(value)}")
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise SchemaError(f"{where}: field 'recipe' holds fields this version does not know: {unknown}")
    for name in ("name", "model"):
        if name not in value:
            raise SchemaError(f"{where}: field 'recipe.{name}' is missing")
    try:
        return Recipe(**value)
    except ConfigError as e:
        raise SchemaError(f"{where}: field 'recipe': {e}") from None


def check_config(where: str, value: Any) -> dict:
    """A run's ``config.json``, checked: its fields and its recipe."""
    check_fields(where, value, CONFIG)
    check_recipe(where, value["recipe"])
    return value


def check_metrics_row(where: str, row: Any) -> dict:
    """One epoch row (of ``metrics.jsonl`` or a checkpoint's history), checked."""
    check_fields(where, row, METRICS_ROW)
    scored = [pair for pair in SCORED if any(name in row for name in pair)]
    if not scored:
        raise SchemaError(f"{where}: field 'test_accuracy' (or 'val_accuracy') is missing")
    for pair in scored:
        check_fields(where, row, {name: ("number", True) for name in pair})
    return row


def check_record(where: str, record: Any) -> dict:
    """The JSON record of a checkpoint: its step, its digests and the history it commits."""
    check_fields(where, record, RECORD)
    for name, digest in record["digests"].items():
        if not isinstance(digest, str):
            raise SchemaError(f"{where}: field 'digests.{name}' must be text, found {_found(digest)}")
    for number, row in enumerate(record["history"]):
        check_metrics_row(f"{where}, history[{number}]", row)
    return record


__all__ = ["SchemaError", "check_config", "check_fields", "check_metrics_row", "check_record", "check_recipe"]
