"""--validate: run each patch's reproducer on throw-away copies of the target packages,
unpatched then patched, in the target environment, and record what happened.

A reproducer prints one JSON line `{"outcome": "bug"|"fine", "error", "torch", "device"}` and
exits 1 on the bug, 0 without it (validation/tiny_gemma4.py has the helpers). Anything else
is inconclusive and proves nothing either way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from patches import __version__
from patches.environment import Environment, locate
from patches.errors import StackpatchError
from patches.manifest import Manifest
from patches.model import Patch
from patches.plan import make_plan
from patches.store import StateStore, atomic_write
from patches.transaction import apply_plan

ROOT = Path(__file__).resolve().parent.parent
VALIDATION_DIR = ROOT / "validation"
STACK = ("transformers", "peft", "bitsandbytes", "accelerate")
REPRODUCER_TIMEOUT_S = 900


@dataclass(frozen=True)
class Run:
    outcome: str  # "bug", "fine", "inconclusive", or "not-applicable" (the patch did not apply)
    error: str
    torch: str
    device: str


@dataclass(frozen=True)
class Validation:
    patch: Patch
    env: Environment
    before: Run
    after: Run

    @property
    def proves_fix(self) -> bool:
        return self.before.outcome == "bug" and self.after.outcome == "fine"

    def record(self) -> dict:
        return {
            "patch": self.patch.id,
            "packages": self.env.versions(),
            "python": self.env.python_version,
            "torch": self.before.torch or self.after.torch,
            "device": self.before.device or self.after.device,
            "date": date.today().isoformat(),
            "tool_version": __version__,
            "reproducer": self.patch.reproducer,
            **({"requires": list(self.patch.requires)} if self.patch.requires else {}),
            "before": {
                "reproduced": self.before.outcome == "bug",
                "outcome": self.before.outcome,
                "error": self.before.error,
            },
            "after": {
                "fixed": self.proves_fix,
                "outcome": self.after.outcome,
                "error": self.after.error,
            },
        }

    def record_name(self) -> str:
        version = self.env.versions().get(self.patch.package, "none")
        device = (self.before.device or "unknown").lower().replace(" ", "-")
        return f"{self.patch.id}__{self.patch.package}-{version}__{device}.json"


def _package_dirs(patch: Patch) -> set[str]:
    return {target.path.split("/", 1)[0] for target in patch.targets}


def unpatched_copy(
    patch: Patch, env: Environment, manifest: Manifest, store: StateStore, dest: Path
) -> None:
    """Copy the patch's packages to `dest` with every file at its original, unpatched bytes."""
    dist = env.distribution(patch.package)
    assert dist is not None
    for top in _package_dirs(patch):
        if (dest / top).exists():  # a required patch of the same package copied it already
            continue
        shutil.copytree(
            dist.location / top, dest / top, ignore=shutil.ignore_patterns("__pycache__")
        )
        for key, record in manifest.files.items():
            if key.startswith(f"{top}/"):
                atomic_write(dest / key, store.backup_path(record.backup_name).read_bytes())
    info = dest / f"{dist.name}-{dist.version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist.name}\nVersion: {dist.version}\n"
    )


def apply_to_copy(patch: Patch, overlay: Path) -> str | None:
    """Apply `patch` to the overlay; say why not when it does not apply (e.g. fixed upstream)."""
    env = locate({patch.package}, site_packages=str(overlay))
    store = StateStore(env.site_packages, env.state_dir)
    manifest = store.load(__version__)
    plan = make_plan((patch,), env, manifest, include_historical=True)
    if not plan.changes:
        state = plan.assessments[0]
        return f"{state.state.value}: {state.detail}"
    apply_plan(plan, manifest, store, __version__)
    return None


def _run_reproducer(python: str, reproducer: Path, overlay: Path) -> Run:
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(overlay), str(VALIDATION_DIR), *filter(None, [environ.get("PYTHONPATH")])]
    )
    environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        completed = subprocess.run(
            [python, str(reproducer)],
            capture_output=True,
            text=True,
            env=environ,
            cwd=overlay,
            timeout=REPRODUCER_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Run("inconclusive", f"timed out after {REPRODUCER_TIMEOUT_S} s", "", "")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return Run("inconclusive", f"exit {completed.returncode}: {tail}", "", "")
    expected = {"bug": 1, "fine": 0}.get(report.get("outcome"))
    outcome = report["outcome"] if expected == completed.returncode else "inconclusive"
    return Run(outcome, report.get("error", ""), report.get("torch", ""), report.get("device", ""))


def _required(patch: Patch) -> tuple[Patch, ...]:
    from patches.registry import load_patches  # the catalog imports this engine's modules

    catalog = {p.id: p for p in load_patches()}  # load_patches checks that the ids exist
    return tuple(catalog[i] for i in patch.requires)


def validate(patch: Patch, python: str | None, site_packages: str | None) -> Validation:
    if not patch.reproducer:
        raise StackpatchError(f"{patch.id} has no reproducer")
    required = _required(patch)
    packages = [patch.package, *(r.package for r in required)]
    env = locate({*packages, *STACK}, python, site_packages)
    for package in packages:
        if env.distribution(package) is None:
            raise StackpatchError(
                f"{package} is not installed in the target environment; "
                "point --python at an environment with the stack the reproducer needs"
            )
    store = StateStore(env.site_packages, env.state_dir)
    manifest = store.load(__version__)
    reproducer = ROOT / patch.reproducer
    with tempfile.TemporaryDirectory(prefix=f"stackpatch-{patch.id}-") as scratch:
        unpatched, patched = Path(scratch) / "unpatched", Path(scratch) / "patched"
        for copied in (patch, *required):
            unpatched_copy(copied, env, manifest, store, unpatched)
        # Both runs see the required patches; only `patch` differs between them.
        missing = [f"{r.id} {why}" for r in required if (why := apply_to_copy(r, unpatched))]
        if missing:
            why = f"required patch not applied: {'; '.join(missing)}"
            cannot = Run("inconclusive", why, "", "")
            return Validation(patch, env, cannot, cannot)
        shutil.copytree(unpatched, patched)
        not_applied = apply_to_copy(patch, patched)
        before = _run_reproducer(env.python, reproducer, unpatched)
        if not_applied is None:
            after = _run_reproducer(env.python, reproducer, patched)
        else:
            after = Run("not-applicable", not_applied, "", "")
    return Validation(patch, env, before, after)


def write_record(validation: Validation, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / validation.record_name()
    atomic_write(path, (json.dumps(validation.record(), indent=2) + "\n").encode())
    return path
