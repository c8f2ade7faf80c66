"""Several processes (hosts) of one run, on JAX's own multi-controller runtime (``jax.distributed``).

Every process runs the same program on the global device mesh (``engine.Programs``): the seed axis
is split over the devices of all processes (no gradient traffic between hosts), or, with fewer
seeds than devices, every batch is (XLA inserts the reductions). Process 0 is the main process:
it alone reads and writes run directories and prints. The others get what it read (plans, the
states of resumed runs, its errors) by broadcast from it, and every process gets each epoch's
metrics by all-gather. With one process every function here is the plain single-process path.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jax_mnist.errors import JaxMnistError


class HostsError(JaxMnistError):
    """A multi-process run that cannot start or go on: what happened, and what to do."""


# The variables a launcher sets for every process (one process per host, or per accelerator group).
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)
# Seconds without a heartbeat after which the coordination service declares a process dead.
HEARTBEAT_TIMEOUT_SECONDS = 30


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise HostsError(f"environment variable {name} must be a whole number, found {text!r}") from None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS,
) -> bool:
    """Join a multi-process run when one is asked for (flags, else the ``JAX_*`` environment
    variables above); returns whether it did. Must run before anything touches a JAX device."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is None and num_processes is None and process_id is None:
        return False
    if coordinator is None or ":" not in coordinator:
        raise HostsError(
            f"a multi-process run needs the coordinator as HOST:PORT (--coordinator or {ENV_COORDINATOR}), "
            f"found {coordinator!r}"
        )
    if num_processes is not None and num_processes < 1:
        raise HostsError(f"--num-processes must be at least 1, found {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise HostsError(f"--process-id must be from 0 to {num_processes - 1}, found {process_id}")
    # CPU devices of different processes talk through gloo (XLA's default CPU collectives are
    # in-process only); GPUs and TPUs use their own. Harmless off CPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds
        )
    except Exception as e:  # noqa: BLE001  (jaxlib raises its own runtime errors)
        raise HostsError(
            f"cannot join the run at {coordinator} as process {process_id} of {num_processes}: "
            f"{str(e).splitlines()[0][:300]}"
        ) from None
    global _joined
    _joined = True
    return True


_joined = False


def joined() -> bool:
    """Whether this process joined a multi-process run (``initialize``)."""
    return _joined


def count() -> int:
    return jax.process_count()


def index() -> int:
    return jax.process_index()


def is_main() -> bool:
    return jax.process_index() == 0


def describe() -> str:
    """e.g. "process 1 of 2" (for messages)."""
    return f"process {jax.process_index()} of {jax.process_count()}"


def to_host(tree: Any) -> Any:
    """Every leaf as a numpy array of its global value. A leaf split over processes is
    all-gathered (a collective: every process must call this at the same point)."""
    if count() == 1:
        return jax.device_get(tree)

    def leaf(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(leaf, tree)


def put(tree: Any, sharding) -> Any:
    """Host (or local) arrays, the same on every process, placed as global arrays with ``sharding``."""
    if count() == 1:
        return jax.device_put(tree, sharding)

    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys travel as their raw data
            data = put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(leaf, tree)


def broadcast(tree: Any) -> Any:
    """The main process's numpy arrays, on every process (the others pass arrays of the same shapes)."""
    if count() == 1:
        return tree

    return jax.tree_util.tree_map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def broadcast_json(value: Any = None) -> Any:
    """The main process's JSON-able ``value``, on every process (the others' ``value`` is ignored)."""
    if count() == 1:
        return value
    payload = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
    size = int(broadcast(np.asarray(payload.size, np.int64)))
    buffer = payload if is_main() else np.zeros(size, np.uint8)
    return json.loads(broadcast(buffer).tobytes().decode())


def from_main(read: Callable[[], Any], share: Callable[[Any], Any] = lambda value: value) -> Any:
    """``read()`` on the main process, which returns its result; every other process returns
    ``share(result)`` (JSON-able), sent by the main process, or raises the main process's error."""
    if count() == 1:
        return read()
    value, error, told = None, None, None
    if is_main():
        try:
            value = read()
            told = {"value": share(value)}
        except JaxMnistError as e:
            error, told = e, {"error": str(e)}
    # One call site for every process: jax 0.12 tells collectives apart by the source line they
    # were traced from, so processes that broadcast from different lines never meet (a hang).
    told = broadcast_json(told)
    if error is not None:
        raise error
    if is_main():
        return value
    if "error" in told:
        raise HostsError(f"{describe()}: process 0 stopped: {told['error']}")
    return told["value"]


# What the runtime says when a peer process is gone (its sockets closed, or heartbeats stopped).
_PEER_LOST_MARKERS = (
    "Gloo",
    "Connection reset by peer",
    "Connection closed by peer",
    "heartbeat",
    "CoordinationService",
    "coordination service",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
)


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is the runtime reporting that another process of the run stopped."""
    return count() > 1 and any(marker in str(error) for marker in _PEER_LOST_MARKERS)


class PeerLost(HostsError):
    """Another process of a multi-process run stopped (killed, crashed, or its host went away)."""


@contextlib.contextmanager
def peer_loss_stops_the_run():
    """The runtime's error for a vanished peer process, as one ``PeerLost`` line saying what to do."""
    try:
        yield
    except Exception as e:  # noqa: BLE001  (the runtime raises its own types when a peer is gone)
        if not peer_lost(e):
            raise
        raise PeerLost(
            f"{describe()}: another process of this run stopped ({str(e).splitlines()[0][:200]}). "
            f"Every finished epoch is checkpointed: start all {count()} processes again with --resume"
        ) from None
