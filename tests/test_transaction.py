"""All-or-nothing: make the N-th write of an apply fail, for every N, and check nothing changed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import snapshot

from patches import __version__
from patches.environment import locate
from patches.plan import make_plan
from patches.registry import load_patches
from patches.store import StateStore, atomic_write
from patches.transaction import apply_plan, revert


class InjectedFault(OSError):
    pass


class FailingWriter:
    """Writes through `atomic_write` until the N-th call, which fails in the chosen way."""

    def __init__(self, fail_at: int, torn: bool) -> None:
        self.fail_at = fail_at
        self.torn = torn
        self.calls = 0

    def __call__(self, path: Path, data: bytes) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            if self.torn:  # a non-atomic writer dying half-way: the worst case to recover from
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data[: len(data) // 2])
            raise InjectedFault(f"injected failure at write {self.calls}")
        atomic_write(path, data)


def _apply(site: Path, writer) -> None:
    patches = load_patches()
    env = locate({p.package for p in patches}, site_packages=str(site))
    store = StateStore(env.site_packages, env.state_dir)
    manifest = store.load(__version__)
    plan = make_plan(patches, env, manifest, include_historical=False)
    apply_plan(plan, manifest, store, __version__, writer=writer)


def _count_writes(site: Path) -> int:
    counter = FailingWriter(fail_at=0, torn=False)
    _apply(site, counter)
    return counter.calls


def _target_files(ids: set[str] | None = None) -> set[str]:
    """The files the recommended patches (or those of `ids`) rewrite."""
    return {
        t.path
        for p in load_patches()
        if p.recommended and (ids is None or p.id in ids)
        for t in p.targets
    }


ALL_FILES = _target_files()
FRESH_APPLY_WRITES = 2 * len(ALL_FILES) + 2


def test_a_fresh_apply_writes_each_file_and_its_backup_once(synthetic_site: Path) -> None:
    # a backup and a write per file, plus the in-flight and the final manifest
    assert len(ALL_FILES) == 11  # with P19's transformers/core_model_loading.py
    assert _count_writes(synthetic_site) == FRESH_APPLY_WRITES


@pytest.mark.parametrize("torn", [False, True], ids=["clean-failure", "torn-write"])
@pytest.mark.parametrize("fail_at", range(1, FRESH_APPLY_WRITES + 1))
def test_nth_write_failure_restores_everything(
    synthetic_site: Path, fail_at: int, torn: bool
) -> None:
    before = snapshot(synthetic_site)
    with pytest.raises(InjectedFault):
        _apply(synthetic_site, FailingWriter(fail_at, torn))
    assert snapshot(synthetic_site) == before


FIRST = {"P10", "P12"}
REST = _target_files({p.id for p in load_patches() if p.recommended} - FIRST)
# Files already patched need no new backup; P14 extends the file P12 patched.
EXTENDING_WRITES = len(REST) + len(REST - _target_files(FIRST)) + 2


@pytest.mark.parametrize("fail_at", range(1, EXTENDING_WRITES + 1))
def test_failure_while_extending_a_patched_environment(
    synthetic_site: Path, cli, fail_at: int
) -> None:
    # P10 and P12 already applied; adding the rest must not disturb their records or backups.
    cli("--apply", "--only", ",".join(sorted(FIRST)), "-q", "--site-packages", str(synthetic_site))
    before = snapshot(synthetic_site)
    assert _count_writes_copy(synthetic_site) == EXTENDING_WRITES
    with pytest.raises(InjectedFault):
        _apply(synthetic_site, FailingWriter(fail_at, torn=True))
    assert snapshot(synthetic_site) == before
    verify = cli("--verify", "--only", "P10,P12", "-q", "--site-packages", str(synthetic_site))
    assert verify.code == 0


def _count_writes_copy(site: Path) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "site"
        shutil.copytree(site, copy)
        return _count_writes(copy)


def test_crash_after_some_writes_is_undone_by_revert(
    synthetic_site: Path, cli, monkeypatch
) -> None:
    """A process killed mid-apply cannot roll back; the in-flight manifest lets --revert do it."""
    before = snapshot(synthetic_site)

    class Killed(BaseException):
        pass

    def no_rollback(*args, **kwargs) -> None:
        return None

    monkeypatch.setattr("patches.transaction._roll_back", no_rollback)
    with pytest.raises(Killed):
        # a backup per file and the in-flight manifest, then the first target file
        _apply(synthetic_site, _KillAt(len(ALL_FILES) + 2, Killed))
    monkeypatch.undo()

    site = ("--site-packages", str(synthetic_site))
    check = cli("--check", "--json", *site)
    assert check.code == 1
    assert any("interrupted" in p for p in check.json["problems"])
    refused = cli("--apply", *site)
    assert refused.code == 2 and "interrupted" in refused.err
    assert cli("--revert", "-q", *site).code == 0
    assert snapshot(synthetic_site) == before


class _KillAt:
    def __init__(self, at: int, exc: type[BaseException]) -> None:
        self.at, self.exc, self.calls = at, exc, 0

    def __call__(self, path: Path, data: bytes) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise self.exc()
        atomic_write(path, data)


def test_revert_proves_bytes_by_hash(synthetic_site: Path, cli) -> None:
    before = snapshot(synthetic_site)
    cli("--apply", "-q", "--site-packages", str(synthetic_site))
    store = StateStore(synthetic_site, synthetic_site / ".stackpatch")
    outcome = revert(store.load(__version__), store, __version__)
    assert len(outcome.written) == len(ALL_FILES)
    assert snapshot(synthetic_site) == before


def test_atomic_write_keeps_mode_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "module.py"
    target.write_bytes(b"old")
    target.chmod(0o640)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["module.py"]
