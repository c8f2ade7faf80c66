"""A trained run as a classifier: evaluate, predict on image files, export to PyTorch and StableHLO."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from jax_mnist.cli import main
from jax_mnist.inference import (
    evaluation_paths,
    inference_model,
    log_probabilities,
    read_image,
    read_predictions,
    variables_of,
)
from jax_mnist.rundir import load_run
from tests.helpers import SMALL


@pytest.fixture(scope="module")
def run_dir(straight_run, tmp_path_factory):
    """A copy of the session's trained run: evaluate writes into a run directory, which other
    tests compare file by file."""
    import shutil

    copy = tmp_path_factory.mktemp("inference") / "run"
    shutil.copytree(straight_run[0], copy)
    return copy


def test_evaluate_matches_the_runs_own_test_figures(run_dir, mnist_data_dir, capsys):
    assert main(["evaluate", str(run_dir), "--data-dir", str(mnist_data_dir), "--no-download"]) == 0
    out = capsys.readouterr().out
    json_path, predictions_path = evaluation_paths(run_dir, "last")
    summary = json.loads(json_path.read_text())
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["epoch"] == SMALL["epochs"] and summary["examples"] == 10_000
    assert summary["accuracy"] == pytest.approx(last["test_accuracy"], abs=0.011)  # one image either way
    assert summary["loss"] == pytest.approx(last["test_loss"], rel=1e-4)
    assert f"accuracy {summary['accuracy']:.2f}%" in out and "per class: 0: " in out
    confusion = np.array(summary["confusion"])
    assert confusion.sum() == 10_000 and np.trace(confusion) == round(summary["accuracy"] * 100)
    predictions = read_predictions(predictions_path)
    wrong = np.flatnonzero(predictions.predicted != predictions.label)
    assert sorted(predictions.misclassified_index.tolist()) == wrong.tolist()
    confidence = predictions.probabilities[
        predictions.misclassified_index, predictions.predicted[predictions.misclassified_index]
    ]
    assert np.all(np.diff(confidence) <= 0)  # most confident first
    assert predictions.misclassified_images.shape == (len(wrong), 28, 28, 1)
    np.testing.assert_allclose(predictions.probabilities.sum(1), 1.0, atol=1e-5)


def test_evaluate_another_checkpoint_and_bad_ones(run_dir, mnist_data_dir, tmp_path, capsys):
    out = tmp_path / "p.npz"
    args = ["--data-dir", str(mnist_data_dir), "--no-download"]
    assert main(["evaluate", str(run_dir), "--checkpoint", "best", "--out", str(out), *args]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["checkpoint"] == "best"
    assert main(["evaluate", str(run_dir), "--checkpoint", "1", *args]) == 2  # only the last two are kept
    assert "no checkpoint of epoch 1" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), *args]) == 2
    assert "not a jax-mnist run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(run_dir), "--checkpoint", "newest"])


def test_predict_reads_any_image_as_an_mnist_digit(run_dir, mnist, tmp_path, capsys):
    digit = mnist.test_images[0, :, :, 0]  # a 7
    Image.fromarray(digit).save(tmp_path / "plain.png")
    Image.fromarray(255 - digit).save(tmp_path / "inverted.png")  # dark ink on white paper
    large = np.pad(np.kron(255 - digit, np.ones((4, 4), np.uint8)), 20, constant_values=255)
    Image.fromarray(large).convert("RGB").save(tmp_path / "photo.jpg", quality=95)

    plain, notes = read_image(tmp_path / "plain.png")
    assert notes == [] and np.array_equal(plain[:, :, 0], digit)
    inverted, notes = read_image(tmp_path / "inverted.png")
    assert np.array_equal(inverted, plain) and notes[0].startswith("inverted")
    fitted, notes = read_image(tmp_path / "photo.jpg")
    assert fitted.shape == (28, 28, 1) and any("resized from 152x152" in n for n in notes)
    rows, cols = np.indices((28, 28))
    mass = fitted[:, :, 0].astype(float)
    assert abs((rows * mass).sum() / mass.sum() - 14) < 1 and abs((cols * mass).sum() / mass.sum() - 14) < 1

    paths = [str(tmp_path / n) for n in ("plain.png", "inverted.png", "photo.jpg")]
    assert main(["predict", str(run_dir), *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    run = load_run(run_dir)
    expected = np.exp(log_probabilities(inference_model(run.recipe), variables_of(run), plain[None]))[0]
    assert lines[0].startswith(f"{paths[0]}: {int(np.argmax(expected))} (probability {expected.max():.4f})")
    assert (
        lines[2].split(":", 1)[1]
        == lines[0].split(":", 1)[1] + "; inverted (dark digit on a light background)"
    )
    assert main(["predict", str(run_dir), *paths, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["image"] for row in rows] == paths
    assert rows[0]["predicted"] == int(np.argmax(expected))
    np.testing.assert_allclose(rows[0]["probabilities"], expected, rtol=1e-5)
    assert rows[0]["notes"] == [] and "inverted (dark digit on a light background)" in rows[2]["notes"]


def test_predict_bad_images(run_dir, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["predict", str(run_dir), str(tmp_path / "notes.png")]) == 2
    assert "notes.png: not an image file PIL can read" in capsys.readouterr().err
    assert main(["predict", str(run_dir), str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err


def test_export_to_pytorch_loads_into_the_original_class(run_dir, test_batch, tmp_path):
    import torch

    from jax_mnist.reference.torch_models import torch_model
    from jax_mnist.torch_io import load_torch_state_dict

    path = tmp_path / "model.pt"
    assert main(["export", str(run_dir), "--to", "pytorch", str(path)]) == 0
    run = load_run(run_dir)
    reference = torch_model(run.recipe.model)
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
    reference.eval()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(test_batch.transpose(0, 3, 1, 2))).numpy()
    ours = inference_model(run.recipe).apply(variables_of(run), test_batch, train=False)
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=2e-4)
    # ... and back: the same variables, bit for bit.
    back = load_torch_state_dict(run.recipe.model, str(path))
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables_of(run))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(torch.load(path, weights_only=True)["convblock1.2.num_batches_tracked"]) == int(run.state.step)


def test_export_to_stablehlo_reloads_for_any_batch_size(run_dir, test_images_raw, tmp_path, capsys):
    from jax_mnist.export import load_stablehlo

    path = tmp_path / "model.stablehlo"
    assert main(["export", str(run_dir), "--to", "stablehlo", str(path)]) == 0
    assert "needs jax and flatbuffers" in capsys.readouterr().out  # jax alone cannot load it
    exported = load_stablehlo(path)
    assert set(exported.platforms) == {"cpu", "cuda", "tpu"}
    run = load_run(run_dir)
    expected = log_probabilities(inference_model(run.recipe), variables_of(run), test_images_raw)
    for batch in (1, 7, 64):
        np.testing.assert_allclose(
            np.asarray(exported.call(test_images_raw[:batch])), expected[:batch], atol=1e-4
        )


def test_export_errors(run_dir, tmp_path, capsys):
    from jax_mnist.errors import CheckpointError
    from jax_mnist.export import load_stablehlo

    (tmp_path / "junk").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a serialized jax.export function"):
        load_stablehlo(tmp_path / "junk")
    assert (
        main(["export", str(run_dir), "--to", "pytorch", str(tmp_path / "no" / "such" / "dir" / "m.pt")]) == 2
    )
    assert "cannot write" in capsys.readouterr().err
