"""Run tests/torch (the tests that need torch and bitsandbytes) inside the real stack venvs,
with copies of the stack's transformers patched by P13 and peft patched by P15 first on the
path (the stack's own, unpatched packages stay reachable for tests that compare with stock
behaviour in a subprocess), tests/patched_bnb with a copy of its bitsandbytes patched by
P17, and tests/triton (the fused 4-bit kernels) in Triton's CPU interpreter."""

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
TRITON = "triton==3.9.0"


OVERLAY_PATCHES = ("P13", "P15", "P19")  # 4-bit experts, LoRA on them, checkpoint pages released


def patched_overlay(python: Path, dest: Path, patch_ids: tuple[str, ...] = OVERLAY_PATCHES) -> Path:
    """Copies of the stack's packages that `patch_ids` target, patched, built the way
    --validate builds its copies."""
    chosen = [p for p in load_patches() if p.id in patch_ids]
    env = locate({p.package for p in chosen}, python=str(python))
    store = StateStore(env.site_packages, env.state_dir)
    for patch in chosen:
        unpatched_copy(patch, env, store.load(__version__), store, dest)
        assert apply_to_copy(patch, dest) is None
    return dest


def run_pytest(python: Path, suite: Path, paths: list[str], **environ: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **environ}
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
            str(suite),
            str(suite),
        ],
        capture_output=True,
        text=True,
        cwd=suite,
        env=env,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    assert " passed" in completed.stdout


# The newest stack also carries Triton (as CUDA installs of torch do), so P13's injected
# code is imported with it present there and without it on the oldest stack.
EXTRAS = {"oldest": ("pytest",), "newest": ("pytest", TRITON)}


@pytest.mark.parametrize("stack", ["oldest", "newest"])
def test_torch_suite(stack: str, tmp_path: Path) -> None:
    python = stack_python(stack, extra=EXTRAS[stack])
    overlay = patched_overlay(python, tmp_path / "overlay")
    paths = [str(overlay), str(ROOT), str(ROOT / "validation")]
    run_pytest(python, ROOT / "tests" / "torch", paths)


@pytest.mark.parametrize("stack", ["oldest", "newest"])
def test_p17_patched_cpu_dequantization(stack: str, tmp_path: Path) -> None:
    """tests/patched_bnb: P17's bitsandbytes on this CPU, whichever branch its kernel takes."""
    python = stack_python(stack, extra=EXTRAS[stack])
    overlay = patched_overlay(python, tmp_path / "overlay", ("P17",))
    run_pytest(python, ROOT / "tests" / "patched_bnb", [str(overlay), str(ROOT / "validation")])


def test_fused_kernel_in_the_triton_interpreter() -> None:
    """tests/triton: the fused 4-bit kernels run on CPU by Triton's interpreter."""
    python = stack_python("newest", extra=EXTRAS["newest"])
    run_pytest(python, ROOT / "tests" / "triton", [str(ROOT)], TRITON_INTERPRET="1")
