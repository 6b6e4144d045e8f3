"""The manifest: what stackpatch changed in one environment, and how to undo it.

It lives in `<site-packages>/.stackpatch/manifest.json` beside content-addressed backups
(`backups/<sha256>`), so the state travels with the environment and a byte-exact original
can always be found by the hash the manifest records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from patches.errors import ManifestError

FORMAT = "stackpatch-manifest"
FORMAT_VERSION = 1


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str | None:
    try:
        return sha256_bytes(path.read_bytes())
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class FileRecord:
    """One rewritten file: its original and patched hashes and the patches it carries."""

    path: str
    package: str
    version: str
    sha256_before: str
    sha256_after: str
    patches: tuple[str, ...]

    @property
    def backup_name(self) -> str:
        return self.sha256_before


@dataclass(frozen=True)
class Manifest:
    tool_version: str
    files: dict[str, FileRecord] = field(default_factory=dict)
    # Set while an apply is writing; a crash leaves it behind so --revert can finish the job.
    in_flight: tuple[FileRecord, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.files and not self.in_flight

    def record_for(self, path: str) -> FileRecord | None:
        return self.files.get(path)

    def with_files(self, files: dict[str, FileRecord], tool_version: str) -> Manifest:
        return replace(self, files=dict(sorted(files.items())), tool_version=tool_version)

    def to_json(self) -> str:
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tool_version": self.tool_version,
            "files": [_record_json(r) for r in self.files.values()],
            "in_flight": [_record_json(r) for r in self.in_flight],
        }
        return json.dumps(payload, indent=2, sort_keys=False) + "\n"


def _record_json(record: FileRecord) -> dict:
    data = asdict(record)
    data["patches"] = list(record.patches)
    return data


def _record_from(data: object, source: Path) -> FileRecord:
    try:
        assert isinstance(data, dict)
        return FileRecord(
            path=str(data["path"]),
            package=str(data["package"]),
            version=str(data["version"]),
            sha256_before=str(data["sha256_before"]),
            sha256_after=str(data["sha256_after"]),
            patches=tuple(str(p) for p in data["patches"]),
        )
    except (AssertionError, KeyError, TypeError) as exc:
        raise ManifestError(
            f"{source} has a malformed file record ({exc.__class__.__name__}: {exc}); "
            "it was left untouched: restore it from a copy or reinstall the patched packages "
            "and delete the .stackpatch folder"
        ) from None


def parse_manifest(text: str, source: Path) -> Manifest:
    """Parse manifest JSON, refusing anything corrupt or not written by stackpatch."""
    advice = (
        "it was left untouched: if you reinstalled the patched packages, delete the "
        f"{source.parent} folder and run --apply again"
    )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"{source} is corrupt ({exc.msg} at line {exc.lineno}); {advice}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{source} is not a stackpatch manifest; {advice}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{source} has format version {data.get('format_version')!r}, this stackpatch reads "
            f"version {FORMAT_VERSION}; use the stackpatch release that wrote it"
        )
    files = [_record_from(item, source) for item in data.get("files", [])]
    in_flight = tuple(_record_from(item, source) for item in data.get("in_flight", []))
    return Manifest(
        tool_version=str(data.get("tool_version", "")),
        files={r.path: r for r in files},
        in_flight=in_flight,
    )
