"""The CPU reproducers on real stacks: the oldest supported releases and the newest.

The stacks are venvs with torch 2.13.0 (CPU), built once and cached (conftest.stack_python).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli_process, stack_python

pytestmark = pytest.mark.stacks


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
    assert set(records) == {"P10", "P11", "P12", "P13", "P14", "P15"}
    for record in records.values():
        assert record["before"]["outcome"] == "bug"
        assert record["after"]["outcome"] == "fine"
        assert record["after"]["fixed"] is True
        assert record["device"] == "cpu"
        assert record["torch"].startswith("2.13.0")
    assert "mm_token_type_ids" in records["P10"]["before"]["error"]
    assert "_is_hf_initialized" in records["P11"]["before"]["error"]
    assert "expected device meta" in records["P14"]["before"]["error"]
    # P15 runs on a copy of transformers with P13 applied, in both runs.
    assert records["P15"]["requires"] == ["P13"]
    assert "may not change the dtype" in records["P15"]["before"]["error"]
    assert "llm_int8_skip_modules" in records["P15"]["after"]["error"]


def test_newest_stack(tmp_path: Path) -> None:
    records = validate("newest", tmp_path)
    assert set(records) == {"P10", "P11", "P12", "P13", "P14", "P15"}
    for fixed_upstream in ("P10", "P11"):
        assert records[fixed_upstream]["before"]["outcome"] == "fine"
        assert records[fixed_upstream]["after"]["outcome"] == "not-applicable"
    # PEFT still rejects the vision tower's wrapper in its newest release.
    assert records["P12"]["before"]["outcome"] == "bug"
    assert records["P12"]["after"]["outcome"] == "fine"
    assert "Gemma4ClippableLinear" in records["P12"]["before"]["error"]
    # Stock transformers still leaves Gemma 4's experts in BF16 under load_in_4bit.
    assert records["P13"]["before"]["outcome"] == "bug"
    assert records["P13"]["after"]["outcome"] == "fine"
    assert "stays torch.bfloat16" in records["P13"]["before"]["error"]
    # PEFT still puts the adapters of offloaded layers on the meta device.
    assert records["P14"]["before"]["outcome"] == "bug"
    assert records["P14"]["after"]["outcome"] == "fine"
    # PEFT still fails obscurely on P13's packed experts.
    assert records["P15"]["before"]["outcome"] == "bug"
    assert records["P15"]["after"]["outcome"] == "fine"
    assert records["P10"]["packages"]["transformers"] == "5.23.0"
    assert records["P11"]["packages"]["bitsandbytes"] == "0.50.2"
