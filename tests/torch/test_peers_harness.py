"""bench/peers/harness.py's loop on CPU with a toy model: one line per length, each length
from the same initial adapter, an out-of-memory step recorded as a result, the storage account.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "peers"))

import harness
import measure
import tokens

VOCAB = 50


class Toy(torch.nn.Module):
    """An embedding and a head; `lora` is the only trainable tensor, as with an adapter."""

    def __init__(self, fail_at_call: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 8).requires_grad_(False)
        self.head = torch.nn.Linear(8, VOCAB).requires_grad_(False)
        self.lora = torch.nn.Parameter(torch.zeros(8))
        self.calls = 0
        self.fail_at_call = fail_at_call
        self.seen_lora: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask, labels):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        self.seen_lora.append(self.lora.detach().clone())
        hidden = self.embed(input_ids) + self.lora
        logits = self.head(hidden)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        return type("Output", (), {"loss": loss})()


def write_tokens(data: Path, length: int, rows: int) -> None:
    generator = torch.Generator().manual_seed(length)
    out = []
    for _ in range(rows):
        ids = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    document = {"length": length, "rows": out, "sha256": tokens.rows_digest(out)}
    tokens.tokens_path(data, length).write_text(json.dumps(document))


@pytest.fixture
def process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> measure.Process:
    monkeypatch.setenv("PEERS_RESULTS", str(tmp_path / "r.jsonl"))
    process = measure.Process("toy", "attn", {"lengths": [8, 16]})
    process.start()
    return process


def lines(tmp_path: Path, kind: str) -> list[dict]:
    return [r for r in measure.read_lines(tmp_path / "r.jsonl") if r["kind"] == kind]


def test_every_length_starts_from_the_initial_adapter(tmp_path: Path, process) -> None:
    for length in (8, 16):
        write_tokens(tmp_path, length, rows=4)
    model = Toy()
    harness.train_lengths(
        process, model, [model.lora], [8, 16], 4, tmp_path, "cpu", "adamw", autocast=False
    )
    results = lines(tmp_path, "length")
    assert [(r["length"], r["status"], r["steps"]) for r in results] == [
        (8, "ok", 4),
        (16, "ok", 4),
    ]
    assert results[0]["step_tokens"] == [8] * 4 and results[1]["step_tokens"] == [16] * 4
    assert all(r["tokens_per_s"] > 0 and r["finite_losses"] for r in results)
    assert results[0]["tokens_sha256"] == tokens.digest_of(tokens.tokens_path(tmp_path, 8))
    # the adapter trained during length 8, then was put back before length 16
    assert model.seen_lora[3].abs().sum() > 0
    assert torch.equal(model.seen_lora[4], torch.zeros(8))
    assert model.lora.grad is None


def test_out_of_memory_is_a_result_and_the_next_length_still_runs(tmp_path: Path, process) -> None:
    for length in (8, 16):
        write_tokens(tmp_path, length, rows=4)
    model = Toy(fail_at_call=3)
    harness.train_lengths(
        process, model, [model.lora], [8, 16], 4, tmp_path, "cpu", "adamw", autocast=False
    )
    first, second = lines(tmp_path, "length")
    assert first["status"] == "oom" and first["steps"] == 2 and first["oom"] is True
    assert first["error"] == "CUDA out of memory. Tried to allocate 4.00 GiB"
    assert second["status"] == "ok" and second["steps"] == 4


def test_a_missing_tokens_file_is_a_result_not_a_crash(tmp_path: Path, process) -> None:
    write_tokens(tmp_path, 16, rows=4)
    model = Toy()
    harness.train_lengths(
        process, model, [model.lora], [8, 16], 4, tmp_path, "cpu", "adamw", autocast=False
    )
    missing, ok = lines(tmp_path, "length")
    assert missing["status"] == "error" and "cannot read" in missing["error"]
    assert ok["status"] == "ok"


def test_schedule_warms_up_then_follows_half_a_cosine() -> None:
    assert harness.warmup_steps(10) == 1 and harness.warmup_steps(100) == 3
    assert harness.cosine_factor(0, 1, 10) == 0.0
    assert harness.cosine_factor(1, 1, 10) == 1.0
    assert harness.cosine_factor(10, 1, 10) == pytest.approx(0.0, abs=1e-12)
    assert harness.cosine_factor(6, 2, 10) == pytest.approx(0.5)


def test_storage_counts_tensors_by_kind_and_finds_experts() -> None:
    class Gemma4TextExperts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 8, 2, dtype=torch.bfloat16))
            self.register_buffer("absmax", torch.ones(4))

    model = torch.nn.Sequential(Gemma4TextExperts(), torch.nn.Linear(2, 2))
    account = harness.storage(model)
    assert account["expert_modules"] == {"Gemma4TextExperts": 1}
    assert account["expert_tensors"] == {
        "gate_up_proj: Parameter bfloat16": 1,
        "absmax: Tensor float32": 1,
    }
    assert account["weights"]["Parameter bfloat16 on cpu"] == {"tensors": 1, "gib": 0.0}
    assert account["weights"]["Parameter float32 on cpu"]["tensors"] == 2
