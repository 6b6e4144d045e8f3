"""Plan: decide each patch's state and compute, in memory, every file an apply would write."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst

from patches.environment import Environment
from patches.manifest import FileRecord, Manifest, sha256_bytes
from patches.model import ANY_MARKER, Assessment, Patch, State
from patches.problems import drift_detail
from patches.transform import ShapeKind, classify, parse


@dataclass(frozen=True)
class FileChange:
    """One file an apply will rewrite: its bytes now, its bytes after, and its new record."""

    path: Path
    original: bytes
    new: bytes
    record: FileRecord
    # The record this change extends (the file already carries other patches), if any.
    previous: FileRecord | None

    @property
    def needs_backup(self) -> bool:
        return self.previous is None


@dataclass(frozen=True)
class Plan:
    assessments: tuple[Assessment, ...]
    changes: tuple[FileChange, ...]
    # Records whose file was replaced since apply (a reinstall): nothing left to undo.
    stale: tuple[str, ...] = ()

    def diff(self) -> str:
        chunks = []
        for change in self.changes:
            before = change.original.decode("utf-8").splitlines(keepends=True)
            after = change.new.decode("utf-8").splitlines(keepends=True)
            name = change.record.path
            chunks.extend(difflib.unified_diff(before, after, f"a/{name}", f"b/{name}"))
        return "".join(chunks)


@dataclass
class _FileState:
    """A file as the plan sees it: bytes on disk, and the text after the patches so far."""

    path: Path
    key: str
    package: str
    version: str
    disk: bytes
    record: FileRecord | None
    added: list[str] = field(default_factory=list)
    # Parsed lazily: a verify that finds every hash recorded never pays for a parse.
    _module: cst.Module | str | None = None

    @property
    def text(self) -> str:
        if isinstance(self._module, cst.Module):
            return self._module.code
        return self.disk.decode("utf-8")

    @property
    def module(self) -> cst.Module | str:
        """The current module, or why it cannot be parsed."""
        if self._module is None:
            self._module = parse(self.disk.decode("utf-8"))
        return self._module

    def rewrite(self, module: cst.Module, patch_id: str) -> None:
        self._module = module
        self.added.append(patch_id)

    @property
    def disk_sha(self) -> str:
        return sha256_bytes(self.disk)

    @property
    def record_current(self) -> bool:
        return self.record is not None and self.record.sha256_after == self.disk_sha


def _drift_detail(state: _FileState) -> str:
    assert state.record is not None  # only a recorded file can drift
    return drift_detail(state.key, state.disk_sha, state.record.sha256_before, state.text)


class Planner:
    """Walks the selected patches in order, threading each file's text through them."""

    def __init__(self, env: Environment, manifest: Manifest) -> None:
        self.env = env
        self.manifest = manifest
        self.files: dict[Path, _FileState] = {}

    def _file(self, path: Path, package: str, version: str) -> _FileState | None:
        if path not in self.files:
            try:
                disk = path.read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
            key = self.env.manifest_key(path)
            self.files[path] = _FileState(
                path, key, package, version, disk, self.manifest.record_for(key)
            )
        return self.files[path]

    def assess(self, patch: Patch, include_historical: bool) -> Assessment:
        dist = self.env.distribution(patch.package)
        if not patch.recommended and not include_historical:
            return Assessment(
                patch,
                State.SKIPPED,
                dist.version if dist else None,
                detail="historical: off unless --include-historical",
            )
        if dist is None:
            return Assessment(patch, State.NOT_INSTALLED, None)
        version = dist.version

        def result(state: State, detail: str = "") -> Assessment:
            return Assessment(patch, state, version, detail, tuple(t.path for t in patch.targets))

        states = [self._file(dist.location / t.path, dist.name, version) for t in patch.targets]
        if all(s is not None and s.record_current and patch.id in s.record.patches for s in states):  # type: ignore[union-attr]
            return result(State.APPLIED, "recorded in the manifest; hashes match")
        if not patch.affects(version):
            return result(
                State.FIXED_UPSTREAM, f"{patch.package} {version} is outside {patch.affected}"
            )
        missing = [t.path for t, s in zip(patch.targets, states, strict=True) if s is None]
        if missing:
            return result(State.TARGET_MISSING, f"{missing[0]} is not in {patch.package} {version}")
        present = [s for s in states if s is not None]
        drifted = [
            s for s in present if s.record and patch.id in s.record.patches and not s.record_current
        ]
        modules = [s.module for s in present]
        unparsable = next((m for m in modules if isinstance(m, str)), None)
        if unparsable is not None:
            return result(State.TARGET_MISSING, unparsable)
        shapes = [
            classify(t.transform, patch.id, module)  # type: ignore[arg-type]
            for t, module in zip(patch.targets, modules, strict=True)
        ]
        kinds = {shape.kind for shape in shapes}
        if ShapeKind.MISSING in kinds or (ShapeKind.FIXED_UPSTREAM in kinds and len(kinds) > 1):
            detail = next(s.detail for s in shapes if s.kind is not ShapeKind.ORIGINAL)
            return result(State.TARGET_MISSING, detail)
        if kinds == {ShapeKind.FIXED_UPSTREAM}:
            return result(State.FIXED_UPSTREAM, shapes[0].detail)
        for state, shape in zip(present, shapes, strict=True):
            if shape.kind is ShapeKind.ORIGINAL:
                assert shape.new_module is not None
                state.rewrite(shape.new_module, patch.id)
        if drifted:
            return result(State.DRIFTED, _drift_detail(drifted[0]))
        if ShapeKind.ORIGINAL in kinds:
            return result(State.PENDING)
        return result(
            State.APPLIED, "stackpatch markers present, not recorded by this environment's manifest"
        )

    def changes(self) -> tuple[FileChange, ...]:
        planned = []
        for state in self.files.values():
            if not state.added:
                continue
            extends = state.record if state.record_current else None
            base_patches = extends.patches if extends else ()
            new = state.text.encode("utf-8")
            record = FileRecord(
                path=state.key,
                package=state.package,
                version=state.version,
                sha256_before=extends.sha256_before if extends else state.disk_sha,
                sha256_after=sha256_bytes(new),
                patches=tuple(sorted({*base_patches, *state.added}, key=lambda i: int(i[1:]))),
            )
            planned.append(FileChange(state.path, state.disk, new, record, extends))
        return tuple(planned)

    def stale_records(self, changes: Sequence[FileChange]) -> tuple[str, ...]:
        """Records whose file no longer carries any stackpatch change and is not re-patched now."""
        rewritten = {c.record.path for c in changes}
        stale = []
        for key, record in self.manifest.files.items():
            if key in rewritten:
                continue
            path = _absolute(self.env, key)
            try:
                disk = path.read_bytes()
            except FileNotFoundError:
                stale.append(key)
                continue
            if sha256_bytes(disk) != record.sha256_after and not ANY_MARKER.search(
                disk.decode("utf-8", "replace")
            ):
                stale.append(key)
        return tuple(stale)


def _absolute(env: Environment, key: str) -> Path:
    path = Path(key)
    return path if path.is_absolute() else env.site_packages / path


def make_plan(
    patches: Sequence[Patch], env: Environment, manifest: Manifest, include_historical: bool
) -> Plan:
    planner = Planner(env, manifest)
    assessments = tuple(planner.assess(p, include_historical) for p in patches)
    changes = planner.changes()
    return Plan(assessments, changes, planner.stale_records(changes))
