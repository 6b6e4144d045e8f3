"""Every command but the quick verify: locate → plan → transact → report.

Imports libcst (through the catalog and the planner) and rich; `patches.cli` imports this
module only when the command needs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
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
from patches.problems import interrupted_apply, problems_for
from patches.registry import choose, load_patches
from patches.releases import parse_requirement, resolve_against
from patches.report import (
    Report,
    comparisons_json,
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


def parse_options(args: argparse.Namespace) -> Options:
    chosen, include_historical = choose(
        load_patches(), args.only, args.skip, args.include_historical
    )
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
        include_historical=include_historical,
        python=args.python,
        site_packages=args.site_packages,
        json=args.json,
        quiet=args.quiet,
        records=args.records or str(RECORDS_DIR),
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


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command line; what it prints goes to stdout through rich."""
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    return run(parse_options(args), out)
