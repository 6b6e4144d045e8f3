"""Run tests/torch (the tests that need torch and bitsandbytes) inside the real stack venvs,
with a copy of the stack's transformers patched by P13 first on the path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import stack_python

from patches import __version__
from patches.environment import locate
from patches.registry import load_patches
from patches.store import StateStore
from patches.validate import apply_to_copy, unpatched_copy

pytestmark = pytest.mark.stacks
ROOT = Path(__file__).resolve().parent.parent


def patched_transformers(python: Path, dest: Path) -> Path:
    """A P13-patched copy of the stack's transformers, built the way --validate builds one."""
    p13 = next(p for p in load_patches() if p.id == "P13")
    env = locate({"transformers"}, python=str(python))
    store = StateStore(env.site_packages, env.state_dir)
    unpatched_copy(p13, env, store.load(__version__), store, dest)
    assert apply_to_copy(p13, dest) is None
    return dest


@pytest.mark.parametrize("stack", ["oldest", "newest"])
def test_torch_suite(stack: str, tmp_path: Path) -> None:
    python = stack_python(stack, extra=("pytest",))
    overlay = patched_transformers(python, tmp_path / "overlay")
    paths = [str(overlay), str(ROOT), str(ROOT / "validation")]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    completed = subprocess.run(
        [
            str(python),
            "-m",
            "pytest",
            "-q",
            "--noconftest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT / "tests" / "torch"),
            str(ROOT / "tests" / "torch"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT / "tests" / "torch",
        env=environ,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    assert " passed" in completed.stdout
