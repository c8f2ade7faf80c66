"""A trained run as a classifier: evaluate, predict on image files, export to PyTorch and StableHLO."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jax_mnist.cli import main
from jax_mnist.inference import (
    ImageError,
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
    assert fitted.shape == (28, 28, 1) and any("152x152 fitted as MNIST was" in n for n in notes)
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


# --------------------------------------------------------------------------- photos


def _clean_and_styles(test_images_raw, tmp_path, count=8):
    from tests.photos import write_photo_set

    paths = write_photo_set(test_images_raw[:count], tmp_path / "photos")
    clean = [read_image(p)[0].astype(int) for p in paths["clean"]]
    return paths, clean


@pytest.mark.parametrize("style", ["offwhite", "gradient", "noisy", "exif", "alpha"])
def test_a_photo_like_digit_reads_as_its_clean_mnist_digit(style, test_images_raw, tmp_path):
    """Paper, lighting, grain, EXIF rotation and alpha-only ink are removed: what is left is close
    to the clean digit (mean pixel difference; a wrong rotation or a grey box is far above it)."""
    paths, clean = _clean_and_styles(test_images_raw, tmp_path)
    differences = [np.abs(read_image(p)[0].astype(int) - c).mean() for p, c in zip(paths[style], clean)]
    assert np.mean(differences) < 14, differences
    # The same digit turned a quarter: what the EXIF case would give if the tag were ignored.
    turned = [np.abs(np.rot90(c, axes=(0, 1)) - c).mean() for c in clean]
    assert np.mean(turned) > 2 * np.mean(differences)


def test_notes_say_what_was_done(test_images_raw, tmp_path):
    paths, _ = _clean_and_styles(test_images_raw, tmp_path, count=1)
    assert any("EXIF orientation" in n for n in read_image(paths["exif"][0])[1])
    assert any("transparency composited onto white" in n for n in read_image(paths["alpha"][0])[1])
    assert any("read as a photo" in n for n in read_image(paths["gradient"][0])[1])


@pytest.mark.parametrize(
    "pixels", [np.zeros((1, 1)), np.zeros((64, 64)), np.full((64, 64), 255), np.full((28, 28), 128)]
)
def test_a_blank_image_is_no_ink_found(pixels, tmp_path):
    path = tmp_path / "blank.png"
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    with pytest.raises(ImageError, match="blank.png: no ink found"):
        read_image(path)


def test_animated_images_are_refused_and_huge_ones_are_one_line(tmp_path):
    import struct
    import zlib

    frames = [Image.fromarray(np.full((28, 28), v, np.uint8)) for v in (0, 255)]
    frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="two.gif: an image of 2 frames"):
        read_image(tmp_path / "two.gif")
    for side in (10_000, 20_000):  # PIL warns past 89M pixels and refuses past 179M: both are ours now
        small = tmp_path / "small.png"
        Image.new("L", (1, 1)).save(small)
        data = bytearray(small.read_bytes())
        header = struct.pack(">II", side, side) + bytes(data[24:29])  # IHDR: width, height, then the rest
        data[16:29] = header
        data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
        huge = tmp_path / f"huge-{side}.png"
        huge.write_bytes(bytes(data))
        with pytest.raises(ImageError, match=rf"huge-{side}.png: .*too large"):
            read_image(huge)


def test_each_image_gets_its_line_and_the_status_says_one_failed(run_dir, test_images_raw, tmp_path, capsys):
    paths, _ = _clean_and_styles(test_images_raw, tmp_path, count=1)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "blank.png")
    argv = [
        "predict",
        str(run_dir),
        str(paths["clean"][0]),
        str(tmp_path / "blank.png"),
        str(paths["noisy"][0]),
    ]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()[::2]] == [argv[2], argv[4]]
    assert "blank.png: no ink found" in captured.err and "1 of 3 image(s) could not be read" in captured.err
    assert main([*argv, "--json"]) == 2
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [("error" in row) for row in rows] == [False, True, False]


def test_photo_like_digits_score_about_as_the_clean_ones(run_dir, mnist):
    """The run of this test session (1,000 training examples) on 100 test digits in each style."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from photo_accuracy import photo_accuracies

    accuracies = photo_accuracies(run_dir, mnist.test_images[:100], mnist.test_labels[:100])
    assert min(accuracies.values()) >= accuracies["clean"] - 6, accuracies
