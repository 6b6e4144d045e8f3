"""bench/train_step.py's decisions and report, without a GPU: which wide-head attention kernel
the fast configurations take, and what the report says about speed-ups and losses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import train_step


def attention(kernel: str, tokens: int, **measured) -> dict:
    return {"kind": "wide_attention", "tokens": tokens, "kernel": kernel, **measured}


def efficient(tokens: int) -> dict:
    return attention(
        "efficient", tokens, ms=10.0, extra_peak_mib=50, error_out=0.004, error_grad=0.01
    )


@pytest.mark.parametrize(
    ("candidate", "chosen"),
    [
        ({"ms": 4.0, "extra_peak_mib": 600, "error_out": 0.006, "error_grad": 0.015}, "chunked"),
        # faster but it holds the scores of the whole sequence: over 2 GiB
        ({"ms": 3.0, "extra_peak_mib": 4000, "error_out": 0.001, "error_grad": 0.001}, "efficient"),
        # faster but less exact than twice the efficient kernel and bf16 level
        ({"ms": 3.0, "extra_peak_mib": 100, "error_out": 0.05, "error_grad": 0.01}, "efficient"),
        # slower
        ({"ms": 12.0, "extra_peak_mib": 100, "error_out": 0.004, "error_grad": 0.01}, "efficient"),
        # does not take the shape
        ({"error": "RuntimeError: No available kernel"}, "efficient"),
    ],
)
def test_wide_kernel_choice(candidate: dict, chosen: str) -> None:
    rows = [efficient(t) for t in (512, 2048)]
    rows += [attention("chunked", t, **candidate) for t in (512, 2048)]
    assert train_step.pick_wide_kernel(rows) == chosen


def test_a_kernel_must_run_at_every_length() -> None:
    rows = [efficient(t) for t in (512, 2048)]
    good = {"ms": 1.0, "extra_peak_mib": 10, "error_out": 0.004, "error_grad": 0.01}
    rows += [attention("flex", 512, **good), attention("flex", 2048, error="OutOfResources")]
    assert train_step.pick_wide_kernel(rows) == "efficient"


def test_report_gives_ratios_and_flags_losses_outside_one_percent() -> None:
    records = [
        {"kind": "environment", "device": "GPU", "date": "today", "torch": "2.11"},
        {"kind": "run", "config": "main", "tokens": 512, "steps": 10, "tokens_per_s": 600.0,
         "losses": [13.0, 12.0]},
        {"kind": "run", "config": "fast", "tokens": 512, "steps": 10, "tokens_per_s": 1500.0,
         "losses": [13.0, 12.05]},
        {"kind": "run", "config": "compile", "tokens": 512, "steps": 10, "tokens_per_s": 1200.0,
         "losses": [13.0, 12.3]},
        {"kind": "run", "config": "liger", "tokens": 512, "skipped": "budget"},
    ]  # fmt: skip
    text = train_step.report(records)
    assert "| fast | 1,500 | 2.50 |" in text
    assert (
        "losses of fast vs main, first 2 steps: largest relative difference 0.42% (within 1%)"
        in text
    )
    assert (
        "losses of compile vs main, first 2 steps: largest relative difference 2.50% (OUTSIDE 1%)"
        in text
    )
    assert "| liger | – | – |" in text and "| budget |" in text


def test_steps_default_per_length_and_requested_everywhere() -> None:
    lengths = (2048, 512, 4096)
    assert train_step.steps_for(2048, lengths, None) == train_step.LOSS_STEPS
    assert train_step.steps_for(512, lengths, None) == train_step.STEPS
    assert [train_step.steps_for(t, lengths, 20) for t in lengths] == [20, 20, 20]


@pytest.mark.parametrize("text", ["3", "201", "ten"])
def test_steps_outside_the_range_are_refused_in_one_line(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        train_step.step_count(text)
