"""stackpatch as a library: what a training script asks before it starts."""

from __future__ import annotations

from collections.abc import Collection

from patches import __version__
from patches.environment import locate
from patches.plan import make_plan
from patches.registry import load_patches
from patches.report import interrupted_apply, problems_for
from patches.store import StateStore


def verify_problems(ids: Collection[str] | None = None, python: str | None = None) -> list[str]:
    """`--verify` for the given patch ids (default: all), as problem lines; empty means ready.

    Reads only: the manifest and the target files' hashes, like `--verify`.
    """
    chosen = [p for p in load_patches() if ids is None or p.id in ids]
    env = locate({p.package for p in chosen}, python)
    manifest = StateStore(env.site_packages, env.state_dir).load(__version__)
    plan = make_plan(chosen, env, manifest, include_historical=False)
    return [*interrupted_apply(manifest), *problems_for("verify", plan.assessments)]
