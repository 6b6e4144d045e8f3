"""Assess patches against releases that are not installed: `--check --against` and `--matrix`.

A release is assessed as if freshly installed (an upgrade replaces the patched files, so
the installed manifest does not carry over): every patch comes out pending, fixed-upstream,
target-missing or skipped, exactly as `--check` would say after `pip install`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from patches import __version__
from patches.environment import Distribution, Environment
from patches.manifest import Manifest
from patches.model import Assessment, Patch, State
from patches.plan import make_plan
from patches.releases import (
    Release,
    cache_dir,
    download_wheel,
    published_versions,
    release_in_tree,
    select_releases,
    unpack_wheel,
)

PACKAGE_DIR = Path(__file__).resolve().parent


def target_files(patches: Sequence[Patch]) -> dict[str, list[str]]:
    """Package -> every file a patch of it reads: all an unpacked release needs."""
    files: dict[str, list[str]] = {}
    for patch in patches:
        files.setdefault(patch.package, []).extend(t.path for t in patch.targets)
    return {name: sorted(set(paths)) for name, paths in files.items()}


def assess_release(
    patches: Sequence[Patch], release: Release, include_historical: bool
) -> tuple[Assessment, ...]:
    env = Environment(
        python=sys.executable,
        python_version=platform.python_version(),
        site_packages=release.location,
        distributions={
            release.package: Distribution(release.package, release.version, release.location)
        },
    )
    mine = [p for p in patches if p.package == release.package]
    return make_plan(mine, env, Manifest(tool_version=__version__), include_historical).assessments


@dataclass(frozen=True)
class Comparison:
    """One patch, as installed now and as it would be after upgrading to a release."""

    installed: Assessment
    candidate: Assessment

    @property
    def is_problem(self) -> bool:
        return self.candidate.state is State.TARGET_MISSING

    @property
    def change(self) -> str:
        before, after = self.installed.state, self.candidate.state
        needed_now = before in (State.PENDING, State.APPLIED, State.DRIFTED)
        if after is State.TARGET_MISSING:
            return "would no longer match: the patch needs updating before this upgrade"
        if after is State.PENDING:
            if needed_now:
                return "still needed: run --apply after upgrading"
            return "newly needed: run --apply after upgrading"
        if after is State.FIXED_UPSTREAM:
            return "no longer needed after upgrading" if needed_now else "not needed"
        return "historical: off by default" if after is State.SKIPPED else after.value

    def describe(self) -> str:
        """The change, with the candidate's detail where it adds something."""
        detail = self.candidate.detail
        if not detail or self.candidate.state is State.SKIPPED:
            return self.change
        return f"{self.change} ({detail})"

    def problem_line(self) -> str:
        a = self.candidate
        return (
            f"{a.patch.id} [{a.patch.package} {a.installed_version}] target-missing: "
            f"{self.change} ({a.detail})"
        )


def compare(
    installed: Sequence[Assessment], candidates: Sequence[Assessment]
) -> tuple[Comparison, ...]:
    now = {a.patch.id: a for a in installed}
    return tuple(Comparison(now[c.patch.id], c) for c in candidates if c.patch.id in now)


# --- the release matrix -----------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One patch on one release."""

    patch: str
    package: str
    version: str
    state: str
    detail: str
    in_range: bool
    recommended: bool

    @property
    def problem(self) -> str | None:
        """What a maintainer must do when a release contradicts the declared range."""
        if not (self.in_range and self.recommended):
            return None
        where = f"{self.patch}: {self.package} {self.version}"
        if self.state == State.TARGET_MISSING.value:
            return (
                f"{where} is in the declared range but the patch no longer matches "
                f"({self.detail}): update its transform, or narrow `affected` to exclude "
                f"{self.version}"
            )
        if self.state == State.FIXED_UPSTREAM.value:
            return (
                f"{where} already contains the fix ({self.detail}): narrow `affected` "
                f"to end before {self.version} once a reproducer confirms it"
            )
        return None


def tool_fingerprint() -> str:
    """Changes whenever the patches or the engine change, invalidating cached cells."""
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cells_for_release(
    patches: Sequence[Patch], release: Release, include_historical: bool
) -> list[Cell]:
    return [
        Cell(
            patch=a.patch.id,
            package=release.package,
            version=release.version,
            state=a.state.value,
            detail=a.detail,
            in_range=a.patch.affects(release.version),
            recommended=a.patch.recommended,
        )
        for a in assess_release(patches, release, include_historical)
    ]


def _cached_cells(
    patches: Sequence[Patch], wheel: Path, package: str, include_historical: bool, key: str
) -> list[Cell]:
    path = cache_dir() / "cells" / f"{key}.json"
    try:
        return [Cell(**c) for c in json.loads(path.read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError):
        pass
    tree = unpack_wheel(wheel, package, target_files(patches)[package])
    (release,) = release_in_tree(tree, [package], wheel.name)
    cells = cells_for_release(patches, release, include_historical)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(c) for c in cells]), encoding="utf-8")
    return cells


def matrix_for(
    patches: Sequence[Patch],
    requirement: Requirement,
    every_release: bool,
    include_historical: bool,
    step: Callable[[str], None] = lambda _: None,
) -> list[Cell]:
    """Every selected release of one package, each patch assessed on it."""
    package = canonicalize_name(requirement.name)
    fingerprint = tool_fingerprint()
    ids = ",".join(p.id for p in patches if p.package == package)
    cells: list[Cell] = []
    for version in select_releases(published_versions(package), requirement, every_release):
        step(f"{package} {version}")
        wheel = download_wheel(Requirement(f"{package}=={version}"))
        key = hashlib.sha256(
            f"{fingerprint}|{wheel.name}|{ids}|{include_historical}".encode()
        ).hexdigest()
        cells += _cached_cells(patches, wheel, package, include_historical, key)
    return cells


MATRIX_SCHEMA = "stackpatch/matrix@1"


def merge_matrix(existing: dict | None, cells: Sequence[Cell], meta: dict) -> dict:
    """Replace the rows of the packages just computed; keep the others."""
    computed = {c.package for c in cells}
    kept = [c for c in (existing or {}).get("cells", []) if c["package"] not in computed]
    requirements = {
        **{k: v for k, v in (existing or {}).get("requirements", {}).items() if k not in computed},
        **meta["requirements"],
    }
    return {
        "schema": MATRIX_SCHEMA,
        "tool_version": __version__,
        "date": meta["date"],
        # package -> {"requirement": str, "every_release": bool}
        "requirements": dict(sorted(requirements.items())),
        "cells": sorted(
            kept + [asdict(c) for c in cells],
            key=lambda c: (c["package"], Version(c["version"]), int(c["patch"][1:])),
        ),
    }


def load_matrix(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return data if data.get("schema") == MATRIX_SCHEMA else None


@dataclass(frozen=True)
class MatrixTable:
    """One package's matrix: releases down, patches across."""

    package: str
    patch_ids: tuple[str, ...]
    rows: tuple[tuple[str, dict[str, dict]], ...]


def matrix_tables(cells: Sequence[dict]) -> list[MatrixTable]:
    tables = []
    for package in sorted({c["package"] for c in cells}):
        mine = [c for c in cells if c["package"] == package]
        ids = tuple(sorted({c["patch"] for c in mine}, key=lambda i: int(i[1:])))
        versions = sorted({c["version"] for c in mine}, key=Version)
        rows = tuple((v, {c["patch"]: c for c in mine if c["version"] == v}) for v in versions)
        tables.append(MatrixTable(package, ids, rows))
    return tables


def matrix_problems(cells: Sequence[dict]) -> list[str]:
    return [p for p in (Cell(**c).problem for c in cells) if p]


def cell_label(cell: dict | None) -> str:
    """A matrix cell as text: the state, `!` when it contradicts the declared range."""
    if cell is None:
        return "-"
    return cell["state"] + (" !" if Cell(**cell).problem else "")
