"""bench/peers/adapter_stackpatch.py on a real, patched stack (CPU, tiny 26B-A4B-shaped model).

The adapter drives examples/train_gemma4_qlora.py's own main() once per length and wraps
some of its functions; this catches a change of the example that would break that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import layered_env, run_cli_process

pytestmark = pytest.mark.stacks

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
sys.path.insert(0, str(PEERS))

from measure import read_lines  # noqa: E402


def run(python: Path, *argv: str, **env: str) -> None:
    completed = subprocess.run(
        [str(python), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]


def test_one_process_loads_once_and_trains_every_length(tmp_path: Path) -> None:
    python = layered_env("oldest", tmp_path / "venv")
    assert run_cli_process("--apply", "-q", "--python", str(python)).code == 0
    ckpt, data, work, results = (tmp_path / n for n in ("ckpt", "data", "work", "r.jsonl"))
    work.mkdir()
    run(python, str(PEERS / "tiny_checkpoint.py"), "--dir", str(ckpt))
    lengths = ("32", "64")
    run(python, "bench/example_data.py", "--model-dir", str(ckpt), "--out", str(data),
        "--lengths", *lengths, "--samples", "4")  # fmt: skip
    run(python, str(PEERS / "tokens.py"), "--model-dir", str(ckpt), "--data", str(data),
        "--lengths", *lengths)  # fmt: skip
    run(
        python,
        str(PEERS / "adapter_stackpatch.py"),
        "--row", "attn", "--ckpt", str(ckpt), "--data", str(data), "--work", str(work),
        "--lengths", " ".join(lengths), "--steps", "3",
        PEERS_RESULTS=str(results),
    )  # fmt: skip
    records = read_lines(results)
    assert [r["kind"] for r in records] == ["start", "loaded", "length", "length"]
    loaded = records[1]
    assert loaded["experts_4bit"] == "2/2" and loaded["lora_modules"] == 7
    for record, length in zip(records[2:], (32, 64), strict=True):
        assert record["status"] == "ok", record
        assert record["length"] == length and record["steps"] == 3
        assert record["step_tokens"] == [length] * 3
        assert record["same_tokens_as_peers"] is True
        assert len(record["losses"]) == 3 and record["finite_losses"]
    # nothing written at the end: no Trainer checkpoint, no adapter
    assert not list(work.rglob("checkpoint-*")) and not list(work.rglob("adapter_model*"))
