"""Every patch's transform against its fixtures in tests/fixtures/<patch id>/.

A fixture directory holds, per case:
  NAME.before.py + NAME.after.py   the target shape and exactly what the patch makes of it
  NAME.fixed.py                    upstream's own fix: recognised, left alone
  NAME.missing.py                  code that moved on: recognised as no longer matching
Adding a patch means adding its directory; this module needs no edit.
"""

from __future__ import annotations

import difflib
import io
import tokenize
from pathlib import Path

import libcst as cst
import pytest
from libcst.codemod import CodemodContext, SkipFile

from patches.model import Patch, Target
from patches.registry import load_patches
from patches.transform import ShapeKind, classify

FIXTURES = Path(__file__).parent / "fixtures"
PATCHES = {p.id: p for p in load_patches()}


def _target_for(patch: Patch, path: Path) -> Target:
    """A single-target patch keeps its fixtures flat; others in a folder per target file."""
    if len(patch.targets) == 1:
        return patch.targets[0]
    return next(t for t in patch.targets if Path(t.path).stem == path.parent.name)


def _cases(suffix: str) -> list[tuple[Patch, Path]]:
    found = []
    for directory in sorted(FIXTURES.iterdir()):
        patch = PATCHES[directory.name.upper()]
        found += [(patch, path) for path in sorted(directory.rglob(f"*.{suffix}.py"))]
    return found


def _ids(cases: list[tuple[Patch, Path]]) -> list[str]:
    return [f"{p.id}-{path.relative_to(FIXTURES / p.id.lower())}" for p, path in cases]


def _shape(patch: Patch, path: Path, source: str) -> ShapeKind:
    target = _target_for(patch, path)
    return classify(target.transform, patch.id, cst.parse_module(source)).kind


def _rewrite(patch: Patch, path: Path) -> str:
    target = _target_for(patch, path)
    transform = target.transform(CodemodContext(), patch.id)
    result = transform.transform_module(cst.parse_module(path.read_text()))
    assert transform.rewritten == transform.SITES
    return result.code


def _statement_end_lines(code: str) -> set[int]:
    """Line numbers that end a logical line (a statement or a block header)."""
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    return {t.start[0] for t in tokens if t.type in (tokenize.NEWLINE, tokenize.COMMENT)}


def test_every_patch_has_fixtures() -> None:
    with_fixtures = {d.name.upper() for d in FIXTURES.iterdir() if any(d.rglob("*.before.py"))}
    assert set(PATCHES) <= with_fixtures


REWRITES = _cases("before")


@pytest.mark.parametrize(("patch", "before"), REWRITES, ids=_ids(REWRITES))
def test_rewrites_target_exactly(patch: Patch, before: Path) -> None:
    """Where an .after.py fixture exists, the rewrite is exactly it."""
    after = before.with_name(before.name.replace(".before.", ".after."))
    rewritten = _rewrite(patch, before)
    if after.exists():
        assert rewritten == after.read_text()
    else:  # an injection too long to pin as a fixture: the original lines all survive
        assert set(before.read_text().splitlines()) - set(rewritten.splitlines()) <= {
            line for line in before.read_text().splitlines() if "source_cls" in line
        }


@pytest.mark.parametrize(("patch", "before"), REWRITES, ids=_ids(REWRITES))
def test_patched_shape_is_recognised_and_left_alone(patch: Patch, before: Path) -> None:
    rewritten = _rewrite(patch, before)
    assert _shape(patch, before, before.read_text()) is ShapeKind.ORIGINAL
    assert _shape(patch, before, rewritten) is ShapeKind.PATCHED
    target = _target_for(patch, before)
    with pytest.raises(SkipFile):
        target.transform(CodemodContext(), patch.id).transform_module(cst.parse_module(rewritten))


@pytest.mark.parametrize(("patch", "before"), REWRITES, ids=_ids(REWRITES))
def test_every_changed_line_carries_the_marker(patch: Patch, before: Path) -> None:
    """Each added line that ends a statement or opens a block, or is a comment, is marked."""
    rewritten = _rewrite(patch, before)
    old = before.read_text().splitlines()
    new = rewritten.splitlines()
    ends = _statement_end_lines(rewritten)
    added = [
        number
        for tag, _, _, first, last in difflib.SequenceMatcher(a=old, b=new).get_opcodes()
        if tag in ("replace", "insert")
        for number in range(first + 1, last + 1)
    ]
    checked = [n for n in added if n in ends and new[n - 1].strip()]
    assert checked
    unmarked = [new[n - 1] for n in checked if f"# stackpatch {patch.id}" not in new[n - 1]]
    assert not unmarked


FIXED = _cases("fixed")


@pytest.mark.parametrize(("patch", "source"), FIXED, ids=_ids(FIXED))
def test_upstream_fix_is_recognised(patch: Patch, source: Path) -> None:
    assert _shape(patch, source, source.read_text()) is ShapeKind.FIXED_UPSTREAM


MISSING = _cases("missing")


@pytest.mark.parametrize(("patch", "source"), MISSING, ids=_ids(MISSING))
def test_moved_on_code_is_target_missing(patch: Patch, source: Path) -> None:
    assert _shape(patch, source, source.read_text()) is ShapeKind.MISSING
