"""Disk I/O for stackpatch's state: atomic writes, the manifest, backups, and the lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from patches.errors import EnvironmentProblem, LockHeld
from patches.manifest import Manifest, parse_manifest

Writer = Callable[[Path, bytes], None]


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so readers see the old bytes or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def remove_stale_bytecode(source: Path) -> list[Path]:
    """Delete the cached bytecode of a rewritten module so Python cannot run the old code."""
    cache = source.parent / "__pycache__"
    removed = []
    for compiled in cache.glob(f"{source.stem}.*.pyc"):
        with contextlib.suppress(FileNotFoundError):
            compiled.unlink()
            removed.append(compiled)
    return removed


class StateStore:
    """The `.stackpatch` folder of one environment."""

    def __init__(self, site_packages: Path, state_dir: Path) -> None:
        self.site_packages = site_packages
        self.state_dir = state_dir

    @property
    def manifest_path(self) -> Path:
        return self.state_dir / "manifest.json"

    @property
    def backups_dir(self) -> Path:
        return self.state_dir / "backups"

    def backup_path(self, sha256_before: str) -> Path:
        return self.backups_dir / sha256_before

    def load(self, tool_version: str) -> Manifest:
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Manifest(tool_version=tool_version)
        except (OSError, UnicodeDecodeError) as exc:
            raise EnvironmentProblem(f"cannot read {self.manifest_path}: {exc}") from None
        return parse_manifest(text, self.manifest_path)

    def save(self, manifest: Manifest, writer: Writer) -> None:
        if manifest.empty:
            self.discard_manifest()
        else:
            writer(self.manifest_path, manifest.to_json().encode())

    def restore_manifest(self, previous_text: bytes | None) -> None:
        if previous_text is None:
            self.discard_manifest()
        else:
            atomic_write(self.manifest_path, previous_text)

    def read_manifest_bytes(self) -> bytes | None:
        try:
            return self.manifest_path.read_bytes()
        except FileNotFoundError:
            return None

    def discard_manifest(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path.unlink()

    def prune_backups(self, keep: set[str]) -> None:
        if not self.backups_dir.is_dir():
            return
        for backup in self.backups_dir.iterdir():
            if backup.name not in keep:
                with contextlib.suppress(OSError):
                    backup.unlink()

    def remove_if_empty(self) -> None:
        """Drop the whole `.stackpatch` folder once nothing is recorded in it."""
        if self.manifest_path.exists():
            return
        with contextlib.suppress(OSError):
            shutil.rmtree(self.backups_dir)
            self.state_dir.rmdir()

    def check_writable(self, files: list[Path]) -> None:
        """Refuse before anything is written when a write would fail for lack of permission."""
        directories = {self.site_packages, *(f.parent for f in files)}
        if self.state_dir.exists():
            directories.add(self.state_dir)
        blocked = sorted(str(d) for d in directories if not os.access(d, os.W_OK))
        blocked += sorted(str(f) for f in files if f.exists() and not os.access(f, os.W_OK))
        if blocked:
            raise EnvironmentProblem(
                f"cannot write to {blocked[0]}"
                + (f" (and {len(blocked) - 1} more)" if len(blocked) > 1 else "")
                + "; nothing was changed: run as the user who owns the environment"
            )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the environment so two applies cannot interleave."""
        try:
            handle = os.open(self.site_packages, os.O_RDONLY)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot open {self.site_packages}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockHeld(
                        f"another stackpatch run is changing {self.site_packages}; "
                        "nothing was changed: wait for it to finish and run again"
                    ) from None
                raise
            yield
        finally:
            os.close(handle)
