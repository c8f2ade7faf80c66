"""The models' public surface in one import (the pieces live in their own modules):

- ``jax_mnist.zoo``: layer specs, ``S7Net``, the registry (``MODEL_NAMES``, ``get_model``, ...);
- ``jax_mnist.layers``: BatchNorm, convolution lowerings, max pool, dropout choice;
- ``jax_mnist.summary``: the per-layer table; ``jax_mnist.torch_io``: PyTorch checkpoints.
"""

from jax_mnist.layers import (  # noqa: F401
    CONV_IMPLS,
    DROPOUT_IMPLS,
    BatchNorm,
    batch_moments,
    batch_norm_train,
    batch_normalize,
    conv_im2col,
    conv_xla,
    max_pool_2x2,
    resolve_conv_impl,
)
from jax_mnist.summary import LayerRow, Summary, summarize  # noqa: F401
from jax_mnist.torch_io import load_torch_state_dict, read_torch_checkpoint  # noqa: F401
from jax_mnist.zoo import (  # noqa: F401
    INPUT_SHAPE,
    MODEL_NAMES,
    ConvSpec,
    DropoutSpec,
    GapSpec,
    PoolSpec,
    S7Net,
    count_params,
    get_model,
    init_variables,
    model_layers,
    parameter_count,
)
