"""`jax-mnist bench`: compile and step times of the programs training runs (optionally vs PyTorch)."""

from __future__ import annotations

from jax_mnist.cli.options import UserError, parse_set, whole_number
from jax_mnist.recipes import RECIPE_NAMES


def cmd_bench(args) -> None:
    from jax_mnist.bench import all_header, bench_all, format_result, run_benchmark, write_json
    from jax_mnist.files import output_path

    if args.json:
        output_path(args.json, args.force, "benchmark")  # before the minutes of timing

    if args.all:
        print(all_header(args.compare_torch), flush=True)
        rows = bench_all(args.steps, args.compare_torch, log=lambda line: print(line, flush=True))
        if args.json:
            write_json({"recipes": rows}, args.json)
            print(f"wrote {args.json}")
        return
    if args.seeds and args.seeds_examples < args.batch_size:
        raise UserError(
            f"--seeds-examples must be at least the batch size {args.batch_size}, found {args.seeds_examples}"
        )
    overrides = parse_set(args.set)
    result = run_benchmark(
        args.recipe,
        args.batch_size,
        args.steps,
        args.warmup,
        args.compare_torch,
        epoch=not args.no_epoch,
        overrides=overrides,
        seeds=args.seeds,
        seeds_examples=args.seeds_examples,
    )
    print(format_result(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "bench", help="compile and step times of the programs training runs (optionally vs PyTorch)"
    )
    p.add_argument(
        "--recipe", default="final", choices=RECIPE_NAMES, metavar="NAME", help="default final (model 8)"
    )
    p.add_argument("--batch-size", type=whole_number(1), default=256, help="default 256")
    p.add_argument("--steps", type=whole_number(1), default=30, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=whole_number(0), default=5, help="untimed calls first (default 5)")
    p.add_argument("--compare-torch", action="store_true", help="time the same network in PyTorch eager too")
    p.add_argument("--no-epoch", action="store_true", help="skip the full-epoch timing")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override recipe fields")
    p.add_argument(
        "--seeds",
        type=whole_number(2),
        metavar="K",
        help="also time one epoch of K >= 2 seeds trained together vs one after another",
    )
    p.add_argument(
        "--seeds-examples",
        type=whole_number(1, 60_000),
        default=60_000,
        metavar="N",
        help="training examples per epoch for --seeds (default 60000)",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="every registered recipe at its own batch size: ms per step (with --compare-torch, "
        "PyTorch's beside it), as a Markdown table",
    )
    p.add_argument("--json", help="write all figures to this JSON file")
    p.add_argument("--force", action="store_true", help="replace --json's file if it exists")
    p.set_defaults(func=cmd_bench)
