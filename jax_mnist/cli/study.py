"""`jax-mnist study`: every recipe x seed of a study that is not complete yet (resumable)."""

from __future__ import annotations

from pathlib import Path

from jax_mnist.cli.options import (
    UserError,
    add_data_options,
    add_process_options,
    interrupted,
    join_processes,
    load_data,
    parse_seeds,
    whole_number,
)
from jax_mnist.recipes import RECIPE_NAMES
from jax_mnist.study import STUDY_ORDER


def cmd_study(args) -> None:
    from jax_mnist.study import STUDY_ORDER, describe_plan, plan, read_study, run_study

    recipes = list(STUDY_ORDER) if not args.recipes else args.recipes
    seeds = parse_seeds(args.seeds)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: is a file, not a study directory")
    if args.dry_run:
        study = read_study(args.out) if Path(args.out).is_dir() else {}
        print(describe_plan(plan(args.out, recipes, seeds, args.max_epochs, args.train_examples), study))
        return
    join_processes(args)
    data = load_data(args)
    try:
        run_study(
            args.out, recipes, seeds, data, max_epochs=args.max_epochs, train_examples=args.train_examples
        )
    except KeyboardInterrupt as e:
        raise interrupted(args, e, add_resume=False) from None


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "study", help="train every recipe x seed of the study that is not complete yet (resumable)"
    )
    p.add_argument("--out", default="results/study", help="study directory (default results/study)")
    p.add_argument(
        "--recipes",
        nargs="+",
        choices=RECIPE_NAMES,
        metavar="NAME",
        help=f"recipes, in the order to run them (default: {' '.join(STUDY_ORDER)})",
    )
    p.add_argument("--seeds", default="1-5", help="seeds of every recipe, e.g. 1-5 (default) or 1,3,7")
    p.add_argument(
        "--max-epochs",
        type=whole_number(1),
        metavar="N",
        help="train at most N epochs of each recipe (a shortened run, marked so in the report)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what is left and the time estimate, train nothing"
    )
    p.add_argument(
        "--train-examples",
        type=whole_number(1),
        help="train on the first N training examples only (smoke tests)",
    )
    add_data_options(p)
    add_process_options(p)
    p.set_defaults(func=cmd_study)
