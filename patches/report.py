"""Report: the rich table for people and the JSON document for programs.

JSON schema `stackpatch/report@1` (stable; fields may be added, never renamed):
    {
      "schema": "stackpatch/report@1",
      "tool_version": str,
      "command": "check" | "apply" | "verify" | "revert" | "diff",
      "ok": bool,                      # the exit code is 0 exactly when ok is true
      "environment": {"python": str, "python_version": str, "site_packages": str,
                      "packages": {name: version}},
      "patches": [{"id", "slug", "title", "package", "installed_version" (str|null),
                   "affected", "status" (claimed), "verified" (from the records), "state",
                   "recommended", "files", "detail"}],
      "problems": [str],               # one line per problem, as printed
      "written": [str], "dropped": [str]   # files changed by apply/revert
    }
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from patches.compare import Comparison, MatrixTable, cell_label
from patches.environment import Environment
from patches.model import Assessment, State

SCHEMA = "stackpatch/report@1"

STATE_STYLE = {
    State.APPLIED: "green",
    State.PENDING: "yellow",
    State.FIXED_UPSTREAM: "cyan",
    State.TARGET_MISSING: "bold red",
    State.NOT_INSTALLED: "dim",
    State.DRIFTED: "bold magenta",
    State.SKIPPED: "dim",
}


@dataclass(frozen=True)
class Report:
    command: str
    tool_version: str
    environment: Environment
    assessments: tuple[Assessment, ...]
    problems: tuple[str, ...]
    # Patch id -> what the recorded reproducer runs prove (see VALIDATION-STATUS.md).
    verified: dict[str, str] = field(default_factory=dict)
    written: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def verified_for(self, patch_id: str) -> str:
        return self.verified.get(patch_id, "unverified")

    def to_json(self) -> str:
        env = self.environment
        return json.dumps(
            {
                "schema": SCHEMA,
                "tool_version": self.tool_version,
                "command": self.command,
                "ok": self.ok,
                "environment": {
                    "python": env.python,
                    "python_version": env.python_version,
                    "site_packages": str(env.site_packages),
                    "packages": env.versions(),
                },
                "patches": [
                    _assessment_json(a, self.verified_for(a.patch.id)) for a in self.assessments
                ],
                "problems": list(self.problems),
                "written": list(self.written),
                "dropped": list(self.dropped),
            },
            indent=2,
        )


def _assessment_json(assessment: Assessment, verified: str) -> dict:
    patch = assessment.patch
    return {
        "id": patch.id,
        "slug": patch.slug,
        "title": patch.title,
        "package": patch.package,
        "installed_version": assessment.installed_version,
        "affected": patch.affected,
        "status": patch.status.value,
        "verified": verified,
        "state": assessment.state.value,
        "recommended": patch.recommended,
        "files": list(assessment.files),
        "detail": assessment.detail,
    }


def render(report: Report, console: Console, quiet: bool) -> None:
    if not quiet:
        env = report.environment
        packages = ", ".join(f"{n} {v}" for n, v in env.versions().items()) or "none of the targets"
        console.print(f"[bold]stackpatch {report.tool_version}[/] · {env.site_packages}")
        console.print(f"python {env.python_version} · {packages}")
        console.print(_table(report))
        verb = "restored" if report.command == "revert" else "patched"
        for path in report.written:
            console.print(f"[green]{verb}[/] {path}")
        for path in report.dropped:
            console.print(f"[dim]forgot[/] {path} (no stackpatch change left in it)")
    print_verdict(report.command, report.problems, console, quiet)


def print_verdict(command: str, problems: Sequence[str], console: Console, quiet: bool) -> None:
    """One line per problem, then `command: ok` or the count (the count only when not quiet)."""
    for problem in problems:
        console.print(f"[red]problem:[/] {escape(problem)}", highlight=False)
    if not quiet:
        verdict = "[green]ok[/]" if not problems else f"[red]{len(problems)} problem(s)[/]"
        console.print(f"{command}: {verdict}")


def _table(report: Report) -> Table:
    table = Table(show_lines=False, header_style="bold")
    for column in ("id", "package", "installed", "affected", "status", "verified", "state"):
        table.add_column(column, no_wrap=True)
    table.add_column("detail", overflow="fold", ratio=1)
    for a in report.assessments:
        style = STATE_STYLE[a.state]
        table.add_row(
            a.patch.id,
            a.patch.package,
            a.installed_version or "-",
            a.patch.affected,
            a.patch.status.value,
            report.verified_for(a.patch.id),
            f"[{style}]{a.state.value}[/]",
            escape(a.detail),
        )
    return table


# --- --check --against ------------------------------------------------------------------


def render_comparisons(
    environment: Environment, comparisons: Sequence[Comparison], console: Console, quiet: bool
) -> None:
    problems = [c.problem_line() for c in comparisons if c.is_problem]
    if not quiet:
        packages = ", ".join(f"{n} {v}" for n, v in environment.versions().items()) or "-"
        console.print(f"[bold]stackpatch[/] · installed: {packages}")
        table = Table(header_style="bold")
        for column in ("id", "package", "installed", "state now", "against", "state then"):
            table.add_column(column, no_wrap=True)
        table.add_column("what changes", overflow="fold", ratio=1)
        for c in comparisons:
            now, then = c.installed, c.candidate
            table.add_row(
                now.patch.id,
                now.patch.package,
                now.installed_version or "-",
                f"[{STATE_STYLE[now.state]}]{now.state.value}[/]",
                then.installed_version or "-",
                f"[{STATE_STYLE[then.state]}]{then.state.value}[/]",
                escape(c.describe()),
            )
        console.print(table)
    print_verdict("check --against", problems, console, quiet)


def comparisons_json(environment: Environment, comparisons: Sequence[Comparison]) -> str:
    """Schema `stackpatch/against@1`: one entry per patch and release compared."""
    problems = [c.problem_line() for c in comparisons if c.is_problem]
    return json.dumps(
        {
            "schema": "stackpatch/against@1",
            "ok": not problems,
            "installed": environment.versions(),
            "patches": [
                {
                    "id": c.installed.patch.id,
                    "package": c.installed.patch.package,
                    "installed_version": c.installed.installed_version,
                    "installed_state": c.installed.state.value,
                    "candidate_version": c.candidate.installed_version,
                    "candidate_state": c.candidate.state.value,
                    "change": c.change,
                    "detail": c.candidate.detail,
                }
                for c in comparisons
            ],
            "problems": problems,
        },
        indent=2,
    )


# --- --matrix -----------------------------------------------------------------------------


def render_matrix(
    tables: Sequence[MatrixTable], problems: Sequence[str], console: Console, quiet: bool
) -> None:
    for matrix in () if quiet else tables:
        table = Table(header_style="bold")
        table.add_column(f"{matrix.package} release", no_wrap=True)
        for patch_id in matrix.patch_ids:
            table.add_column(patch_id, no_wrap=True)
        for version, cells in matrix.rows:
            table.add_row(version, *(_styled_cell(cells.get(i)) for i in matrix.patch_ids))
        console.print(table)
    print_verdict("matrix", problems, console, quiet)


def _styled_cell(cell: dict | None) -> str:
    style = STATE_STYLE[State(cell["state"])] if cell else "dim"
    return f"[{style}]{cell_label(cell)}[/]"
