"""`jax-mnist` command line: one subcommand per task, one-line errors for bad input."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

from jax_mnist import library_output
from jax_mnist.errors import JaxMnistError

MAX_SEEDS = 10_000  # a bound on typos: --seeds 1-100000 would plan for minutes


class UserError(JaxMnistError):
    """Bad input from the user: printed as one line, no traceback."""


class Interrupted(JaxMnistError):
    """Ctrl-C or SIGTERM, with what to do next: exit status 130 or 143, as a shell's."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean stop follows."""


def continue_command(args, add_resume: bool) -> str:
    """The command line that continues what ``args`` started, as the user can type it."""
    import shlex

    argv = [a for a in args.argv if a != "--resume"]
    return "jax-mnist " + shlex.join(argv + (["--resume"] if add_resume else []))


def interrupted(args, error: KeyboardInterrupt, add_resume: bool) -> Interrupted:
    name, code = ("terminated (SIGTERM)", 143) if isinstance(error, Terminated) else ("interrupted", 130)
    return Interrupted(
        f"{name}; every finished epoch is checkpointed: continue with {continue_command(args, add_resume)}",
        code,
    )


def cmd_recipes(args) -> None:
    import dataclasses
    import json

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


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        help="tfds data dir (default $JAX_MNIST_DATA_DIR, $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    g.add_argument(
        "--mnist-files",
        help="directory with the four official MNIST .gz files (default $JAX_MNIST_FILES, "
        "else <data-dir>/downloads/manual)",
    )
    g.add_argument("--no-download", action="store_true", help="never try tfds' network download")


def whole_number(low: int, high: int | None = None):
    """An argparse type: a whole number in [low, high]; a bad one is argparse's one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a whole number, found {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, found {value}")
        return value

    return parse


def number(low: float, high: float, high_included: bool = True):
    """An argparse type: a finite number in [low, high] (or [low, high))."""

    def parse(text: str) -> float:
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number, found {text!r}") from None
        if not (math.isfinite(value) and low <= value and (value <= high if high_included else value < high)):
            raise argparse.ArgumentTypeError(
                f"must be a finite number in [{low}, {high}{']' if high_included else ')'}, found {text}"
            )
        return value

    return parse


def parse_set(pairs: list[str]) -> dict[str, str]:
    """``--set FIELD=VALUE`` options as a dict (values are parsed by the recipe)."""
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise UserError(f"--set takes FIELD=VALUE, found {bad[0]!r}")
    return dict(kv.split("=", 1) for kv in pairs)


def parse_seeds(text: str) -> list[int]:
    """``1-5``, ``1,3,7`` or a mix (``1-3,7``) as a list of distinct seeds, in the order given."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            more = range(int(low), int(high) + 1) if high else [int(low)]
            if len(seeds) + len(more) > MAX_SEEDS:
                raise UserError(f"--seeds names more than {MAX_SEEDS:,} seeds: {text[:60]!r}")
            seeds += more
    except ValueError:
        raise UserError(f"--seeds takes seeds like 1-5 or 1,3,7, found {text!r}") from None
    if not seeds:
        raise UserError(f"--seeds names no seed: {text!r}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UserError(f"--seeds names seed(s) {repeated} more than once: {text!r}")
    return seeds


def add_process_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "several processes (hosts), on jax.distributed; default: $JAX_COORDINATOR_ADDRESS, "
        "$JAX_NUM_PROCESSES, $JAX_PROCESS_ID, else one process"
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    g.add_argument(
        "--num-processes", type=whole_number(1), metavar="N", help="how many processes the run has"
    )
    g.add_argument("--process-id", type=whole_number(0), metavar="I", help="this process's index, 0 .. N-1")


def join_processes(args) -> None:
    """Join a multi-process run if one is asked for (before anything touches a JAX device)."""
    from jax_mnist import hosts

    hosts.initialize(args.coordinator, args.num_processes, args.process_id)


def is_main_process() -> bool:
    from jax_mnist import hosts

    return not hosts.joined() or hosts.is_main()


def load_data(args):
    from jax_mnist.data import load_mnist

    return load_mnist(args.data_dir, args.mnist_files, download=not args.no_download)


def cmd_data(args) -> None:
    import time

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


def with_flags(overrides: dict, args, fields: tuple[str, ...]) -> dict:
    """``--set`` overrides with the recipe flags given (``--epochs`` ...) on top: a flag wins over
    ``--set`` of the same field, and when both are given a warning on stderr says which value."""
    merged = dict(overrides)
    for field in fields:
        value = getattr(args, field)
        if value is None:
            continue
        if field in overrides and _differs(field, overrides[field], value):
            flag = "--" + field.replace("_", "-")
            print(
                f"warning: {flag} {value} and --set {field}={overrides[field]} both set {field}; "
                f"the flag wins: {field}={value}",
                file=sys.stderr,
            )
        merged[field] = value
    return merged


def _differs(field: str, text: str, value) -> bool:
    from jax_mnist.recipes import parse_value

    try:
        return parse_value(field, text) != value
    except JaxMnistError:  # a bad --set value is reported by the recipe, with its field
        return True


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


def cmd_report(args) -> None:
    from jax_mnist.report import (
        DEFAULT_EVALUATED_RUN,
        FIGURES,
        paste_into,
        pasted_section,
        render_markdown,
        write_figures,
    )

    out = Path(args.out or args.study)
    if args.screening:
        from jax_mnist.files import write_atomically
        from jax_mnist.report import render_screening, screening_markers

        text = render_screening(args.study)
        if args.check or args.readme:
            if not args.readme:
                raise UserError("--check compares a file with the report: name it with --readme")
            readme = Path(args.readme)
            document = _read_text(readme)
            markers = screening_markers(document, args.study)
            if args.check:
                if pasted_section(document, str(readme), markers) != text:
                    raise UserError(
                        f"{readme}: its screening table is not what jax-mnist report {args.study} "
                        f"--screening makes now; regenerate it with --readme {readme}"
                    )
                print(f"{readme}: the screening table equals the report of {args.study}")
                return
            write_atomically(readme, paste_into(document, text, str(readme), markers))
            print(f"wrote {readme}")
        print(text, end="")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{out}: cannot create the directory ({e.strerror})") from None
        print(f"wrote {write_atomically(out / 'screening.md', text)}")
        return
    if args.run is None:
        args.run = DEFAULT_EVALUATED_RUN  # drawn when it has been evaluated, else said so
    elif not (Path(args.study) / args.run / "config.json").is_file():
        raise UserError(
            f"--run {args.run}: {Path(args.study) / args.run} is not a run directory (name one of "
            f"{args.study} as RECIPE/seed-S, or as the directory's name for train's runs/<recipe>-seed<S>)"
        )
    if args.check:
        if not args.readme:
            raise UserError("--check compares a README with the report: name it with --readme")
        readme = Path(args.readme)
        expected = render_markdown(args.study, out, readme.parent, args.run, args.confirmation)
        if pasted_section(_read_text(readme), str(readme)) != expected:
            raise UserError(
                f"{readme}: its report section is not what jax-mnist report {args.study} makes now; "
                f"regenerate it with: jax-mnist report {args.study} --readme {readme}"
                + (f" --confirmation {args.confirmation}" if args.confirmation else "")
            )
        print(f"{readme}: the report section equals the report of {args.study}")
        return
    from jax_mnist.files import output_paths, write_atomically

    # The report regenerates its own files (report.md and the figures) without --force; a run's
    # own files and folders are refused, as for every command that writes.
    output_paths([out / "report.md", *(out / name for name in FIGURES)], True, "report")
    written = write_figures(args.study, out, args.run)
    report_md = write_atomically(
        out / "report.md", render_markdown(args.study, out, out, args.run, args.confirmation)
    )
    written.append(report_md)
    if args.readme:
        readme = Path(args.readme)
        section = render_markdown(args.study, out, readme.parent, args.run, args.confirmation)
        written.append(write_atomically(readme, paste_into(_read_text(readme), section, str(readme))))
    print("wrote " + ", ".join(str(p) for p in written))


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def checkpoint_choice(text: str) -> str | int:
    if text in ("best", "last"):
        return text
    try:
        epoch = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes best, last or an epoch number, found {text!r}") from None
    if epoch < 1:
        raise argparse.ArgumentTypeError(f"epochs count from 1, found {epoch}")
    return epoch


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
    import json

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


VERBOSE_HELP = (
    "also print what the libraries (orbax, tensorstore, absl) report on a fault jax-mnist handles, "
    "and the traceback behind an error: detail for a bug report"
)


def build_parser() -> argparse.ArgumentParser:
    import jax_mnist
    from jax_mnist.zoo import MODEL_NAMES

    parser = argparse.ArgumentParser(prog="jax-mnist", description=__doc__)
    parser.add_argument("--version", action="version", version=f"jax-mnist {jax_mnist.__version__}")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    from jax_mnist.recipes import MAX_EPOCHS, RECIPE_NAMES

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

    from jax_mnist.study import STUDY_ORDER

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

    p = sub.add_parser("report", help="Markdown table and figures of a study, from its run directories")
    p.add_argument(
        "study",
        help="a directory of runs: a study (<recipe>/seed-<s>, e.g. results/study), train's runs/ "
        "(<recipe>-seed<s>), one train --seeds --out directory, or one run directory",
    )
    p.add_argument("--out", help="where report.md and the PNGs go (default: the study directory)")
    from jax_mnist.report import DEFAULT_EVALUATED_RUN

    p.add_argument(
        "--run",
        metavar="RECIPE/seed-S",
        help="the run whose test errors are drawn (its jax-mnist evaluate output; "
        f"default {DEFAULT_EVALUATED_RUN})",
    )
    p.add_argument(
        "--screening",
        action="store_true",
        help="the validation figures of screening runs (trained with --validation N) instead: "
        "prints them and writes screening.md (with --readme FILE, also pastes them between FILE's "
        "screening table marker lines)",
    )
    p.add_argument(
        "--confirmation",
        metavar="DIR",
        help="a study directory of the same recipes on seeds never used for any choice (e.g. "
        "results/confirm): their figures as a table of their own, beside how each recipe was chosen",
    )
    p.add_argument("--readme", help="also paste the Markdown into this file, between its report marker lines")
    p.add_argument(
        "--check",
        action="store_true",
        help="write nothing; fail if --readme's section differs from the report",
    )
    p.set_defaults(func=cmd_report)

    checkpoint_help = (
        "which weights: best (the epoch of best test accuracy; of best validation accuracy in a run "
        "trained with --validation), last (default) or an epoch number"
    )
    p = sub.add_parser(
        "evaluate", help="test loss, accuracy, per-class accuracy and every prediction of a run"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by jax-mnist train")
    p.add_argument("--checkpoint", type=checkpoint_choice, default="last", help=checkpoint_help)
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
    p.add_argument("--checkpoint", type=checkpoint_choice, default="last", help=checkpoint_help)
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
    p.add_argument("--checkpoint", type=checkpoint_choice, default="last", help=checkpoint_help)
    p.add_argument("--force", action="store_true", help="replace PATH if it exists")
    p.set_defaults(func=cmd_export)
    for subparser in sub.choices.values():  # also after the subcommand: jax-mnist evaluate RUN --verbose
        subparser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jax_mnist import host_memory

    # Process-wide, so here and not on import: before JAX starts its CPU backend (see host_memory).
    host_memory.apply_from_env()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)  # --help writes too
    except BrokenPipeError:
        return _closed_pipe()
    args.argv = argv
    library_output.set_verbose(args.verbose)
    library_output.hide_for_process()
    with _sigterm_as_interrupt():
        code = _run(args)
    if code:
        _leave_processes(code)
    return code


def _closed_pipe() -> int:
    """The reader of stdout went away (`| head`): stop quietly with the shell's status of a SIGPIPE,
    stdout pointed at /dev/null so that the flush at exit does not fail again."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + 13


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops a command as Ctrl-C does (one line, how to continue, exit 143)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def backend_problem() -> str | None:
    """What stops JAX from starting the backend ``$JAX_PLATFORMS`` names, with the platforms it
    can start instead; None when JAX starts (JAX itself raises a bare AssertionError there)."""
    import os

    import jax

    asked = os.environ.get("JAX_PLATFORMS")
    if not asked:
        return None
    try:
        jax.devices()
        return None
    except Exception:  # noqa: BLE001  (JAX raises AssertionError or RuntimeError here)
        pass
    import jax.extend.backend

    jax.config.update("jax_platforms", None)  # what JAX finds when not told
    jax.extend.backend.clear_backends()
    try:
        found = ", ".join(sorted({d.platform for d in jax.devices()}))
    except Exception:  # noqa: BLE001
        found = "none"
    return (
        f"JAX_PLATFORMS={asked}: JAX cannot start that platform here; it finds: {found} "
        "(unset JAX_PLATFORMS, or install the jax plugin for it, e.g. jax[cuda12])"
    )


def _run(args) -> int:
    try:
        args.func(args)
    except Interrupted as e:
        print(f"jax-mnist {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except JaxMnistError as e:
        library_output.show_detail(e, "the error below")
        print(f"jax-mnist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (AssertionError, RuntimeError):
        problem = backend_problem()
        if problem is None:
            raise
        print(f"jax-mnist {args.command}: error: {problem}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(
            f"jax-mnist {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}",
            file=sys.stderr,
        )
        return 143 if terminated else 130
    return 0


def _leave_processes(code: int) -> None:
    """A process of a multi-process run that stops on an error exits now: at a normal exit JAX
    would wait at its shutdown barrier for the other processes, then abort with a stack trace."""
    import os

    from jax_mnist import hosts

    if hosts.joined():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
