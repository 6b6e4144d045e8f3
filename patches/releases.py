"""Releases that are not installed: list them, fetch their wheels, unpack what patches read.

Everything lands in a cache (`~/.cache/stackpatch`, or `$STACKPATCH_CACHE`) so that a second
`--check --against` or `--matrix` run touches the network only to list versions, and a wheel
already in the cache (or passed as a file) works offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from patches import probe
from patches.errors import StackpatchError

VERSION_LIST_TTL_S = 3600
PIP_TIMEOUT_S = 600


class ReleaseProblem(StackpatchError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("STACKPATCH_CACHE", Path.home() / ".cache" / "stackpatch"))


@dataclass(frozen=True)
class Release:
    """One release of a package, laid out as `pip install` would put it, ready to assess."""

    package: str
    version: str
    location: Path
    origin: str


def wheel_prefix(package: str) -> str:
    """The file-name prefix of a package's wheels (PEP 427 escapes `-` and `.` as `_`)."""
    return re.sub(r"[-_.]+", "_", canonicalize_name(package))


def _pip(python: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [python, "-m", "pip", *args],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReleaseProblem(f"pip {args[0]} failed to run ({exc})") from None


def _pip_error(completed: subprocess.CompletedProcess[str]) -> str:
    lines = [
        line.strip()
        for line in completed.stderr.splitlines()
        if line.strip() and not line.startswith("WARNING")
    ]
    return lines[-1] if lines else f"exit code {completed.returncode}"


def cached_wheel(requirement: Requirement, directory: Path) -> Path | None:
    """A wheel in the cache that satisfies an exact pin, so no index is needed."""
    pins = [s.version for s in requirement.specifier if s.operator in ("==", "===")]
    if len(pins) != 1 or "*" in pins[0]:
        return None
    found = sorted(directory.glob(f"{wheel_prefix(requirement.name)}-{pins[0]}-*.whl"))
    return found[0] if found else None


def download_wheel(requirement: Requirement, python: str = sys.executable) -> Path:
    """The wheel pip would pick for `requirement`, without dependencies, cached by file name."""
    directory = cache_dir() / "wheels"
    directory.mkdir(parents=True, exist_ok=True)
    hit = cached_wheel(requirement, directory)
    if hit is not None:
        return hit
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        completed = _pip(
            python,
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--dest",
            scratch,
            str(requirement),
        )
        wheels = sorted(Path(scratch).glob("*.whl"))
        if completed.returncode != 0 or not wheels:
            raise ReleaseProblem(f"cannot download {requirement}: {_pip_error(completed)}")
        final = directory / wheels[0].name
        os.replace(wheels[0], final)
    return final


def _wheel_members(archive: zipfile.ZipFile, package: str, paths: Iterable[str]) -> list[str]:
    wanted = set(paths)
    prefix = wheel_prefix(package) + "-"
    return [
        name
        for name in archive.namelist()
        if name in wanted
        or (name.endswith(".dist-info/METADATA") and name.lower().startswith(prefix.lower()))
    ]


def unpack_wheel(wheel: Path, package: str, paths: Sequence[str]) -> Path:
    """Extract the wheel's metadata and the given files once; later calls reuse the tree."""
    digest = hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:12]
    tree = cache_dir() / "trees" / f"{wheel.name[: -len('.whl')]}-{digest}"
    if tree.is_dir():
        return tree
    tree.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=tree.parent, prefix=".unpack-"))
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = _wheel_members(archive, package, paths)
            if not any(m.endswith("/METADATA") for m in members):
                raise ReleaseProblem(f"{wheel} is not a wheel of {package} (no dist-info)")
            archive.extractall(scratch, members)
        try:
            os.replace(scratch, tree)
        except OSError:  # another run unpacked it first
            if not tree.is_dir():
                raise
    except (zipfile.BadZipFile, OSError) as exc:
        raise ReleaseProblem(f"{wheel} cannot be read as a wheel ({exc})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return tree


def release_in_tree(tree: Path, packages: Sequence[str], origin: str) -> list[Release]:
    """The known packages found installed in a directory (a site-packages or unpacked wheel)."""
    found = probe.probe(sorted(packages), str(tree))["distributions"]
    return [
        Release(name, info["version"], Path(info["location"]), origin)
        for name, info in sorted(found.items())
    ]


def wheel_package(wheel: Path, packages: Sequence[str]) -> str:
    stem = wheel.name.split("-")[0]
    for name in packages:
        if wheel_prefix(name) == wheel_prefix(stem):
            return name
    raise ReleaseProblem(
        f"{wheel.name}: no patch targets {stem} (patches cover {', '.join(sorted(packages))})"
    )


def resolve_against(
    spec: str, files_by_package: dict[str, list[str]], python: str = sys.executable
) -> list[Release]:
    """`--against` accepts a requirement, a wheel file or a directory; each becomes releases."""
    packages = sorted(files_by_package)
    path = Path(spec).expanduser()
    if path.is_dir():
        releases = release_in_tree(path, packages, spec)
        if not releases:
            raise ReleaseProblem(
                f"--against {spec}: no dist-info of {', '.join(packages)} in that directory; "
                "pass an unpacked wheel or a site-packages directory"
            )
        return releases
    if spec.endswith(".whl") or (os.sep in spec and "@" not in spec):
        if not path.is_file():
            raise ReleaseProblem(f"--against {spec}: no such file")
        package = wheel_package(path, packages)
        tree = unpack_wheel(path, package, files_by_package[package])
        return release_in_tree(tree, [package], spec)
    requirement = parse_requirement(spec, packages)
    package = canonicalize_name(requirement.name)
    wheel = download_wheel(requirement, python)
    tree = unpack_wheel(wheel, package, files_by_package[package])
    return release_in_tree(tree, [package], spec)


def parse_requirement(spec: str, packages: Sequence[str]) -> Requirement:
    try:
        requirement = Requirement(spec)
    except InvalidRequirement:
        raise ReleaseProblem(
            f"{spec!r} is not a requirement, a wheel file or a directory "
            "(e.g. transformers==5.23.0)"
        ) from None
    if canonicalize_name(requirement.name) not in packages:
        raise ReleaseProblem(
            f"{spec}: no patch targets {requirement.name} "
            f"(patches cover {', '.join(sorted(packages))})"
        )
    return requirement


def _parse_versions(text: str) -> list[Version]:
    for line in text.splitlines():
        if line.startswith("Available versions:"):
            versions = []
            for item in line.split(":", 1)[1].split(","):
                try:
                    versions.append(Version(item.strip()))
                except InvalidVersion:
                    continue
            return versions
    return []


def published_versions(package: str, python: str = sys.executable) -> list[Version]:
    """Every release the configured index offers (cached for an hour)."""
    path = cache_dir() / "versions" / f"{canonicalize_name(package)}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if time.time() - cached["fetched"] < VERSION_LIST_TTL_S:
            return [Version(v) for v in cached["versions"]]
    except (OSError, ValueError, KeyError):
        pass
    completed = _pip(python, "index", "versions", package)
    versions = _parse_versions(completed.stdout)
    if not versions:
        raise ReleaseProblem(f"cannot list the releases of {package}: {_pip_error(completed)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"fetched": time.time(), "versions": [str(v) for v in versions]}),
        encoding="utf-8",
    )
    return versions


def select_releases(
    versions: Iterable[Version], requirement: Requirement, every_release: bool
) -> list[Version]:
    """The final releases in the range; by default only the newest patch release per minor."""
    chosen = sorted(
        v for v in versions if not v.is_prerelease and requirement.specifier.contains(v)
    )
    if every_release:
        return chosen
    newest: dict[tuple[int, int], Version] = {}
    for version in chosen:
        newest[(version.major, version.minor)] = version
    return sorted(newest.values())
