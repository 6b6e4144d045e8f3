"""What transformers' Trainer does not do for Gemma 4 QLoRA, and only that.

- The loss. Gemma 4's own forward upcasts the full [tokens x 262,144] logits to float32 and
  averages per micro-batch (`nn.CrossEntropyLoss()`), ignoring `num_items_in_batch`, while the
  Trainer, seeing `**kwargs` in forward, assumes the model normalises and stops dividing by
  the accumulation steps: the loss is over-weighted and long samples are under-weighted.
  `chunked_lm_loss` sums cross-entropy over target tokens only, in checkpointed chunks (the
  logits never exist at full size), and divides by the target tokens of the whole
  accumulation window (all ranks), which the Trainer counts.
- Non-finite steps. The Trainer filters NaN losses out of its logs but still steps the
  optimizer on NaN gradients. `NonFiniteGuard` drops such a step and counts it.
- Progress and the JSONL log: loss, learning rate, tokens/s and GPU memory.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from chat_data import IGNORE_INDEX
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainerCallback

LOSS_CHUNK_TOKENS = 1024


def _chunk_loss(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    softcap: float | None,
    num_items: torch.Tensor | int,
    chunk: int = LOSS_CHUNK_TOKENS,
) -> torch.Tensor:
    """Causal-LM cross-entropy summed over target tokens, divided by `num_items`.

    `hidden` [batch, seq, hidden] is the final-norm output; `labels` [batch, seq] are aligned
    with the inputs (shifted here); `weight` is the LM head. Each chunk's logits are recomputed
    in backward, so at most one chunk of float32 logits is alive.
    """
    targets = labels[:, 1:].reshape(-1)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX
    states, targets = states[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        total = total + checkpoint(
            _chunk_loss,
            states[start : start + chunk],
            targets[start : start + chunk],
            weight,
            softcap,
            use_reentrant=False,
        )
    return total / num_items


@contextmanager
def captured_output(module: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """The output of `module` during the forward run inside the block."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
        seen["output"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def language_model_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(final norm, LM head, text config) of a Gemma 4, under PEFT or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text_config = base.config.get_text_config()
    backbone = base.model
    decoder = getattr(backbone, "language_model", backbone)
    return decoder.norm, base.get_output_embeddings(), text_config


class Gemma4QLoRATrainer(Trainer):
    """Trainer with the chunked, correctly normalised loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # compute_loss divides by the window's target tokens itself: the Trainer must not
        # divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        labels = inputs.pop("labels")
        norm, head, text_config = language_model_parts(self.accelerator.unwrap_model(model))
        no_logits = torch.zeros(0, dtype=torch.long, device=labels.device)
        with captured_output(norm) as seen:
            outputs = model(**inputs, logits_to_keep=no_logits, use_cache=False)
        window_tokens = num_items_in_batch
        if window_tokens is None:
            window_tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
        loss = chunked_lm_loss(
            seen["output"],
            labels,
            head.weight,
            text_config.final_logit_softcapping,
            window_tokens,
        )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # The Trainer counted the window's tokens over all ranks and DDP averages the
            # gradients over ranks: scale back up, as Trainer.compute_loss does.
            loss = loss * self.data_parallel_ranks()
        return (loss, outputs) if return_outputs else loss

    def data_parallel_ranks(self) -> int:
        if self.args.n_gpu > 1:
            return self.args.n_gpu
        return self.accelerator.num_processes // self.get_tp_size()


class NonFiniteGuard(TrainerCallback):
    """Skip an optimizer step whose gradients are not finite, and count it."""

    def __init__(self) -> None:
        self.skipped = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = [p for p in model.parameters() if p.grad is not None]
        if params and not all(torch.isfinite(p.grad).all() for p in params):
            for p in params:
                p.grad = None  # optimizers leave parameters without a gradient untouched
            self.skipped += 1
        return control


def gpu_memory_gib() -> float:
    if not torch.cuda.is_available():
        return 0.0
    return torch.cuda.max_memory_allocated() / 2**30


class ProgressLog(TrainerCallback):
    """A progress bar with loss, lr, tokens/s and GPU memory; every log line into JSONL."""

    def __init__(self, log_path: Path, guard: NonFiniteGuard, enabled: bool = True) -> None:
        self.log_path = log_path
        self.guard = guard
        self.enabled = enabled
        self.bar = None
        self._last = (time.perf_counter(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step")
        self._last = (time.perf_counter(), state.num_input_tokens_seen)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        seconds = max(now - self._last[0], 1e-9)
        record = {
            "step": state.global_step,
            **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
            "tokens_per_s": round((tokens - self._last[1]) / seconds, 1),
            "gpu_peak_gib": round(gpu_memory_gib(), 3),
            "skipped_nonfinite": self.guard.skipped,
            "time": round(time.time(), 3),
        }
        self._last = (now, tokens)
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(
                loss=f"{logs['loss']:.4f}",
                lr=f"{logs.get('learning_rate', math.nan):.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                mem=f"{record['gpu_peak_gib']:.1f}G",
            )
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
        return control
