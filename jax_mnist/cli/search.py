"""`jax-mnist search`: recipe fields searched on a validation split (Optuna; resumable)."""

from __future__ import annotations

from jax_mnist.cli.options import (
    add_data_options,
    interrupted,
    load_data,
    parse_set,
    whole_number,
    with_flags,
)
from jax_mnist.recipes import RECIPE_NAMES


def cmd_search(args) -> None:
    from jax_mnist.recipes import get_recipe, with_overrides
    from jax_mnist.search import make_search, parse_space, run_search

    overrides = with_flags(parse_set(args.set), args, ("epochs", "validation"))
    base = with_overrides(get_recipe(args.recipe), overrides)
    space = parse_space(base, args.space)
    search = make_search(
        base,
        space,
        args.trials,
        sampler=args.sampler,
        seed=args.seed,
        train_examples=args.train_examples,
        prune=args.prune,
        allow_test=args.score_test,
    )
    data = load_data(args)
    shown = "; ".join(f"{k} in {', '.join(map(str, v))}" for k, v in space.items())
    print(
        f"search {args.out}: {args.recipe} with {shown}; {search.trials} trial(s), {search.sampler}",
        flush=True,
    )
    try:
        finished = run_search(search, data, args.out, log=lambda line: print(line, flush=True))
    except KeyboardInterrupt as e:
        raise interrupted(args, e, add_resume=False) from None
    scored = [row for row in finished if row["score"] is not None]
    print(
        f"search {args.out}: {len(finished)} trial(s) trained by this process, {len(scored)} scored; "
        f"the table of every trial: jax-mnist report {args.out} --screening",
        flush=True,
    )


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "search",
        help="search recipe fields on a validation split (Optuna; resumable; workers may share --out)",
    )
    p.add_argument(
        "--recipe", required=True, choices=RECIPE_NAMES, metavar="NAME", help="the recipe searched around"
    )
    p.add_argument(
        "--space",
        action="append",
        default=[],
        required=True,
        metavar="FIELD=V1,V2,...",
        help="a recipe field and the values to try, e.g. --space batch_size=32,64 --space lr=0.05,0.1",
    )
    p.add_argument(
        "--out", required=True, help="the search directory: its journal and a run directory per trial"
    )
    p.add_argument(
        "--trials",
        type=whole_number(1),
        metavar="N",
        help="trials in all, over every worker (default with --sampler grid: every combination)",
    )
    p.add_argument(
        "--sampler",
        choices=("grid", "tpe"),
        default="grid",
        help="grid: every combination once (default); tpe: Optuna's TPE for --trials N",
    )
    p.add_argument(
        "--seed",
        type=whole_number(0, 2**63 - 1),
        default=11,
        help="every trial's seed, and the sampler's (default 11)",
    )
    p.add_argument(
        "--validation",
        type=whole_number(0),
        metavar="N",
        help="hold N training examples out and score the trials on them (required unless the recipe has one)",
    )
    p.add_argument(
        "--score-test",
        action="store_true",
        help="allow a search without a validation split, scoring its trials on the test set",
    )
    p.add_argument("--epochs", type=int, help="epochs per trial (default the recipe's)")
    p.add_argument(
        "--train-examples", type=whole_number(1), help="train on the first N of the kept training examples"
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="stop a trial whose accuracy after an epoch (from epoch 4 on, after two trials) is below the "
        "median of the earlier trials' at that epoch (Optuna's MedianPruner)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="fix a recipe field for every trial"
    )
    add_data_options(p)
    p.set_defaults(func=cmd_search)
