import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mnist import onednn
from jax_mnist.errors import ConfigError
from jax_mnist.models import (
    MODEL_NAMES,
    count_params,
    get_model,
    init_variables,
    parameter_count,
    resolve_conv_impl,
    summarize,
)

EXPECTED_PARAMS = {
    "model_1_setup": 6_379_786,
    "model_2_skeleton": 57_824,
    "model_3_lighter_model": 7_690,
    "model_4_batchnorm": 7_830,
    "model_5_regularization": 7_830,
    "model_6_gap": 7_430,
    "model_7_max_capacity": 7_914,
    "model_8_dropout_maxpool": 7_914,
    # This project's own (docs/accuracy.md): under 8,000 and under 5,000.
    "ours_8k": 7_788,
    "ours_5k": 4_888,
    "ours_5k_pad": 4_888,  # ours_5k's widths, its first three convs padded (issue 21's screening)
    "ours_4k": 4_030,  # the frontier's budgets (issue 21)
    "ours_3k": 3_042,
    "ours_2k": 2_112,
    "ours_3762": 3_693,  # issue 35's budgets: the reference's 3,762, and 3,000
    "ours_3000": 2_958,
    # Other layouts at the small budgets (issue 35): three padded stages, GAP, 1x1 head.
    "pyramid_5k": 4_954,
    "pyramid_3762": 3_692,  # the public 3,762-parameter reference's shape, less its redundant biases
    "pyramid_3k": 2_960,
    "pyramid2_5k": 4_781,
}
RECEPTIVE_FIELDS = {
    "model_1_setup": 40,
    "ours_8k": 32,
    "ours_5k": 32,
    "ours_5k_pad": 38,
    "ours_4k": 32,
    "ours_3k": 32,
    "ours_2k": 32,
    "ours_3762": 32,
    "ours_3000": 32,
    "pyramid_5k": 70,
    "pyramid_3762": 70,
    "pyramid_3k": 70,
    "pyramid2_5k": 56,
}  # the others: 28 (spec)


def test_model_names_in_study_order():
    assert MODEL_NAMES == tuple(EXPECTED_PARAMS)


def test_our_models_are_under_their_budgets():
    assert EXPECTED_PARAMS["ours_8k"] < 8_000
    assert EXPECTED_PARAMS["ours_5k"] < 5_000 and EXPECTED_PARAMS["ours_5k_pad"] < 5_000
    assert EXPECTED_PARAMS["pyramid_5k"] < 5_000 and EXPECTED_PARAMS["pyramid2_5k"] < 5_000
    assert EXPECTED_PARAMS["pyramid_3762"] <= 3_762 and EXPECTED_PARAMS["pyramid_3k"] <= 3_000
    assert EXPECTED_PARAMS["ours_3762"] <= 3_762 and EXPECTED_PARAMS["ours_3000"] <= 3_000


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count(name):
    params = jax.eval_shape(lambda: init_variables(get_model(name), jax.random.key(0)))["params"]
    assert count_params(params) == EXPECTED_PARAMS[name]
    assert parameter_count(name) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("shape", [(3, 3, 1, 4), (1, 1, 8, 10), (10,)])
def test_the_init_draws_pytorchs_uniform_with_jax_randoms_numbers(shape):
    """torch_uniform_init draws flat and reshapes (XLA:CPU compiles 4-D draws slowly): the same
    numbers as jax.random.uniform of the shape itself, so runs keep their initial weights."""
    from jax_mnist.layers import torch_uniform_init

    key = jax.random.key(7)
    fan_in = 9
    drawn = torch_uniform_init(fan_in)(key, shape)
    expected = jax.random.uniform(key, shape, jnp.float32, -(fan_in**-0.5), fan_in**-0.5)
    assert drawn.shape == shape and drawn.dtype == jnp.float32
    np.testing.assert_array_equal(drawn, expected)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_receptive_field_and_summary_totals(name):
    summary = summarize(name)
    assert summary.receptive_field == RECEPTIVE_FIELDS.get(name, 28)
    assert summary.total_params == EXPECTED_PARAMS[name]
    assert sum(r.params for r in summary.rows) == summary.total_params
    assert summary.rows[-1].output_shape[1:3] == (1, 1)


def test_summary_rows_of_model_8_match_spec():
    rows = summarize("model_8_dropout_maxpool").rows
    got = [(r.name, r.output_shape[1:], r.params, r.receptive_field) for r in rows]
    assert got == [
        ("convblock1", (26, 26, 10), 110, 3),
        ("convblock2", (24, 24, 20), 1840, 5),
        ("pool1", (12, 12, 20), 0, 6),
        ("convblock4", (10, 10, 10), 1820, 10),
        ("convblock5", (8, 8, 20), 1840, 14),
        ("pool2", (4, 4, 20), 0, 16),
        ("convblock7", (2, 2, 12), 2184, 24),
        ("gap", (1, 1, 12), 0, 28),
        ("convblock8", (1, 1, 10), 120, 28),
    ]
    assert rows[0].kind == "conv3x3-relu-bn-dropout(0.01)"
    text = summarize("model_8_dropout_maxpool").format()
    assert "trainable params: 7,914" in text and "receptive field at the output: 28" in text


def test_summary_receptive_fields_of_model_2_match_spec():
    rfs = [r.receptive_field for r in summarize("model_2_skeleton").rows]
    assert rfs == [3, 5, 6, 10, 14, 16, 16, 28]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shapes_in_both_modes(name, test_batch):
    """Traced, not compiled (fast): (N, 10) in eval and train mode, batch_stats only where BN is."""
    model = get_model(name)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(1)))
    logp = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, test_batch[:8])
    out, updates = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
        ),
        variables,
        test_batch[:8],
    )
    assert logp.shape == out.shape == (8, 10) and logp.dtype == jnp.float32
    assert jax.tree_util.tree_structure(updates.get("batch_stats", {})) == jax.tree_util.tree_structure(
        variables["batch_stats"]
    )


@pytest.mark.slow  # compiles every model: seconds each on the 2-core CPU
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_and_normalised_output(name, test_batch):
    model = get_model(name)

    # Compiled as a whole, once: op by op, init and apply of the large models take tens of seconds.
    @jax.jit
    def apply_both(key, x, dropout_key):
        variables = init_variables(model, key)
        train = model.apply(variables, x, train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"])
        return model.apply(variables, x, train=False), train[0]

    logp, train_logp = apply_both(jax.random.key(1), test_batch[:8], jax.random.key(2))
    assert logp.shape == (8, 10) and train_logp.shape == (8, 10)
    np.testing.assert_allclose(jnp.exp(logp).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.exp(train_logp).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_train_mode_updates_running_stats_like_pytorch(test_batch):
    """Running variance uses the unbiased batch variance, momentum 0.1 (PyTorch semantics)."""
    model = get_model("model_4_batchnorm")
    variables = init_variables(model, jax.random.key(0))
    _, updates = model.apply(variables, test_batch[:16], train=True, mutable=["batch_stats"])
    stats = updates["batch_stats"]["convblock1"]["bn"]
    conv = variables["params"]["convblock1"]["conv"]["kernel"]
    y = jax.lax.conv_general_dilated(
        test_batch[:16], conv, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = np.asarray(y).reshape(-1, y.shape[-1])
    np.testing.assert_allclose(stats["mean"], 0.1 * y.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * y.var(0, ddof=1), rtol=1e-4)


@pytest.mark.slow  # compiles model 5 in train mode
def test_dropout_uses_dropout_rng_and_override_disables_it(test_batch):
    model = get_model("model_5_regularization")
    variables = init_variables(model, jax.random.key(0))
    run = lambda m, k: m.apply(
        variables, test_batch[:8], train=True, rngs={"dropout": jax.random.key(k)}, mutable=["batch_stats"]
    )[0]
    assert not np.allclose(run(model, 1), run(model, 2))
    off = get_model("model_5_regularization", dropout_rate=0.0)
    np.testing.assert_array_equal(run(off, 1), run(off, 2))
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        model.apply(variables, test_batch[:8], train=True, mutable=["batch_stats"])


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
@pytest.mark.parametrize("impl", ["fused", "flax"])
def test_both_dropout_implementations_drop_at_the_rate(impl):
    # Model 5's dropout layer (rate 0.25) sits after block 2: count zeros where its input is not zero.
    model = get_model("model_5_regularization", dropout_impl=impl)
    variables = init_variables(model, jax.random.key(0))
    _, state = model.apply(
        variables,
        jnp.ones((64, 28, 28, 1)),
        train=True,
        rngs={"dropout": jax.random.key(1)},
        capture_intermediates=True,
        mutable=["batch_stats", "intermediates"],
    )
    inputs = state["intermediates"]["convblock2"]["__call__"][0]
    outputs = state["intermediates"]["dropout"]["__call__"][0]
    dropped = float(jnp.sum((outputs == 0) & (inputs != 0)) / jnp.sum(inputs != 0))
    assert abs(dropped - 0.25) < 0.01, dropped
    with pytest.raises(ValueError, match="dropout_impl"):
        get_model("model_5_regularization", dropout_impl="numpy").apply(variables, jnp.ones((1, 28, 28, 1)))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="model_8_dropout_maxpool") as e:
        get_model("model_9")
    assert "model_9" in str(e.value)


def test_unknown_override_is_refused():
    with pytest.raises(ValueError, match="dropout_rate"):
        get_model("model_8_dropout_maxpool", drop=0.1)


def test_count_params_ignores_batch_stats():
    variables = jax.eval_shape(lambda: init_variables(get_model("model_4_batchnorm"), jax.random.key(0)))
    assert count_params(variables["params"]) == 7830
    assert count_params(variables["batch_stats"]) == 140  # means and variances: state, not params


def test_unknown_conv_impl_is_refused(test_batch):
    model = get_model("model_3_lighter_model", conv_impl="fft")
    message = "conv_impl must be auto or one of im2col, onednn, xla, found 'fft'"
    with pytest.raises(ConfigError, match=message):
        model.init(jax.random.key(0), test_batch[:1])


def test_auto_conv_impl_is_onednn_on_cpu_where_built_and_xla_elsewhere():
    assert resolve_conv_impl("auto", "cpu") == ("onednn" if onednn.available() else "im2col")
    assert resolve_conv_impl("auto", "gpu") == resolve_conv_impl("auto", "tpu") == "xla"
    assert resolve_conv_impl("xla", "cpu") == "xla" and resolve_conv_impl("im2col", "gpu") == "im2col"
    with pytest.raises(ConfigError, match="conv_impl 'onednn' runs on the CPU only, not on gpu"):
        resolve_conv_impl("onednn", "gpu")
