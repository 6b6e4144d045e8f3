"""The CPU reproducers on real stacks: the oldest supported releases and the newest.

The stacks are venvs with torch 2.13.0 (CPU), built once and cached (conftest.stack_python).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli_process, stack_python

pytestmark = pytest.mark.stacks


# P2's reproducer needs a CUDA GPU (accelerate offloads to "cpu" only beside one); its
# records come from the lent H100. Here it must say so rather than pass or fail.
GPU_ONLY = "P2"


def validate(stack: str, records: Path) -> dict[str, dict]:
    result = run_cli_process(
        "--validate",
        "--skip",
        GPU_ONLY,
        "--python",
        str(stack_python(stack)),
        "--records",
        str(records),
    )
    assert result.code == 0, result.out + result.err
    return {
        record["patch"]: record
        for record in (json.loads(p.read_text()) for p in sorted(records.glob("*.json")))
    }


def test_oldest_stack_shows_bug_then_fix(tmp_path: Path) -> None:
    records = validate("oldest", tmp_path)
    assert set(records) == {"P10", "P11", "P12", "P13", "P14", "P15", "P16"}
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
    assert "packed expert tensors + attention trained" in records["P15"]["after"]["error"]
    # P16 runs with P14 in both runs (the reproducer trains LoRA on offloaded layers).
    assert records["P16"]["requires"] == ["P14"]
    assert "not finite" in records["P16"]["before"]["error"]
    assert "offloaded layers float" in records["P16"]["after"]["error"]


def test_newest_stack(tmp_path: Path) -> None:
    records = validate("newest", tmp_path)
    assert set(records) == {"P10", "P11", "P12", "P13", "P14", "P15", "P16"}
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
    # transformers 5.23.0 still quantizes the layers device_map="auto" offloads.
    assert records["P16"]["before"]["outcome"] == "bug"
    assert records["P16"]["after"]["outcome"] == "fine"


def test_gpu_only_reproducer_is_inconclusive_on_cpu(tmp_path: Path) -> None:
    result = run_cli_process(
        "--validate", "--only", GPU_ONLY, "--python", str(stack_python("newest")),
        "--records", str(tmp_path),
    )  # fmt: skip
    assert result.code == 1, result.out + result.err
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    for run in ("before", "after"):
        assert record[run]["outcome"] == "inconclusive"
        assert "needs a CUDA GPU" in record[run]["error"]
