"""The command line: locate → plan → transact → report.

Exit codes: 0 fine, 1 problems found, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from patches import __version__
from patches.compare import (
    assess_release,
    compare,
    load_matrix,
    matrix_for,
    matrix_problems,
    matrix_tables,
    merge_matrix,
    target_files,
)
from patches.environment import Environment, locate
from patches.errors import StackpatchError, UsageError
from patches.manifest import Manifest
from patches.model import Patch
from patches.plan import make_plan
from patches.registry import load_patches, parse_id_list, select
from patches.releases import parse_requirement, resolve_against
from patches.report import (
    Report,
    comparisons_json,
    interrupted_apply,
    problems_for,
    render,
    render_comparisons,
    render_matrix,
)
from patches.status_doc import (
    MATRIX_FILE,
    RECORDS_DIR,
    STATUS_FILE,
    current_status,
    load_records,
    verified_statuses,
)
from patches.store import StateStore, atomic_write
from patches.transaction import Outcome, apply_plan, revert
from patches.validate import validate, write_record

MODES = (
    ("check", "report each patch's state (the default)"),
    ("apply", "apply every pending patch, all or nothing"),
    ("verify", "exit 1 unless every recommended in-range patch is applied and unchanged"),
    ("revert", "restore the original files byte for byte"),
    ("diff", "print the unified diff --apply would make"),
    ("validate", "run each patch's reproducer unpatched and patched; write records"),
    ("validation-status", "print VALIDATION-STATUS.md"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="apply_patches.py",
        description="Version-aware patches for transformers, peft and bitsandbytes "
        "(Gemma 4 fine-tuning on one GPU).",
        epilog="Exit codes: 0 fine, 1 problems found, 2 usage or environment error.",
    )
    mode = parser.add_mutually_exclusive_group()
    for command, help_text in MODES:
        mode.add_argument(
            f"--{command}", dest="command", action="store_const", const=command, help=help_text
        )
    parser.add_argument(
        "--only", default="", metavar="IDS", help="comma-separated patch ids, e.g. P4,P10"
    )
    parser.add_argument(
        "--skip", default="", metavar="IDS", help="comma-separated patch ids to leave out"
    )
    parser.add_argument(
        "--include-historical",
        action="store_true",
        help="also consider historical patches (off by default)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--python", metavar="PATH", help="patch the environment of this interpreter"
    )
    target.add_argument(
        "--site-packages",
        metavar="DIR",
        help="patch the packages installed in this directory (pip install --target)",
    )
    parser.add_argument(
        "--records",
        metavar="DIR",
        default=str(RECORDS_DIR),
        help="where --validate writes its records (default: validation/records)",
    )
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="RELEASE",
        help="with --check: assess a release before upgrading to it; a requirement "
        "(transformers==5.23.0), a wheel file or an unpacked directory; repeatable",
    )
    parser.add_argument(
        "--matrix",
        nargs="+",
        default=[],
        metavar="REQUIREMENT",
        help="assess every published release in each range, e.g. 'transformers>=5.5'; "
        "writes validation/matrix.json and VALIDATION-STATUS.md",
    )
    parser.add_argument(
        "--all",
        dest="every_release",
        action="store_true",
        help="with --matrix: every release, not only the newest patch release per minor",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON (schema in README)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    parser.add_argument("--version", action="version", version=f"stackpatch {__version__}")
    parser.set_defaults(command="check")
    return parser


@dataclass(frozen=True)
class Options:
    command: str
    patches: tuple[Patch, ...]
    include_historical: bool
    python: str | None
    site_packages: str | None
    json: bool
    quiet: bool
    records: str = str(RECORDS_DIR)
    against: tuple[str, ...] = ()
    matrix: tuple[str, ...] = ()
    every_release: bool = False

    @property
    def selected_ids(self) -> set[str]:
        return {p.id for p in self.patches}


def parse_options(argv: Sequence[str]) -> Options:
    args = build_parser().parse_args(argv)
    only, skip = parse_id_list(args.only), parse_id_list(args.skip)
    chosen = select(load_patches(), only, skip)
    if not chosen:
        raise UsageError("--only/--skip left no patch to work on")
    if args.against and args.command != "check":
        raise UsageError("--against goes with --check (the default), not --" + args.command)
    if args.matrix and (args.command != "check" or args.against):
        raise UsageError(
            "--matrix is a mode of its own: drop --" + ("against" if args.against else args.command)
        )
    if args.every_release and not args.matrix:
        raise UsageError("--all goes with --matrix")
    return Options(
        command=args.command,
        patches=chosen,
        include_historical=args.include_historical
        or any(not p.recommended for p in chosen if p.id in only),
        python=args.python,
        site_packages=args.site_packages,
        json=args.json,
        quiet=args.quiet,
        records=args.records,
        against=tuple(args.against),
        matrix=tuple(args.matrix),
        every_release=args.every_release,
    )


def _assess(
    options: Options, env: Environment, manifest: Manifest, outcome: Outcome | None
) -> Report:
    plan = make_plan(options.patches, env, manifest, options.include_historical)
    command = "verify" if options.command == "verify" else "check"
    problems = interrupted_apply(manifest) + problems_for(command, plan.assessments)
    return Report(
        command=options.command,
        tool_version=__version__,
        environment=env,
        assessments=plan.assessments,
        problems=problems,
        verified=verified_statuses(options.patches, load_records()),
        written=outcome.written if outcome else (),
        dropped=outcome.dropped if outcome else (),
    )


def run(options: Options, out: Console) -> int:
    if options.command == "validation-status":
        out.file.write(current_status())
        return 0
    if options.command == "validate":
        return run_validation(options, out)
    if options.matrix:
        return run_matrix(options, out)
    if options.against:
        return run_against(options, out)
    env = locate({p.package for p in options.patches}, options.python, options.site_packages)
    store = StateStore(env.site_packages, env.state_dir)
    outcome: Outcome | None = None
    if options.command in ("apply", "revert"):
        with store.locked():
            manifest = store.load(__version__)
            if options.command == "apply":
                if manifest.in_flight:
                    raise StackpatchError(interrupted_apply(manifest)[0])
                plan = make_plan(options.patches, env, manifest, options.include_historical)
                outcome = apply_plan(plan, manifest, store, __version__)
            else:
                only = None if len(options.patches) == len(load_patches()) else options.selected_ids
                outcome = revert(manifest, store, __version__, only)
            manifest = store.load(__version__)
    else:
        manifest = store.load(__version__)
    if options.command == "diff":
        plan = make_plan(options.patches, env, manifest, options.include_historical)
        out.file.write(plan.diff())
        return 0
    report = _assess(options, env, manifest, outcome)
    if options.json:
        out.file.write(report.to_json() + "\n")
    else:
        render(report, out, options.quiet)
    return 0 if report.ok else 1


def run_against(options: Options, out: Console) -> int:
    env = locate({p.package for p in options.patches}, options.python, options.site_packages)
    manifest = StateStore(env.site_packages, env.state_dir).load(__version__)
    installed = make_plan(options.patches, env, manifest, options.include_historical).assessments
    files = target_files(options.patches)
    releases = [r for spec in options.against for r in resolve_against(spec, files)]
    comparisons = [
        c
        for release in releases
        for c in compare(
            installed, assess_release(options.patches, release, options.include_historical)
        )
    ]
    if options.json:
        out.file.write(comparisons_json(env, comparisons) + "\n")
    else:
        render_comparisons(env, comparisons, out, options.quiet)
    return 1 if any(c.is_problem for c in comparisons) else 0


def run_matrix(options: Options, out: Console) -> int:
    known = {p.package for p in options.patches}
    requirements = [parse_requirement(spec, sorted(known)) for spec in options.matrix]
    progress_console = Console(stderr=True, quiet=options.quiet or options.json)
    cells = []
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        console=progress_console,
        transient=True,
    ) as progress:
        task = progress.add_task("listing releases")
        for requirement in requirements:
            cells += matrix_for(
                options.patches,
                requirement,
                options.every_release,
                options.include_historical,
                lambda what: progress.update(task, description=f"assessing {what}"),
            )
    meta = {
        "date": datetime.date.today().isoformat(),
        "requirements": {
            canonicalize_name(r.name): {
                "requirement": str(r),
                "every_release": options.every_release,
            }
            for r in requirements
        },
    }
    matrix = merge_matrix(load_matrix(MATRIX_FILE), cells, meta)
    atomic_write(MATRIX_FILE, (json.dumps(matrix, indent=1) + "\n").encode())
    atomic_write(STATUS_FILE, current_status().encode())
    rows = [asdict(c) for c in cells]
    problems = matrix_problems(rows)
    if options.json:
        out.file.write(json.dumps({**matrix, "problems": problems}, indent=1) + "\n")
    else:
        render_matrix(matrix_tables(rows), problems, out, options.quiet)
        if not options.quiet:
            out.print(f"wrote {MATRIX_FILE.name} and {STATUS_FILE.name}")
    return 1 if problems else 0


def run_validation(options: Options, out: Console) -> int:
    chosen = [p for p in options.patches if p.reproducer]
    if not chosen:
        raise UsageError("none of the selected patches has a reproducer")
    table = Table(header_style="bold")
    for column in (
        "id",
        "package",
        "unpatched",
        "patched",
        "proves the fix",
        "reproducer says (unpatched)",
    ):
        table.add_column(column, overflow="fold")
    inconclusive = 0
    for patch in chosen:
        result = validate(patch, options.python, options.site_packages)
        record = write_record(result, Path(options.records))
        inconclusive += "inconclusive" in (result.before.outcome, result.after.outcome)
        version = result.env.versions().get(patch.package, "-")
        table.add_row(
            patch.id,
            f"{patch.package} {version}",
            result.before.outcome,
            result.after.outcome,
            "yes" if result.proves_fix else "no",
            escape(result.before.error),
        )
        if not options.quiet:
            out.print(f"recorded {record}")
    out.print(table)
    return 1 if inconclusive else 0


def main(argv: Sequence[str] | None = None) -> int:
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
        return run(options, out)
    except StackpatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; any partial apply was rolled back", file=sys.stderr)
        return 130
    except Exception as exc:  # a traceback is a bug: say so in one line, show it on request
        if os.environ.get("STACKPATCH_DEBUG"):
            traceback.print_exc()
        print(
            f"error: internal error ({exc.__class__.__name__}: {exc}); nothing further was "
            "changed: rerun with STACKPATCH_DEBUG=1 and report the traceback",
            file=sys.stderr,
        )
        return 2
