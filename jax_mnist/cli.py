"""`jax-mnist` command line: one subcommand per task, one-line errors for bad input."""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


def cmd_summary(args) -> None:
    from jax_mnist.models import summarize

    print(summarize(args.model).format())


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="tfds data dir (default $JAX_MNIST_DATA_DIR, $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    g.add_argument("--mnist-files", help="directory with the four official MNIST .gz files (default $JAX_MNIST_FILES, "
                   "else <data-dir>/downloads/manual)")  # fmt: skip
    g.add_argument("--no-download", action="store_true", help="never try tfds' network download")


def parse_set(pairs: list[str]) -> dict[str, str]:
    """``--set FIELD=VALUE`` options as a dict (values are parsed by the recipe)."""
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise UserError(f"--set takes FIELD=VALUE, found {bad[0]!r}")
    return dict(kv.split("=", 1) for kv in pairs)


def load_data(args):
    from jax_mnist.data import load_mnist

    return load_mnist(args.data_dir, args.mnist_files, download=not args.no_download)


def cmd_data(args) -> None:
    import time

    start = time.perf_counter()
    mnist = load_data(args)
    seconds = time.perf_counter() - start
    pixels = mnist.train_images / 255.0
    print(f"train {mnist.train_images.shape} test {mnist.test_images.shape}; "
          f"train pixel mean {pixels.mean():.4f} std {pixels.std():.4f}; loaded in {seconds:.2f} s")  # fmt: skip


def cmd_show_augment(args) -> None:
    from jax_mnist.augment_grid import write_augment_grid

    mnist = load_data(args)
    write_augment_grid(args.out, mnist.test_images[: args.images], args.copies, args.seed,
                       degrees=args.degrees, translate=args.translate, scale=tuple(args.scale))  # fmt: skip
    print(f"wrote {args.out}")


def cmd_train(args) -> None:
    from jax_mnist.recipes import get_recipe, with_overrides
    from jax_mnist.run import train

    overrides = parse_set(args.set)
    for flag, field in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr")):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    recipe = with_overrides(get_recipe(args.recipe), overrides)
    out = args.out or f"runs/{recipe.name}-seed{args.seed}"
    data = load_data(args)
    print(f"training {recipe.name} ({recipe.model}) seed {args.seed} -> {out}")
    try:
        train(recipe, data, out, seed=args.seed, resume=args.resume, train_examples=args.train_examples)
    except KeyboardInterrupt:
        raise UserError(f"interrupted; the last complete epoch is checkpointed: continue with --resume --out {out}")


def cmd_bench(args) -> None:
    from jax_mnist.bench import format_result, run_benchmark, write_json

    overrides = parse_set(args.set)
    result = run_benchmark(args.recipe, args.batch_size, args.steps, args.warmup, args.compare_torch,
                           epoch=not args.no_epoch, overrides=overrides)  # fmt: skip
    print(format_result(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def build_parser() -> argparse.ArgumentParser:
    from jax_mnist.models import MODEL_NAMES

    parser = argparse.ArgumentParser(prog="jax-mnist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="per-layer table: kind, output shape, parameters, receptive field")
    p.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help=f"one of: {', '.join(MODEL_NAMES)}")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("data", help="load (and on first use prepare) MNIST through tfds; print shapes and timing")
    add_data_options(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("show-augment", help="PNG grid: test images (left column) and augmented copies")
    add_data_options(p)
    p.add_argument("--out", default="augment.png", help="PNG path (default augment.png)")
    p.add_argument("--images", type=int, default=8, help="rows: how many test images")
    p.add_argument("--copies", type=int, default=8, help="augmented copies per image")
    p.add_argument("--degrees", type=float, default=7.0, help="rotation range +-degrees")
    p.add_argument("--translate", type=float, default=0.0, help="affine translation, fraction of the size")
    p.add_argument("--scale", type=float, nargs=2, default=(1.0, 1.0), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_show_augment)

    from jax_mnist.recipes import RECIPE_NAMES

    p = sub.add_parser("train", help="train a recipe; metrics.jsonl, config.json and checkpoints in --out")
    p.add_argument("--recipe", required=True, choices=RECIPE_NAMES, metavar="NAME", help=f"one of: {', '.join(RECIPE_NAMES)}")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate (the peak for OneCycle recipes)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any recipe field, e.g. --set schedule=onecycle --set degrees=10")  # fmt: skip
    p.add_argument("--out", help="run directory (default runs/<recipe>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    p.add_argument("--train-examples", type=int, help="train on the first N training examples only")
    add_data_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="compile and step times of a recipe's training step (optionally vs PyTorch)")
    p.add_argument("--recipe", default="final", choices=RECIPE_NAMES, metavar="NAME", help="default final (model 8)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compare-torch", action="store_true", help="time the same network in PyTorch eager too")
    p.add_argument("--no-epoch", action="store_true", help="skip the full-epoch timing")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override recipe fields")
    p.add_argument("--json", help="write all figures to this JSON file")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (UserError, ValueError, OSError) as e:
        print(f"jax-mnist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jax-mnist {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
