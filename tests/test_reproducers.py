"""The CPU reproducers on real stacks: the oldest supported releases and the newest.

Each stack is a venv with torch 2.13.0 (CPU) built once and cached in
~/.cache/stackpatch/venvs (STACKPATCH_VENV_CACHE); the first build takes a minute or two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli_process

pytestmark = pytest.mark.stacks

VENV_CACHE = Path(
    os.environ.get("STACKPATCH_VENV_CACHE", Path.home() / ".cache" / "stackpatch" / "venvs")
)
# torch is pinned on the same line so pip never pulls a multi-GB CUDA build.
STACKS = {
    "oldest": (
        "torch==2.13.0",
        "transformers==5.5.4",
        "peft==0.19.1",
        "bitsandbytes==0.49.2",
        "accelerate==1.13.0",
    ),
    "newest": (
        "torch==2.13.0",
        "transformers==5.23.0",
        "peft==0.21.2",
        "bitsandbytes==0.50.2",
        "accelerate==1.15.0",
    ),
}


def stack_python(name: str) -> Path:
    venv = VENV_CACHE / "-".join(s.replace("==", "") for s in STACKS[name])
    done = venv / ".complete"
    if not done.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [
                venv / "bin" / "python",
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *STACKS[name],
            ],
            check=True,
        )
        done.write_text("\n".join(STACKS[name]))
    return venv / "bin" / "python"


def validate(stack: str, records: Path) -> dict[str, dict]:
    result = run_cli_process(
        "--validate", "--python", str(stack_python(stack)), "--records", str(records)
    )
    assert result.code == 0, result.out + result.err
    return {
        record["patch"]: record
        for record in (json.loads(p.read_text()) for p in sorted(records.glob("*.json")))
    }


def test_oldest_stack_shows_bug_then_fix(tmp_path: Path) -> None:
    records = validate("oldest", tmp_path)
    assert set(records) == {"P10", "P11", "P12"}
    for record in records.values():
        assert record["before"]["outcome"] == "bug"
        assert record["after"]["outcome"] == "fine"
        assert record["after"]["fixed"] is True
        assert record["device"] == "cpu"
        assert record["torch"].startswith("2.13.0")
    assert "mm_token_type_ids" in records["P10"]["before"]["error"]
    assert "_is_hf_initialized" in records["P11"]["before"]["error"]


def test_newest_stack(tmp_path: Path) -> None:
    records = validate("newest", tmp_path)
    assert set(records) == {"P10", "P11", "P12"}
    for fixed_upstream in ("P10", "P11"):
        assert records[fixed_upstream]["before"]["outcome"] == "fine"
        assert records[fixed_upstream]["after"]["outcome"] == "not-applicable"
    # PEFT still rejects the vision tower's wrapper in its newest release.
    assert records["P12"]["before"]["outcome"] == "bug"
    assert records["P12"]["after"]["outcome"] == "fine"
    assert "Gemma4ClippableLinear" in records["P12"]["before"]["error"]
    assert records["P10"]["packages"]["transformers"] == "5.23.0"
    assert records["P11"]["packages"]["bitsandbytes"] == "0.50.2"
