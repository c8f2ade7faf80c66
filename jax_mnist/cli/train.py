"""`jax-mnist train`: one recipe, one seed or several trained together, into run directories."""

from __future__ import annotations

from jax_mnist.cli.options import (
    add_data_options,
    add_process_options,
    interrupted,
    is_main_process,
    join_processes,
    load_data,
    parse_seeds,
    parse_set,
    whole_number,
    with_flags,
)
from jax_mnist.recipes import MAX_EPOCHS, RECIPE_NAMES


def cmd_train(args) -> None:
    from jax_mnist.recipes import get_recipe, with_overrides
    from jax_mnist.run import seed_dirs, train_seeds

    overrides = with_flags(parse_set(args.set), args, ("epochs", "batch_size", "lr", "validation"))
    recipe = with_overrides(get_recipe(args.recipe), overrides)
    if args.seeds is not None:  # one directory per seed under --out
        seeds = parse_seeds(args.seeds)
        out = args.out or f"runs/{recipe.name}"
        run_dirs = seed_dirs(out, seeds)
        what = f"seeds {', '.join(map(str, seeds))} -> {out}/seed-<s>"
    else:
        seed = 1 if args.seed is None else args.seed
        out = args.out or f"runs/{recipe.name}-seed{seed}"
        run_dirs, what = {seed: out}, f"seed {seed} -> {out}"
    join_processes(args)
    data = load_data(args)
    if is_main_process():
        print(f"training {recipe.name} ({recipe.model}) {what}", flush=True)
    try:
        train_seeds(recipe, data, run_dirs, resume=args.resume, train_examples=args.train_examples)
    except KeyboardInterrupt as e:
        raise interrupted(args, e, add_resume=True) from None


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a recipe; metrics.jsonl, config.json and checkpoints in --out")
    p.add_argument(
        "--recipe",
        required=True,
        choices=RECIPE_NAMES,
        metavar="NAME",
        help=f"one of: {', '.join(RECIPE_NAMES)}",
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=whole_number(0, 2**63 - 1), help="the run's seed (default 1)")
    seeds.add_argument(
        "--seeds",
        metavar="SEEDS",
        help="train several seeds together, e.g. 1-5 or 1,3,7: one run directory per seed, --out/seed-<s>",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help=f"epochs to train (default the recipe's: 15; at most {MAX_EPOCHS:,})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="training batch size (default the recipe's: 256)",
    )
    p.add_argument("--lr", type=float, help="learning rate (the peak for OneCycle recipes)")
    p.add_argument(
        "--validation",
        type=whole_number(0),
        metavar="N",
        help="hold N training examples out as a validation split (the same for every seed) and score "
        "each epoch on it instead of the test set: for screening recipes (default the recipe's: 0)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any recipe field, e.g. --set schedule=onecycle --set degrees=10",
    )
    p.add_argument(
        "--out", help="run directory (default runs/<recipe>-seed<seed>; with --seeds runs/<recipe>)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last complete checkpoint in --out"
    )
    p.add_argument(
        "--train-examples", type=whole_number(1), help="train on the first N training examples only"
    )
    add_data_options(p)
    add_process_options(p)
    p.set_defaults(func=cmd_train)
