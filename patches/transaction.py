"""Transact: write a plan all-or-nothing, and undo it byte for byte."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from patches.errors import StackpatchError
from patches.manifest import FileRecord, Manifest, sha256_bytes
from patches.model import ANY_MARKER
from patches.plan import FileChange, Plan
from patches.store import StateStore, Writer, atomic_write, remove_stale_bytecode


class CompileCheckFailed(StackpatchError):
    pass


class RevertRefused(StackpatchError):
    pass


@dataclass(frozen=True)
class Outcome:
    written: tuple[str, ...]
    dropped: tuple[str, ...] = ()


def check_compiles(changes: Sequence[FileChange]) -> None:
    for change in changes:
        try:
            compile(change.new, str(change.path), "exec", dont_inherit=True)
        except SyntaxError as exc:
            raise CompileCheckFailed(
                f"patched {change.record.path} would not compile ({exc.msg}, line {exc.lineno}); "
                "nothing was changed: please report this with --diff output"
            ) from None


def _absolute(store: StateStore, key: str) -> Path:
    path = Path(key)
    return path if path.is_absolute() else store.site_packages / path


def apply_plan(
    plan: Plan,
    manifest: Manifest,
    store: StateStore,
    tool_version: str,
    writer: Writer = atomic_write,
) -> Outcome:
    """Write every planned file, or none: any failure restores what was already written.

    Order: backups, then the manifest naming the files in flight (so a crash can be
    undone with --revert), then the files, then the final manifest.
    """
    changes = plan.changes
    if not changes and not plan.stale:
        return Outcome(written=())
    check_compiles(changes)
    store.check_writable([c.path for c in changes])

    files = {k: r for k, r in manifest.files.items() if k not in plan.stale}
    files.update({c.record.path: c.record for c in changes})
    final = manifest.with_files(files, tool_version)
    in_flight = replace(manifest, in_flight=tuple(c.record for c in changes))

    previous_manifest = store.read_manifest_bytes()
    new_backups: list[Path] = []
    touched: list[FileChange] = []
    try:
        for change in changes:
            backup = store.backup_path(change.record.sha256_before)
            if change.needs_backup and not backup.exists():
                new_backups.append(backup)
                writer(backup, change.original)
        if changes:
            writer(store.manifest_path, in_flight.to_json().encode())
        for change in changes:
            touched.append(change)
            writer(change.path, change.new)
            remove_stale_bytecode(change.path)
        store.save(final, writer)
    except BaseException:
        _roll_back(touched, new_backups, store, previous_manifest)
        raise
    store.prune_backups({r.backup_name for r in final.files.values()})
    store.remove_if_empty()
    return Outcome(tuple(c.record.path for c in changes), plan.stale)


def _roll_back(
    touched: list[FileChange], backups: list[Path], store: StateStore, manifest: bytes | None
) -> None:
    # The rollback writes directly: the writer that just failed may fail again.
    for change in reversed(touched):
        if change.path.read_bytes() != change.original:
            atomic_write(change.path, change.original)
            remove_stale_bytecode(change.path)
    store.restore_manifest(manifest)
    for backup in backups:
        with contextlib.suppress(FileNotFoundError):
            backup.unlink()
    store.remove_if_empty()


@dataclass(frozen=True)
class _Restore:
    path: Path
    record: FileRecord
    data: bytes


def plan_revert(
    manifest: Manifest, store: StateStore, only: set[str] | None
) -> tuple[list[_Restore], list[str]]:
    """Decide what --revert restores; refuse (changing nothing) when it would lose data."""
    records = {r.path: r for r in manifest.in_flight}
    records.update(manifest.files)
    restores: list[_Restore] = []
    dropped: list[str] = []
    problems: list[str] = []
    for key, record in records.items():
        if only is not None and not only & set(record.patches):
            continue
        if only is not None and set(record.patches) - only:
            problems.append(
                f"{key} also carries {', '.join(sorted(set(record.patches) - only))}; "
                "revert the patches of one file together"
            )
            continue
        path = _absolute(store, key)
        try:
            current = sha256_bytes(path.read_bytes())
        except FileNotFoundError:
            dropped.append(key)
            continue
        if current == record.sha256_before:
            dropped.append(key)
            continue
        if current != record.sha256_after:
            text = path.read_bytes().decode("utf-8", "replace")
            if ANY_MARKER.search(text):
                problems.append(
                    f"{key} was edited after stackpatch patched it; restoring the original would "
                    f"lose those edits: reinstall {record.package}=={record.version} instead"
                )
            else:
                dropped.append(key)
            continue
        backup = store.backup_path(record.backup_name)
        try:
            data = backup.read_bytes()
        except FileNotFoundError:
            problems.append(
                f"the backup of {key} is missing ({backup}); reinstall "
                f"{record.package}=={record.version} to get the original file back"
            )
            continue
        if sha256_bytes(data) != record.sha256_before:
            problems.append(
                f"the backup of {key} does not match its recorded hash; reinstall "
                f"{record.package}=={record.version} to get the original file back"
            )
            continue
        restores.append(_Restore(path, record, data))
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise RevertRefused(f"nothing was reverted: {problems[0]}{more}")
    return restores, dropped


def revert(
    manifest: Manifest,
    store: StateStore,
    tool_version: str,
    only: set[str] | None = None,
    writer: Writer = atomic_write,
) -> Outcome:
    """Restore the original bytes of every patched file and prove each by its hash."""
    restores, dropped = plan_revert(manifest, store, only)
    store.check_writable([r.path for r in restores])
    for restore in restores:
        writer(restore.path, restore.data)
        remove_stale_bytecode(restore.path)
        if sha256_bytes(restore.path.read_bytes()) != restore.record.sha256_before:
            raise StackpatchError(
                f"{restore.record.path} does not match its original hash after restore; "
                "run --revert again"
            )
    gone = {r.record.path for r in restores} | set(dropped)
    remaining = {k: r for k, r in manifest.files.items() if k not in gone}
    final = replace(manifest.with_files(remaining, tool_version), in_flight=())
    store.save(final, writer)
    store.prune_backups({r.backup_name for r in final.files.values()})
    store.remove_if_empty()
    return Outcome(tuple(r.record.path for r in restores), tuple(dropped))
