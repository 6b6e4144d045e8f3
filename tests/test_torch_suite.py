"""Run tests/torch (the tests that need torch and bitsandbytes) inside the real stack venvs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import stack_python

pytestmark = pytest.mark.stacks
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stack", ["oldest", "newest"])
def test_torch_suite(stack: str) -> None:
    python = stack_python(stack, extra=("pytest",))
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
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
