"""`jax-mnist evaluate`, `predict` and `export`: what reads a trained run's weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from jax_mnist.cli.options import CHECKPOINT_HELP, UserError, add_data_options, checkpoint_choice, load_data


def cmd_evaluate(args) -> None:
    from jax_mnist.files import output_paths
    from jax_mnist.inference import evaluate_run, evaluation_paths, write_evaluation
    from jax_mnist.rundir import load_run

    json_path, predictions_path = evaluation_paths(args.run_dir, args.checkpoint)
    if args.out:  # the two files beside each other, named by --out with their own suffixes
        predictions_path = Path(args.out).with_suffix(".npz")
        json_path = predictions_path.with_suffix(".json")
    output_paths((predictions_path, json_path), args.force, "evaluation")  # before any work
    run = load_run(args.run_dir, args.checkpoint)
    data = load_data(args)
    evaluation = evaluate_run(run, args.checkpoint, data.test_images, data.test_labels)
    write_evaluation(evaluation, json_path, predictions_path)
    print(f"{run.out}: {run.recipe.name} seed {run.seed}, checkpoint {args.checkpoint} (epoch {run.epoch})")
    print(
        f"test loss {evaluation.loss:.4f}  accuracy {evaluation.accuracy:.2f}%  "
        f"({int(np.sum(evaluation.predicted != evaluation.labels))} errors of {len(evaluation.labels):,})"
    )
    print("per class: " + "  ".join(f"{c}: {a:.2f}" for c, a in enumerate(evaluation.per_class_accuracy)))
    print(f"wrote {json_path} and {predictions_path}")


def cmd_predict(args) -> None:
    """Each image gets its own line, a result or its error; the exit status is 2 when any failed."""

    from jax_mnist.inference import ImageError, inference_model, log_probabilities, read_image, variables_of
    from jax_mnist.rundir import load_run

    read: list[tuple[str, tuple[np.ndarray, list[str]] | str]] = []
    for path in args.images:  # every file read before the model loads
        try:
            read.append((path, read_image(path)))
        except ImageError as e:
            read.append((path, str(e)))
    good = [k for k, (_, value) in enumerate(read) if not isinstance(value, str)]
    probabilities = {}
    if good:
        run = load_run(args.run_dir, args.checkpoint)
        batch = np.stack([read[k][1][0] for k in good])
        found = np.exp(log_probabilities(inference_model(run.recipe), variables_of(run), batch))
        probabilities = dict(zip(good, found))
    for k, (path, value) in enumerate(read):
        if isinstance(value, str):
            if args.json:
                print(json.dumps({"image": str(path), "error": value}))
            else:
                print(f"jax-mnist predict: error: {value}", file=sys.stderr)
            continue
        p, notes = probabilities[k], value[1]
        best = int(np.argmax(p))
        if args.json:
            row = {
                "image": str(path),
                "predicted": best,
                "probabilities": [float(q) for q in p],
                "notes": notes,
            }
            print(json.dumps(row))
            continue
        print(f"{path}: {best} (probability {p[best]:.4f})" + "".join(f"; {n}" for n in notes))
        print("  " + "  ".join(f"{c}: {q:.4f}" for c, q in enumerate(p)))
    failed = len(read) - len(good)
    if failed:
        raise UserError(f"{failed} of {len(read)} image(s) could not be read (each is named above)")


def cmd_export(args) -> None:
    from jax_mnist.export import export_onnx, export_pytorch, export_stablehlo
    from jax_mnist.files import output_path
    from jax_mnist.rundir import load_run

    output_path(args.path, args.force, "export")
    run = load_run(args.run_dir, args.checkpoint)
    if args.to == "pytorch":
        state_dict = export_pytorch(run, args.path)
        print(
            f"wrote {args.path}: PyTorch state_dict of {run.recipe.model} ({len(state_dict)} keys), "
            f"epoch {run.epoch} of {run.out}; load it into the original class with load_state_dict"
        )
    elif args.to == "onnx":
        model = export_onnx(run, args.path)
        print(
            f"wrote {args.path}: ONNX (opset {model.opset_import[0].version}) of uint8 images 'images' "
            f"(batch, 28, 28, 1) -> 'log_probabilities' (batch, 10), epoch {run.epoch} of {run.out}; "
            "run it with onnxruntime.InferenceSession(path).run(None, {'images': images})"
        )
    else:
        exported = export_stablehlo(run, args.path)
        print(
            f"wrote {args.path}: jax.export of uint8 images (batch, 28, 28, 1) -> log-probabilities "
            f"(batch, 10), epoch {run.epoch} of {run.out}, for {', '.join(exported.platforms)}; "
            "load it with jax.export.deserialize(open(path, 'rb').read()).call(images) "
            "(needs jax and flatbuffers, which jax does not install)"
        )


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="test loss, accuracy, per-class accuracy and every prediction of a run"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by jax-mnist train")
    p.add_argument("--checkpoint", type=checkpoint_choice, default="last", help=CHECKPOINT_HELP)
    p.add_argument(
        "--out",
        help="where the two files go: --out NAME writes NAME.npz (the predictions) and NAME.json "
        "(the figures), whatever NAME's suffix (default RUN_DIR/predictions-<checkpoint>.npz and "
        "RUN_DIR/evaluation-<checkpoint>.json)",
    )
    p.add_argument("--force", action="store_true", help="replace existing output files")
    add_data_options(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser(
        "predict", help="class and probabilities of image files (any size; MNIST polarity handled)"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by jax-mnist train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...), one or more")
    p.add_argument("--json", action="store_true", help="one JSON object per image on stdout instead of text")
    p.add_argument("--checkpoint", type=checkpoint_choice, default="last", help=CHECKPOINT_HELP)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser(
        "export", help="a run's network as a PyTorch state_dict, a serialized StableHLO function or ONNX"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by jax-mnist train")
    p.add_argument(
        "--to",
        required=True,
        choices=("pytorch", "stablehlo", "onnx"),
        help="pytorch: a state_dict for the original class; stablehlo: a jax.export file; onnx: an "
        "ONNX model for onnxruntime (needs the onnx extra: pip install 'jax-mnist[onnx]')",
    )
    p.add_argument("path", metavar="PATH", help="file to write (e.g. model.pt, model.stablehlo, model.onnx)")
    p.add_argument("--checkpoint", type=checkpoint_choice, default="last", help=CHECKPOINT_HELP)
    p.add_argument("--force", action="store_true", help="replace PATH if it exists")
    p.set_defaults(func=cmd_export)
