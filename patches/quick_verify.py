"""`--verify` from the manifest, the installed versions and the files' hashes alone.

Imports neither libcst, rich nor the catalog's transform modules (`patches.declared` reads
the patches' metadata from the catalog's source), so it answers in a fraction of the full
engine's time and works in a training environment that lacks stackpatch's dependencies.

What settles a patch's state without parsing its target files:
- applied: every target file is recorded for the patch and has the recorded patched bytes;
- drifted: recorded, and each target file either still has the patched bytes or is back to
  the original bytes the patch was computed from (a reinstall);
- fixed-upstream: the installed release is outside the patch's range; target-missing: a
  target file is not there; not-installed; skipped (historical, unless asked for).
Anything else depends on the code's shape: a patch the manifest does not record can be
pending, target-missing, fixed upstream in a backport, or applied by hand, and a recorded
file whose bytes match neither hash may be edited or replaced. Then the full engine decides
the whole selection, exactly as `--verify` always did; where libcst is not importable (a
training environment), such a patch is a problem line ("not applied", or "drifted" for an
edited recorded file): `--verify` fails on it too, unless upstream's fix is in the code.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from patches import __version__
from patches.declared import read_catalog
from patches.environment import Environment, locate
from patches.manifest import FileRecord, Manifest, sha256_bytes
from patches.model import VERIFY_PROBLEMS, PatchInfo, State
from patches.problems import ADVICE, drift_detail, interrupted_apply, problem_line, problems_for
from patches.registry import choose
from patches.store import StateStore

NOT_APPLIED = "not applied"
NOT_APPLIED_ADVICE = (
    "not recorded in this environment's manifest; run `python apply_patches.py --apply`"
)


@dataclass(frozen=True)
class _File:
    """A target file as found on disk (None: not there), with the manifest's record of it."""

    key: str
    data: bytes | None
    sha: str | None
    record: FileRecord | None

    def recorded_for(self, patch_id: str) -> FileRecord | None:
        return self.record if self.record and patch_id in self.record.patches else None


@dataclass(frozen=True)
class QuickAssessment:
    info: PatchInfo
    installed_version: str | None
    # None when only the code's shape can tell; `unsettled` is then the problem line a
    # verify without libcst reports for it.
    state: State | None
    detail: str = ""
    unsettled: str = ""

    @property
    def problem(self) -> str:
        """Its `--verify` problem line; empty when it is not one."""
        if self.state is None:
            return self.unsettled
        if self.state not in VERIFY_PROBLEMS:
            return ""
        info = self.info
        advice = ADVICE[self.state]
        return problem_line(
            info.id, info.package, self.installed_version, self.state, advice, self.detail
        )


class _Disk:
    """Reads each target file once, however many patches share it."""

    def __init__(self, env: Environment, manifest: Manifest) -> None:
        self.env = env
        self.manifest = manifest
        self.files: dict[Path, _File] = {}

    def file(self, path: Path) -> _File:
        if path not in self.files:
            try:
                data: bytes | None = path.read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                data = None
            key = self.env.manifest_key(path)
            sha = None if data is None else sha256_bytes(data)
            self.files[path] = _File(key, data, sha, self.manifest.record_for(key))
        return self.files[path]


def assess(info: PatchInfo, disk: _Disk, include_historical: bool) -> QuickAssessment:
    """The patch's state where the manifest and the hashes settle it (see the module doc)."""
    dist = disk.env.distribution(info.package)
    if not info.recommended and not include_historical:
        return QuickAssessment(
            info,
            dist.version if dist else None,
            State.SKIPPED,
            "historical: off unless --include-historical",
        )
    if dist is None:
        return QuickAssessment(info, None, State.NOT_INSTALLED)
    version = dist.version

    def settled(state: State, detail: str = "") -> QuickAssessment:
        return QuickAssessment(info, version, state, detail)

    files = [disk.file(dist.location / path) for path in info.paths]
    records = [f.recorded_for(info.id) for f in files]
    pairs = list(zip(files, records, strict=True))
    if all(r is not None and f.sha == r.sha256_after for f, r in pairs):
        return settled(State.APPLIED, "recorded in the manifest; hashes match")
    if not info.affects(version):
        outside = f"{info.package} {version} is outside {info.affected}"
        return settled(State.FIXED_UPSTREAM, outside)
    missing = [path for path, f in zip(info.paths, files, strict=True) if f.sha is None]
    if missing:
        return settled(State.TARGET_MISSING, f"{missing[0]} is not in {info.package} {version}")
    drifted = [(f, r) for f, r in pairs if r is not None and f.sha != r.sha256_after]
    if not drifted:
        line = problem_line(info.id, info.package, version, NOT_APPLIED, NOT_APPLIED_ADVICE, "")
        return QuickAssessment(info, version, None, unsettled=line)
    first, record = drifted[0]
    reinstalled = all(r is not None for r in records) and all(
        f.sha == r.sha256_before for f, r in drifted
    )
    if reinstalled:  # the bytes the patch was computed from: the full engine says drifted too
        return settled(
            State.DRIFTED, drift_detail(first.key, first.sha or "", record.sha256_before, "")
        )
    text = (first.data or b"").decode("utf-8", "replace")
    detail = drift_detail(first.key, first.sha or "", record.sha256_before, text)
    # Edited or replaced: the code's shape decides between drifted and target-missing.
    return QuickAssessment(info, version, None, unsettled=settled(State.DRIFTED, detail).problem)


def _full_engine_problems(
    ids: Collection[str], env: Environment, manifest: Manifest, include_historical: bool
) -> list[str] | None:
    """`--verify`'s answer from the full engine, or None where libcst is not importable."""
    try:
        from patches.plan import make_plan
        from patches.registry import load_patches
    except ModuleNotFoundError as missing:
        if (missing.name or "").partition(".")[0] != "libcst":
            raise
        return None
    patches = [p for p in load_patches() if p.id in ids]
    plan = make_plan(patches, env, manifest, include_historical)
    return [*interrupted_apply(manifest), *problems_for("verify", plan.assessments)]


def problems(
    infos: Sequence[PatchInfo],
    python: str | None = None,
    site_packages: str | None = None,
    include_historical: bool = False,
) -> list[str]:
    """`--verify`'s problem lines for these patches; empty means every one is in place."""
    env = locate({i.package for i in infos}, python, site_packages)
    manifest = StateStore(env.site_packages, env.state_dir).load(__version__)
    disk = _Disk(env, manifest)
    assessments = [assess(info, disk, include_historical) for info in infos]
    if any(a.state is None for a in assessments):
        full = _full_engine_problems({i.id for i in infos}, env, manifest, include_historical)
        if full is not None:
            return full
    lines = (a.problem for a in assessments)
    return [*interrupted_apply(manifest), *(line for line in lines if line)]


def takes(args: argparse.Namespace) -> bool:
    """True for the command lines this module answers: `--verify -q` without --json."""
    return (
        args.command == "verify"
        and args.quiet
        and not (args.json or args.against or args.matrix or args.every_release)
    )


def run(args: argparse.Namespace) -> int:
    chosen, include_historical = choose(
        read_catalog(), args.only, args.skip, args.include_historical
    )
    found = problems(chosen, args.python, args.site_packages, include_historical)
    for line in found:
        print(f"problem: {line}")
    return 1 if found else 0
