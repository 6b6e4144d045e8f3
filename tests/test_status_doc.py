"""VALIDATION-STATUS.md is generated, never hand-edited, and never claims more than its records."""

from __future__ import annotations

import json
from pathlib import Path

from patches.registry import load_patches
from patches.status_doc import current_status, load_records, render_status, verified_status

ROOT = Path(__file__).resolve().parent.parent


def test_committed_status_matches_generated() -> None:
    generated = current_status()
    committed = (ROOT / "VALIDATION-STATUS.md").read_text()
    assert committed == generated, (
        "VALIDATION-STATUS.md is stale: run "
        "`python apply_patches.py --validation-status > VALIDATION-STATUS.md`"
    )


def _record(directory: Path, name: str, reproduced: bool, fixed: bool) -> None:
    (directory / f"{name}.json").write_text(
        json.dumps(
            {
                "patch": "P10",
                "packages": {"transformers": "5.5.4"},
                "python": "3.11.7",
                "torch": "2.13.0+cpu",
                "device": "cpu",
                "date": "2026-11-23",
                "before": {"reproduced": reproduced, "error": "ValueError: boom"},
                "after": {"fixed": fixed},
            }
        )
    )


def test_confirmed_needs_a_record_of_bug_then_fix(tmp_path: Path) -> None:
    p10 = next(p for p in load_patches() if p.id == "P10")
    assert verified_status(p10, []) == "unverified"
    _record(tmp_path, "a", reproduced=False, fixed=True)
    assert verified_status(p10, load_records(tmp_path)) == "not reproduced"
    _record(tmp_path, "b", reproduced=True, fixed=False)
    assert verified_status(p10, load_records(tmp_path)) == "not reproduced"
    _record(tmp_path, "c", reproduced=True, fixed=True)
    assert verified_status(p10, load_records(tmp_path)) == "confirmed"
    text = render_status([p10], load_records(tmp_path))
    assert "| P10 |" in text and "| 1/3 |" in text
    assert "ValueError: boom" in text
