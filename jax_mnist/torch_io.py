"""PyTorch checkpoints of the original models: state_dict keys mapped onto Flax variables."""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_mnist.errors import CheckpointError
from jax_mnist.files import write_atomically
from jax_mnist.zoo import ConvSpec, check_model_name, get_model, init_variables, model_layers, torch_layout


def _torch_key_map(name: str) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """PyTorch state_dict key -> (Flax variable path, array transform)."""
    layers, layout = model_layers(name), torch_layout(name)
    oihw_to_hwio = lambda w: w.transpose(2, 3, 1, 0)
    same = lambda a: a
    mapping = {}
    for layer in layers:
        if not isinstance(layer, ConvSpec):
            continue
        conv = layer.name if layout == "plain" else f"{layer.name}.0"
        mapping[f"{conv}.weight"] = (("params", layer.name, "conv", "kernel"), oihw_to_hwio)
        if layer.bias:
            mapping[f"{conv}.bias"] = (("params", layer.name, "conv", "bias"), same)
        if layer.batchnorm:
            # Position of the BN inside the PyTorch nn.Sequential: after conv (1) or after ReLU (2).
            bn = f"{layer.name}.{1 if layer.order == 'bn_relu' else 2}"
            mapping[f"{bn}.weight"] = (("params", layer.name, "bn", "scale"), same)
            mapping[f"{bn}.bias"] = (("params", layer.name, "bn", "bias"), same)
            mapping[f"{bn}.running_mean"] = (("batch_stats", layer.name, "bn", "mean"), same)
            mapping[f"{bn}.running_var"] = (("batch_stats", layer.name, "bn", "var"), same)
    return mapping


def _to_numpy(value):

    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def read_torch_checkpoint(path) -> dict:
    """Read a ``.pt`` state_dict with ``torch.load(weights_only=True)`` (no arbitrary unpickling)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading {path} needs PyTorch: pip install torch") from None

    try:
        empty = os.path.getsize(path) == 0
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if empty:
        raise CheckpointError(f"{path}: empty file, not a PyTorch checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except pickle.UnpicklingError as e:
        # torch's own message suggests weights_only=False, which would run code from the file:
        # never repeat it.
        if "Unsupported global" in str(e) or "can still be loaded" in str(e):
            raise CheckpointError(
                f"{path}: not a plain state_dict: it holds Python objects, and only tensors and "
                "containers are loaded here; save model.state_dict() and load that"
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (it does not unpickle)") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
        ) from None
    return unwrap_state_dict(state, path)


# Keys under which training scripts commonly save the model's state_dict inside a larger dict.
_WRAPPERS = ("model_state_dict", "state_dict", "model")


def unwrap_state_dict(state, where="state_dict") -> dict:
    """The state_dict itself: unwrapped from ``{"model_state_dict": ...}``-style dicts, with the
    ``module.`` prefix of ``nn.DataParallel`` dropped."""
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{where}: expected a state_dict (a mapping of key -> tensor), found {type(state).__name__}"
        )
    for key in _WRAPPERS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    state = dict(state)
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_torch_state_dict(name: str, state_dict) -> dict:
    """Variables ``{'params', 'batch_stats'}`` for model ``name`` from a PyTorch state_dict.

    ``state_dict`` maps original keys to arrays (numpy or torch tensors), or is
    the path of a ``.pt`` file. Raises ``CheckpointError`` (a ``ValueError``) naming any missing,
    unexpected or mis-shaped key.
    """
    check_model_name(name)
    if isinstance(state_dict, Mapping):
        state_dict = unwrap_state_dict(state_dict)
    else:
        state_dict = read_torch_checkpoint(state_dict)
    mapping = _torch_key_map(name)
    # num_batches_tracked is PyTorch bookkeeping with no Flax counterpart: accepted, ignored.
    ignorable = {
        k
        for k in state_dict
        if k.endswith(".num_batches_tracked") and k.replace("num_batches_tracked", "running_mean") in mapping
    }
    unexpected = sorted(set(state_dict) - set(mapping) - ignorable)
    missing = [k for k in mapping if k not in state_dict]
    if missing or unexpected:
        raise CheckpointError(
            f"state_dict does not fit {name}: missing keys {missing}, unexpected keys {unexpected}"
        )
    expected = jax.eval_shape(lambda: init_variables(get_model(name), jax.random.key(0)))
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, (path, transform) in mapping.items():
        want = expected
        for p in path:
            want = want[p]
        want_torch = tuple(want.shape[i] for i in (3, 2, 0, 1)) if len(want.shape) == 4 else tuple(want.shape)
        found = _to_numpy(state_dict[key])
        if tuple(found.shape) != want_torch:
            raise CheckpointError(
                f"{name}: key {key!r} has shape {tuple(found.shape)}, expected {want_torch}"
            )
        array = transform(found)
        node = variables
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(array, jnp.float32)
    return variables


def to_torch_state_dict(name: str, variables: Mapping, batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """The inverse of ``load_torch_state_dict``: a state_dict (numpy arrays, PyTorch layouts and
    keys) that the original PyTorch class of ``name`` loads with ``strict=True``.

    ``batches_tracked`` fills BatchNorm's ``num_batches_tracked``: the number of training steps
    (PyTorch counts one per forward pass in train mode).
    """
    check_model_name(name)
    state_dict = {}
    for key, (path, _) in _torch_key_map(name).items():
        value = variables
        for p in path:
            value = value[p]
        value = np.asarray(value, np.float32)
        state_dict[key] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value  # HWIO -> OIHW
        if key.endswith(".running_var"):
            state_dict[key.replace("running_var", "num_batches_tracked")] = np.asarray(
                batches_tracked, np.int64
            )
    return state_dict


def write_torch_checkpoint(path, state_dict: Mapping[str, np.ndarray]) -> None:
    """``torch.save`` of the state_dict as tensors, written atomically."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"writing {path} needs PyTorch: pip install torch") from None

    buffer = io.BytesIO()  # serialised in memory: file errors are then ours to report
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, buffer)
    write_atomically(path, buffer.getvalue())
