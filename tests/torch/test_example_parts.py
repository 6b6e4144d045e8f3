"""The training example's own parts on a real stack: masking, the loss, the NaN guard.

Runs inside the stack venvs (tests/test_torch_suite.py) with a P13-patched transformers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from chat_data import IGNORE_INDEX, assistant_spans, tokenize_conversations
from qlora_training import (
    NonFiniteGuard,
    captured_output,
    chunked_lm_loss,
    language_model_parts,
)
from tiny import build_tokenizer, conversations
from transformers import DataCollatorForSeq2Seq

WORDS = {w for row in conversations() for m in row["messages"] for w in m["content"].split()}
WORDS |= {"seven", "has", "no", "divisor", "but", "one", "and", "briefly", "answer"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(WORDS)


def targets(tokenizer, messages, max_length=512) -> list[str]:
    tokenized = tokenize_conversations(tokenizer, [messages], max_length)
    (example,) = tokenized.examples
    return tokenizer.convert_ids_to_tokens([t for t in example.labels if t != IGNORE_INDEX])


def test_generation_prompt_is_not_a_prefix_of_the_turn(tokenizer) -> None:
    messages = conversations()[0]["messages"]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    # The quirk a prefix-based masker trips over: the prompt opens an empty thought channel.
    assert prompt.endswith("<|channel>thought\n<channel|>") and not full.startswith(prompt)


def test_only_assistant_tokens_are_targets(tokenizer) -> None:
    multi_turn = conversations()[6]["messages"]
    assert [m["role"] for m in multi_turn] == ["system", "user", "assistant", "user", "assistant"]
    assert targets(tokenizer, multi_turn) == [
        *["the", "sky", "is", "blue"],
        "<turn|>",
        *["cows", "drink", "water"],
        "<turn|>",
    ]


def test_thought_channel_markup_of_the_answer_is_a_target(tokenizer) -> None:
    reasoning = conversations()[7]["messages"]
    assert targets(tokenizer, reasoning) == [
        *["seven", "has", "no", "divisor", "but", "one", "and", "seven"],
        "<channel|>",
        *["seven", "is", "a", "prime", "number"],
        "<turn|>",
    ]


def test_spans_fail_loudly_on_a_template_that_is_not_prefix_stable() -> None:
    def render(messages, add_generation_prompt):
        return "|".join(m["content"] for m in reversed(messages))

    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="prefix by prefix"):
        assistant_spans(render, messages)


def test_truncation_is_counted_and_samples_without_targets_dropped(tokenizer) -> None:
    rows = [r["messages"] for r in conversations()[:2]]
    full = tokenize_conversations(tokenizer, rows, 512)
    assert full.truncated == 0 and full.dropped == 0 and len(full.examples) == 2
    shortest = min(len(e.input_ids) for e in full.examples)
    cut = tokenize_conversations(tokenizer, rows, shortest - 1)
    assert cut.truncated == 2 and len(cut.examples) == 2
    prompt_only = tokenize_conversations(tokenizer, rows, 6)
    assert prompt_only.truncated == 2 and prompt_only.dropped == 2 and not prompt_only.examples


def test_padding_is_never_a_target(tokenizer) -> None:
    tokenized = tokenize_conversations(tokenizer, [r["messages"] for r in conversations()], 512)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in tokenized.examples[:2]]
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(rows)
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["labels"][padded] == IGNORE_INDEX).all()


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def test_chunked_loss_is_exact_and_normalised_over_the_window() -> None:
    torch.manual_seed(0)
    weight = torch.randn(50, 8, requires_grad=True)
    hidden = [torch.randn(1, n, 8, requires_grad=True) for n in (6, 20)]
    labels = [torch.randint(0, 50, (1, n)) for n in (6, 20)]
    labels[0][0, :3] = IGNORE_INDEX
    window = sum(int((y[:, 1:] != IGNORE_INDEX).sum()) for y in labels)
    ours = sum(
        chunked_lm_loss(h, y, weight, 3.0, window, chunk=4)
        for h, y in zip(hidden, labels, strict=True)
    )
    capped = [torch.tanh((h @ weight.t()) / 3.0) * 3.0 for h in hidden]
    expected = sum(reference_loss(c, y) for c, y in zip(capped, labels, strict=True)) / window
    torch.testing.assert_close(ours, expected)
    (grad_ours,) = torch.autograd.grad(ours, weight)
    (grad_expected,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(grad_ours, grad_expected)
    # Not the mean of per-micro-batch means, which over-weights the short sample.
    means = sum(
        reference_loss(c, y) / int((y[:, 1:] != -100).sum())
        for c, y in zip(capped, labels, strict=True)
    )
    assert not torch.allclose(ours, means / 2)


def test_chunked_loss_matches_gemma4_own_loss() -> None:
    from tiny_gemma4 import multimodal_config
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(multimodal_config()).eval()
    input_ids = torch.randint(5, 500, (1, 24))
    labels = input_ids.clone()
    labels[0, :10] = IGNORE_INDEX
    mm = torch.zeros_like(input_ids)
    stock = model(input_ids=input_ids, labels=labels, mm_token_type_ids=mm).loss
    norm, head, text_config = language_model_parts(model)
    with captured_output(norm) as seen:
        model(
            input_ids=input_ids,
            mm_token_type_ids=mm,
            logits_to_keep=torch.zeros(0, dtype=torch.long),
        )
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert count == 14
    softcap = text_config.final_logit_softcapping
    ours = chunked_lm_loss(seen["output"], labels, head.weight, softcap, count, chunk=5)
    torch.testing.assert_close(ours, stock)


def test_non_finite_gradients_skip_the_step() -> None:
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    guard = NonFiniteGuard()
    guard.on_pre_optimizer_step(None, None, None, model=model)
    assert guard.skipped == 0 and model.weight.grad is not None
    model.weight.grad[0, 0] = float("nan")
    guard.on_pre_optimizer_step(None, None, None, model=model)
    assert guard.skipped == 1 and model.weight.grad is None and model.bias.grad is None


def test_all_finite_finds_nan_and_inf_in_any_tensor() -> None:
    from qlora_training import all_finite

    tensors = [torch.randn(3, 4), torch.ones(2, dtype=torch.bfloat16), torch.full((5,), 3e38)]
    assert all_finite(tensors)  # huge but finite: the largest magnitude does not overflow
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [t.clone() for t in tensors]
        broken[1][1] = bad
        assert not all_finite(broken)


@pytest.mark.parametrize("tokens", [1, 300, 1024, 1025, 3072, 5000])
def test_liger_chunks_stay_within_the_loss_chunk(tokens: int) -> None:
    """liger's chunk size for the budget we pass (its formula, fused_linear_cross_entropy.py
    of liger-kernel 0.8.5) never exceeds the chunked loss's 1,024 rows at 26B-A4B's shapes."""
    from qlora_training import LOSS_CHUNK_TOKENS, liger_chunk_budget

    vocab, hidden = 262144, 2816
    budget = liger_chunk_budget(tokens, vocab, hidden, LOSS_CHUNK_TOKENS)
    pieces = -(-vocab // (budget * hidden))
    chunk = min(1 << (-(-tokens // pieces) - 1).bit_length(), tokens)
    assert 1 <= chunk <= LOSS_CHUNK_TOKENS
    assert chunk >= min(tokens, LOSS_CHUNK_TOKENS) // 2  # not the default's ~tokens/93


def test_trainer_counts_tokens_on_the_device_and_logs_nan_as_the_last_finite_loss(
    tmp_path, monkeypatch
) -> None:
    """count_tokens_on_device gives the Trainer's own token count; with the Trainer's NaN
    filter off, a NaN micro-batch loss is logged as the last finite one and the guard skips
    its step."""
    import qlora_training
    from qlora_training import Gemma4QLoRATrainer
    from tiny_gemma4 import multimodal_config
    from transformers import Gemma4ForConditionalGeneration, TrainingArguments

    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(multimodal_config())
    lengths = (9, 12, 7, 10)
    rows = []
    for n in lengths:
        ids = torch.randint(5, 500, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:]})
    calls = []
    real_loss = qlora_training.LOSSES["chunked"]

    def nan_on_third(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setitem(qlora_training.LOSSES, "chunked", nan_on_third)
    guard = NonFiniteGuard()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        include_num_input_tokens_seen="no",
        logging_nan_inf_filter=False,
        remove_unused_columns=False,
    )
    tokenizer = build_tokenizer(WORDS)
    trainer = Gemma4QLoRATrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[guard],
        count_tokens_on_device=True,
    )
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    seen = [r["num_input_tokens_seen"] for r in trainer.state.log_history if "loss" in r]
    assert trainer.state.num_input_tokens_seen == sum(lengths)
    steps = [b - a for a, b in zip([0, *seen], seen, strict=False)]
    assert sorted(steps) == sorted(lengths)  # one sample per step, in the order drawn
    assert all(map(math.isfinite, losses)) and losses[2] == losses[1]
    assert guard.skipped == 1


def test_loss_choice_takes_liger_wherever_it_runs_and_refuses_it_in_one_line(capsys) -> None:
    from train_gemma4_qlora import loss_choice

    assert loss_choice("auto", None) == "liger"
    assert loss_choice("auto", "liger-kernel's Triton kernels need a GPU") == "chunked"
    assert loss_choice("chunked", None) == "chunked"
    assert loss_choice("liger", None) == "liger"
    missing = "liger-kernel is not installed (pip install liger-kernel==0.8.5)"
    with pytest.raises(SystemExit) as stopped:
        loss_choice("liger", missing)
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: --loss liger: {missing}"


def test_wide_attention_auto_chunks_long_gpu_sequences_only() -> None:
    from train_gemma4_qlora import CHUNKED_WIDE_FROM, wide_attention_choice

    assert wide_attention_choice("auto", True, CHUNKED_WIDE_FROM) == "chunked"
    assert wide_attention_choice("auto", True, CHUNKED_WIDE_FROM - 1) == "sdpa"
    assert wide_attention_choice("auto", False, 4096) == "sdpa"
    assert wide_attention_choice("flex", False, 128) == "flex"
    assert wide_attention_choice("sdpa", True, 4096) == "sdpa"


def counting(checkpoint, calls: list[int], index: int):
    def counted(*args, **kwargs):
        calls.append(index)
        return checkpoint(*args, **kwargs)

    return counted


def test_layers_past_the_checkpointed_count_keep_their_activations(monkeypatch) -> None:
    """enable_checkpointing(model, 1) on a three-layer model: only the first layer runs
    through torch.utils.checkpoint in a training forward, the others keep their activations,
    and the gradients equal those of checkpointing every layer."""
    from tiny_gemma4 import text_config
    from train_gemma4_qlora import enable_checkpointing
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (1, 12))
    grads = {}
    for count in (None, 1):
        torch.manual_seed(1)
        config = text_config(
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
        model = Gemma4ForCausalLM(config).float().train()
        assert enable_checkpointing(model, count) == (3 if count is None else count)
        layers = model.model.layers
        assert [layer.gradient_checkpointing for layer in layers] == (
            [True] * 3 if count is None else [True, False, False]
        )
        calls: list[int] = []
        for index, layer in enumerate(layers):
            monkeypatch.setattr(
                layer,
                "_gradient_checkpointing_func",
                counting(layer._gradient_checkpointing_func, calls, index),
            )
        model(input_ids=ids, labels=ids).loss.backward()
        assert calls == ([0, 1, 2] if count is None else [0])
        grads[count] = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads[None]) == len(grads[1]) > 0
    for with_all, with_one in zip(grads[None], grads[1], strict=True):
        torch.testing.assert_close(with_one, with_all, rtol=1e-5, atol=1e-7)
