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


def problems_for(command: str, assessments: Sequence[Assessment]) -> tuple[str, ...]:
    """One line per assessment that makes this command's result not ok."""
    if command == "verify":
        flagged = [a for a in assessments if a.is_problem_for_verify]
    else:
        flagged = [a for a in assessments if a.is_problem_for_check]
    return tuple(_problem_line(a) for a in flagged)


def _problem_line(a: Assessment) -> str:
    advice = {
        State.PENDING: "not applied; run `python apply_patches.py --apply`",
        State.TARGET_MISSING: "the code no longer matches the patch; do not rely on it here",
        State.DRIFTED: "patched file changed since apply",
    }[a.state]
    version = f" {a.installed_version}" if a.installed_version else ""
    detail = f" ({a.detail})" if a.detail else ""
    return f"{a.patch.id} [{a.patch.package}{version}] {a.state.value}: {advice}{detail}"


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
    for problem in report.problems:
        console.print(f"[red]problem:[/] {escape(problem)}", highlight=False)
    if not quiet:
        verdict = "[green]ok[/]" if report.ok else f"[red]{len(report.problems)} problem(s)[/]"
        console.print(f"{report.command}: {verdict}")


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
