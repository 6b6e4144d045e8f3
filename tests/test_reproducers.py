"""The CPU reproducers on real stacks: the oldest supported releases and the newest.

The stacks are venvs with torch 2.13.0 (CPU), built once and cached (conftest.stack_python).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli_process, stack_python

from validation.tiny_gemma4 import cpu_has_avx512f

pytestmark = pytest.mark.stacks


# P2's reproducer needs a CUDA GPU (accelerate offloads to "cpu" only beside one); its
# records come from the lent H100. Here it must say so rather than pass or fail.
GPU_ONLY = "P2"
# P17's bug lives in the AVX-512 branch of bitsandbytes' native CPU library, which only a
# CPU with AVX-512F takes: test_p17_reproducer_on_this_cpu checks what this CPU can show.
AVX512_ONLY = "P17"
CPU_REPRODUCERS = {"P10", "P11", "P12", "P13", "P14", "P15", "P16", "P18", "P19", "P20"}


def validate(stack: str, records: Path, *only: str) -> tuple[int, dict[str, dict], str]:
    """--validate on a stack (every CPU reproducer, or `only`): exit code, records, output."""
    selection = ("--only", ",".join(only)) if only else ("--skip", f"{GPU_ONLY},{AVX512_ONLY}")
    result = run_cli_process(
        "--validate", *selection, "--python", str(stack_python(stack)), "--records", str(records)
    )
    found = {
        record["patch"]: record
        for record in (json.loads(p.read_text()) for p in sorted(records.glob("*.json")))
    }
    return result.code, found, result.out + result.err


def test_oldest_stack_shows_bug_then_fix(tmp_path: Path) -> None:
    code, records, output = validate("oldest", tmp_path)
    assert code == 0, output
    assert set(records) == CPU_REPRODUCERS
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
    # P18's two ranks iterate Gemma 4's attention types in different orders.
    assert "DDP's broadcast changed" in records["P18"]["before"]["error"]
    assert "unchanged by DDP's broadcast" in records["P18"]["after"]["error"]
    # P19: the checkpoint's pages stay resident until loading ends, unpatched.
    assert "every page read stays mapped" in records["P19"]["before"]["error"]
    assert "pages leave once it is copied" in records["P19"]["after"]["error"]
    # P20: a converter copied per checkpoint key of a 4-bit checkpoint, most never used.
    assert "80 of them never used" in records["P20"]["before"]["error"]
    assert "one copy per converted parameter" in records["P20"]["after"]["error"]


def test_newest_stack(tmp_path: Path) -> None:
    code, records, output = validate("newest", tmp_path)
    assert code == 0, output
    assert set(records) == CPU_REPRODUCERS
    for fixed_upstream in ("P10", "P11", "P18"):
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
    # transformers 5.23.0 still keeps every page of the checkpoint it has read resident.
    assert records["P19"]["before"]["outcome"] == "bug"
    assert records["P19"]["after"]["outcome"] == "fine"
    # ... and copies a weight converter for every key of a 4-bit checkpoint.
    assert records["P20"]["before"]["outcome"] == "bug"
    assert records["P20"]["after"]["outcome"] == "fine"


@pytest.mark.parametrize("stack", ["oldest", "newest"])
def test_p17_reproducer_on_this_cpu(stack: str, tmp_path: Path) -> None:
    """With AVX-512F (this test's outcome depends on the CPU): the bug unpatched, fixed
    patched, on bitsandbytes 0.49.2 and 0.50.2 alike. Without: both runs inconclusive, saying
    what they need, and --validate exits 1. CI on either kind of CPU checks its branch."""
    code, records, output = validate(stack, tmp_path, AVX512_ONLY)
    record = records[AVX512_ONLY]
    if cpu_has_avx512f():
        assert code == 0, output
        assert record["before"]["outcome"] == "bug" and record["after"]["fixed"] is True
        assert "wrong scales" in record["before"]["error"]
        assert "Linear4bit(96, 128)" in record["before"]["error"]
        assert "AVX-512F" in record["after"]["error"]
        assert record["device"] == "cpu"
    else:
        assert code == 1, output
        for run in ("before", "after"):
            assert record[run]["outcome"] == "inconclusive"
            assert "needs an x86 CPU with AVX-512F" in record[run]["error"]


def test_gpu_only_reproducer_is_inconclusive_on_cpu(tmp_path: Path) -> None:
    code, records, output = validate("newest", tmp_path, GPU_ONLY)
    assert code == 1, output
    record = records[GPU_ONLY]
    for run in ("before", "after"):
        assert record[run]["outcome"] == "inconclusive"
        assert "needs a CUDA GPU" in record[run]["error"]
