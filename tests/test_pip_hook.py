"""pip_and_patch.py: an upgrade through the wrapper leaves the environment patched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli_process, wheel

pytestmark = pytest.mark.wheels

ROOT = Path(__file__).resolve().parent.parent


def wrapper(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "pip_and_patch.py"), *argv],
        capture_output=True,
        text=True,
        check=False,
    )


def test_pip_through_the_wrapper_reapplies(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    peft = str(wheel("peft==0.19.1"))
    install = ("install", "--quiet", "--no-deps", "--no-index", peft)

    first = wrapper("--python", python, *install)
    assert first.returncode == 0, first.stderr
    assert "patched peft/tuners/lora/model.py" in first.stdout
    assert run_cli_process("--verify", "-q", "--python", python).code == 0

    # A reinstall would silently drop the patch; through the wrapper it is re-applied.
    again = wrapper("--python", python, *install, "--force-reinstall")
    assert again.returncode == 0, again.stderr
    assert run_cli_process("--verify", "-q", "--python", python).code == 0

    # Plain pip drops it, and --verify notices.
    subprocess.run([python, "-m", "pip", *install, "--force-reinstall"], check=True)
    drifted = run_cli_process("--verify", "-q", "--python", python)
    assert drifted.code == 1 and "P12" in drifted.out

    # A failing pip passes its exit code through and applies nothing.
    failed = wrapper("--python", python, "install", "--no-index", str(tmp_path / "missing.whl"))
    assert failed.returncode == 1
    assert run_cli_process("--verify", "-q", "--python", python).code == 1


def test_wrapper_without_pip_arguments_is_a_usage_error() -> None:
    result = wrapper()
    assert result.returncode == 2 and "usage:" in result.stderr
