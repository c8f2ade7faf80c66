"""`jax-mnist recipes`, `summary`, `data` and `show-augment`: what the registry, the networks and the
data hold, and what the augmentation does to them."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from jax_mnist.cli.options import UserError, add_data_options, load_data, number, whole_number
from jax_mnist.recipes import RECIPE_NAMES
from jax_mnist.zoo import MODEL_NAMES


def cmd_recipes(args) -> None:
    from jax_mnist.recipes import RECIPES, changes, get_recipe, is_original
    from jax_mnist.summary import summarize

    if args.name:
        print(json.dumps(dataclasses.asdict(get_recipe(args.name)), indent=2))
        return
    print("| recipe | model | trainable params | the original's | changed from the defaults |")
    print("|---|---|---:|---|---|")
    for name, recipe in RECIPES.items():
        changed = " ".join(changes(recipe))
        params = summarize(recipe.model).total_params
        original = "yes" if is_original(recipe) else "no"
        print(f"| `{name}` | {recipe.model} | {params:,} | {original} | {changed} |")


def cmd_summary(args) -> None:
    from jax_mnist.summary import summarize

    print(summarize(args.model).format())


def cmd_data(args) -> None:
    start = time.perf_counter()
    mnist = load_data(args)
    seconds = time.perf_counter() - start
    pixels = mnist.train_images / 255.0
    print(
        f"train {mnist.train_images.shape} test {mnist.test_images.shape}; "
        f"train pixel mean {pixels.mean():.4f} std {pixels.std():.4f}; loaded in {seconds:.2f} s"
    )


def cmd_show_augment(args) -> None:
    from jax_mnist.augment_grid import write_augment_grid
    from jax_mnist.files import output_path

    if Path(args.out).suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: show-augment writes a PNG; name a .png file")
    output_path(args.out, args.force, "augmentation grid")
    if args.scale[0] > args.scale[1]:
        raise UserError(f"--scale MIN MAX: MIN must be <= MAX, found {args.scale[0]} > {args.scale[1]}")
    mnist = load_data(args)
    try:
        write_augment_grid(
            args.out,
            mnist.test_images[: args.images],
            args.copies,
            args.seed,
            degrees=args.degrees,
            translate=args.translate,
            scale=tuple(args.scale),
        )
    except OSError as e:
        raise UserError(f"{args.out}: cannot write the PNG ({e.strerror})") from None
    print(f"wrote {args.out}")


def add_parsers(sub) -> None:
    # recipes, summary, data, show-augment
    p = sub.add_parser(
        "recipes", help="every registered recipe (model, parameters, what it changes), or one recipe's fields"
    )
    p.add_argument(
        "name",
        nargs="?",
        choices=RECIPE_NAMES,
        metavar="NAME",
        help="print this recipe's resolved fields (JSON)",
    )
    p.set_defaults(func=cmd_recipes)
    p = sub.add_parser("summary", help="per-layer table: kind, output shape, parameters, receptive field")
    p.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help=f"one of: {', '.join(MODEL_NAMES)}")
    p.set_defaults(func=cmd_summary)
    p = sub.add_parser(
        "data", help="load (and on first use prepare) MNIST through tfds; print shapes and timing"
    )
    add_data_options(p)
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("show-augment", help="PNG grid: test images (left column) and augmented copies")
    add_data_options(p)
    p.add_argument("--out", default="augment.png", help="PNG path (default augment.png)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--images", type=whole_number(1, 10_000), default=8, help="rows: how many test images (1-10000)"
    )
    p.add_argument(
        "--copies", type=whole_number(1, 100), default=8, help="augmented copies per image (1-100)"
    )
    p.add_argument("--degrees", type=number(0, 180), default=7.0, help="rotation range +-degrees")
    p.add_argument(
        "--translate",
        type=number(0, 1, high_included=False),
        default=0.0,
        help="affine translation, fraction of the size",
    )
    p.add_argument(
        "--scale",
        type=number(0.01, 100),
        nargs=2,
        default=(1.0, 1.0),
        metavar=("MIN", "MAX"),
        help="affine scale drawn from [MIN, MAX] (default 1 1: none)",
    )
    p.add_argument(
        "--seed",
        type=whole_number(0, 2**63 - 1),
        default=0,
        help="seed of the augmentation draws (default 0)",
    )
    p.set_defaults(func=cmd_show_augment)
