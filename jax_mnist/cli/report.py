"""`jax-mnist report`: the Markdown table and figures of a study, or its screening table."""

from __future__ import annotations

from pathlib import Path

from jax_mnist.cli.options import UserError, read_text
from jax_mnist.report import DEFAULT_EVALUATED_RUN


def cmd_report(args) -> None:
    from jax_mnist.report import (
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
            document = read_text(readme)
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
        if pasted_section(read_text(readme), str(readme)) != expected:
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
        written.append(write_atomically(readme, paste_into(read_text(readme), section, str(readme))))
    print("wrote " + ", ".join(str(p) for p in written))


def add_parsers(sub) -> None:
    p = sub.add_parser("report", help="Markdown table and figures of a study, from its run directories")
    p.add_argument(
        "study",
        help="a directory of runs: a study (<recipe>/seed-<s>, e.g. results/study), train's runs/ "
        "(<recipe>-seed<s>), one train --seeds --out directory, or one run directory",
    )
    p.add_argument("--out", help="where report.md and the PNGs go (default: the study directory)")

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
