"""The Flax models compute the same function as the PyTorch originals (within 1e-5)."""

import numpy as np
import pytest
import torch  # a test dependency (the `test` extra); parity is a core test, never skipped

from jax_mnist.errors import CheckpointError  # noqa: E402
from jax_mnist.models import get_model, load_torch_state_dict  # noqa: E402
from jax_mnist.reference.torch_models import randomize, torch_model  # noqa: E402
from jax_mnist.zoo import ORIGINAL_MODEL_NAMES  # noqa: E402

TOL = 1e-5


def _torch_logp(model, batch_nhwc, train):
    model.train(train)
    if train:  # batch-statistics BatchNorm, dropout off
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
    with torch.no_grad():
        return model(torch.from_numpy(batch_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize("conv_impl", ["im2col", "onednn", "xla"])
@pytest.mark.parametrize(
    "name",
    # These compile for seconds each here: slow tier (models 5-8 keep parity in the fast loop).
    [
        pytest.param(n, marks=pytest.mark.slow)
        if n in ("model_1_setup", "model_2_skeleton", "model_3_lighter_model", "model_4_batchnorm")
        else n
        for n in ORIGINAL_MODEL_NAMES
    ],
)
def test_parity_with_pytorch(name, conv_impl, test_batch):
    torch.manual_seed(0)
    reference = randomize(torch_model(name), seed=1)
    variables = load_torch_state_dict(name, reference.state_dict())
    model = get_model(name, dropout_rate=0.0, conv_impl=conv_impl)
    eval_diff = np.abs(
        np.asarray(model.apply(variables, test_batch, train=False))
        - _torch_logp(reference, test_batch, train=False)
    ).max()
    train_out, updates = model.apply(variables, test_batch, train=True, mutable=["batch_stats"])
    train_diff = np.abs(np.asarray(train_out) - _torch_logp(reference, test_batch, train=True)).max()
    print(f"{name} ({conv_impl}): max |diff| eval {eval_diff:.2e} train {train_diff:.2e}")
    assert eval_diff < TOL
    assert train_diff < TOL
    # After one train-mode pass, running statistics agree with PyTorch's (unbiased var update).
    for key, value in reference.state_dict().items():
        if key.endswith("running_var"):
            block = key.split(".")[0]
            np.testing.assert_allclose(updates["batch_stats"][block]["bn"]["var"], value.numpy(), rtol=1e-4)


def test_pt_file_is_read_with_weights_only(tmp_path):
    reference = torch_model("model_8_dropout_maxpool")
    path = tmp_path / "model8.pt"
    torch.save(reference.state_dict(), path)
    variables = load_torch_state_dict("model_8_dropout_maxpool", path)
    np.testing.assert_allclose(
        variables["params"]["convblock1"]["conv"]["kernel"],
        reference.convblock1[0].weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    # A pickle holding arbitrary objects is refused by weights_only loading.
    bad = tmp_path / "bad.pt"
    torch.save({"x": object()}, bad)
    with pytest.raises(CheckpointError, match="not a plain state_dict: it holds Python objects"):
        load_torch_state_dict("model_8_dropout_maxpool", bad)


def test_missing_unexpected_and_misshaped_keys_are_named():
    state = {k: v.numpy() for k, v in torch_model("model_7_max_capacity").state_dict().items()}
    missing = dict(state)
    del missing["convblock4.0.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['convblock4.0.weight'\]"):
        load_torch_state_dict("model_7_max_capacity", missing)
    extra = dict(state, **{"fc.weight": np.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys \['fc.weight'\]"):
        load_torch_state_dict("model_7_max_capacity", extra)
    wrong = dict(state, **{"convblock7.0.weight": np.zeros((10, 20, 3, 3), np.float32)})
    with pytest.raises(
        ValueError, match=r"'convblock7.0.weight' has shape \(10, 20, 3, 3\), expected \(12, 20, 3, 3\)"
    ):
        load_torch_state_dict("model_7_max_capacity", wrong)
    # Model 8's checkpoint has BatchNorm at index 2 (conv, ReLU, BN): model 7's layout is refused.
    with pytest.raises(ValueError, match="convblock1.2.weight"):
        load_torch_state_dict("model_8_dropout_maxpool", state)


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_max_pool_values_and_gradient_match_pytorch_with_ties():
    import jax

    from jax_mnist.models import max_pool_2x2

    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (4, 9, 8, 3)).astype(np.float32)  # many tied maxima; odd height
    upstream = rng.normal(size=(4, 4, 4, 3)).astype(np.float32)
    out, vjp = jax.vjp(max_pool_2x2, x)
    (grad,) = vjp(upstream)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, 2, 2)
    yt.backward(torch.from_numpy(upstream.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(out), yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(grad), xt.grad.numpy().transpose(0, 2, 3, 1))


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
@pytest.mark.parametrize("conv_impl", ["im2col", "onednn"])
@pytest.mark.parametrize("name", ["model_5_regularization", "model_8_dropout_maxpool"])
def test_gradients_match_pytorch(name, conv_impl, test_batch):
    """Loss gradients of every parameter (train-mode BN, dropout off) agree with PyTorch's backward."""
    import jax
    import jax.numpy as jnp

    labels = np.arange(len(test_batch)) % 10
    torch.manual_seed(0)
    reference = randomize(torch_model(name), seed=1)
    reference.train(True)
    for m in reference.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    logp = reference(torch.from_numpy(test_batch.transpose(0, 3, 1, 2).copy()))
    torch.nn.functional.nll_loss(logp, torch.from_numpy(labels)).backward()
    torch_grads = {k: p.grad for k, p in reference.named_parameters()}
    expected = load_torch_state_dict(name, {**reference.state_dict(), **torch_grads})["params"]

    variables = load_torch_state_dict(name, reference.state_dict())
    model = get_model(name, dropout_rate=0.0, conv_impl=conv_impl)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, test_batch, train=True, mutable=["batch_stats"])
        return -jnp.mean(jnp.take_along_axis(out, jnp.asarray(labels)[:, None], axis=1))

    grads = jax.grad(loss)(variables["params"])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        want = expected
        for p in path:
            want = want[p.key]
        # float32 sums over 64 images x every position, in another order: compare to the tensor's scale
        scale = float(np.abs(np.asarray(want)).max())
        error = float(np.abs(np.asarray(g) - np.asarray(want)).max())
        where = f"{name} ({conv_impl}) {jax.tree_util.keystr(path)}"
        print(f"{where}: max |grad| {scale:.3g}, max |diff| {error:.2e}")
        assert error <= 5e-4 * scale, (jax.tree_util.keystr(path), error, scale)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_the_training_loss_is_torch_cross_entropy(label_smoothing):
    """Recipe.label_smoothing means what PyTorch's CrossEntropyLoss(label_smoothing=...) means."""
    import jax

    from jax_mnist.engine import training_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(32, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 32)
    ours = float(training_loss(jax.nn.log_softmax(logits), labels, label_smoothing))
    theirs = float(
        torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)(
            torch.from_numpy(logits), torch.from_numpy(labels)
        )
    )
    assert ours == pytest.approx(theirs, rel=1e-6)
