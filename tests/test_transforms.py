"""Every patch's transform against its fixtures in tests/fixtures/<patch id>/.

A fixture directory holds, per case:
  NAME.before.py + NAME.after.py   the target shape and exactly what the patch makes of it
  NAME.fixed.py                    upstream's own fix: recognised, left alone
  NAME.missing.py                  code that moved on: recognised as no longer matching
Adding a patch means adding its directory; this module needs no edit.
"""

from __future__ import annotations

from pathlib import Path

import libcst as cst
import pytest
from libcst.codemod import CodemodContext, SkipFile

from patches.model import Patch
from patches.registry import load_patches
from patches.transform import ShapeKind, classify

FIXTURES = Path(__file__).parent / "fixtures"
PATCHES = {p.id: p for p in load_patches()}


def _cases(suffix: str) -> list[tuple[Patch, Path]]:
    found = []
    for directory in sorted(FIXTURES.iterdir()):
        patch = PATCHES[directory.name.upper()]
        found += [(patch, path) for path in sorted(directory.glob(f"*.{suffix}.py"))]
    return found


def _ids(cases: list[tuple[Patch, Path]]) -> list[str]:
    return [f"{p.id}-{path.name}" for p, path in cases]


def _shape(patch: Patch, source: str) -> ShapeKind:
    (target,) = patch.targets
    return classify(target.transform, patch.id, cst.parse_module(source)).kind


def test_every_patch_has_fixtures() -> None:
    with_fixtures = {d.name.upper() for d in FIXTURES.iterdir() if any(d.glob("*.before.py"))}
    assert set(PATCHES) <= with_fixtures


REWRITES = _cases("before")


@pytest.mark.parametrize(("patch", "before"), REWRITES, ids=_ids(REWRITES))
def test_rewrites_target_exactly(patch: Patch, before: Path) -> None:
    after = before.with_name(before.name.replace(".before.", ".after."))
    (target,) = patch.targets
    transform = target.transform(CodemodContext(), patch.id)
    result = transform.transform_module(cst.parse_module(before.read_text()))
    assert result.code == after.read_text()
    assert transform.rewritten == transform.SITES


@pytest.mark.parametrize(("patch", "before"), REWRITES, ids=_ids(REWRITES))
def test_patched_shape_is_recognised_and_left_alone(patch: Patch, before: Path) -> None:
    after = before.with_name(before.name.replace(".before.", ".after."))
    assert _shape(patch, before.read_text()) is ShapeKind.ORIGINAL
    assert _shape(patch, after.read_text()) is ShapeKind.PATCHED
    (target,) = patch.targets
    with pytest.raises(SkipFile):
        target.transform(CodemodContext(), patch.id).transform_module(
            cst.parse_module(after.read_text())
        )


@pytest.mark.parametrize(("patch", "before"), REWRITES, ids=_ids(REWRITES))
def test_every_changed_line_carries_the_marker(patch: Patch, before: Path) -> None:
    after = before.with_name(before.name.replace(".before.", ".after."))
    old, new = before.read_text().splitlines(), after.read_text().splitlines()
    added = [line for line in new if line not in old]
    assert added
    assert all(f"# stackpatch {patch.id}" in line for line in added)


FIXED = _cases("fixed")


@pytest.mark.parametrize(("patch", "source"), FIXED, ids=_ids(FIXED))
def test_upstream_fix_is_recognised(patch: Patch, source: Path) -> None:
    assert _shape(patch, source.read_text()) is ShapeKind.FIXED_UPSTREAM


MISSING = _cases("missing")


@pytest.mark.parametrize(("patch", "source"), MISSING, ids=_ids(MISSING))
def test_moved_on_code_is_target_missing(patch: Patch, source: Path) -> None:
    assert _shape(patch, source.read_text()) is ShapeKind.MISSING
