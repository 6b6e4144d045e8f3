"""What transformers' Trainer does not do for Gemma 4 QLoRA, and only that.

- The loss. Gemma 4's own forward upcasts the full [tokens x 262,144] logits to float32 and
  averages per micro-batch (`nn.CrossEntropyLoss()`), ignoring `num_items_in_batch`, while the
  Trainer, seeing `**kwargs` in forward, assumes the model normalises and stops dividing by
  the accumulation steps: the loss is over-weighted and long samples are under-weighted.
  `chunked_lm_loss` sums cross-entropy over target tokens only, in checkpointed chunks (the
  logits never exist at full size), and divides by the target tokens of the whole
  accumulation window (all ranks), which the Trainer counts.
  With liger-kernel installed, `fused_lm_loss` does the same with liger's fused linear
  cross-entropy (the softcap and the cross-entropy gradient in one Triton kernel per chunk,
  the gradient computed in forward, so no chunk is recomputed in backward).
- Non-finite steps. The Trainer filters NaN losses out of its logs but still steps the
  optimizer on NaN gradients. `NonFiniteGuard` drops such a step and counts it.
- Progress and the JSONL log: loss, learning rate, tokens/s and GPU memory.

Device synchronisations: every `.item()`, every `bool()` of a GPU tensor and every boolean-mask
index makes the host wait for the GPU, so it cannot queue the next kernels while the GPU runs.
The loss takes one (selecting the target tokens: their count sizes the chunks), the guard one
per optimizer step, the token count one per logged step (`count_tokens_on_device`).
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


def _target_states(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final-norm states, next-token targets) of the target tokens only, flattened.

    Boolean-mask indexing reads the number of targets back from the GPU (one device sync);
    computing the logits of prompt tokens too would avoid it at the cost of LM-head work on
    tokens that have no loss, which is the larger cost for chat data."""
    targets = labels[:, 1:].reshape(-1)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX
    return states[keep], targets[keep]


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
    states, targets = _target_states(hidden, labels)
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


def liger_chunk_budget(tokens: int, vocab: int, hidden: int, chunk: int) -> int:
    """liger's `chunk_mem_const` that keeps its chunks at or under `chunk` tokens.

    liger sizes a chunk as next_pow2(ceil(tokens / ceil(vocab / (budget * hidden)))); its
    default budget of 1 makes chunks of ~tokens/93 rows at Gemma 4's vocabulary (many small
    GEMMs); `chunk` rows of logits is what chunked_lm_loss holds too."""
    pieces = -(-tokens // chunk)
    return max(1, vocab // (hidden * pieces))


def fused_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    softcap: float | None,
    num_items: torch.Tensor | int,
    chunk: int = LOSS_CHUNK_TOKENS,
) -> torch.Tensor:
    """`chunked_lm_loss` by liger-kernel's fused linear cross-entropy (CUDA only).

    Same sum over target tokens with the same softcap, divided by `num_items`. liger computes
    the input gradient during forward, chunk by chunk, and keeps only that (tokens x hidden)
    for backward: no float32 logits, no recomputation. It reads the target count back once
    more (`.item()`) and compares the incoming gradient with 1 in backward (another sync)."""
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

    states, targets = _target_states(hidden, labels)
    if targets.numel() == 0:  # nothing to learn here: a zero that still reaches the graph
        return hidden.sum() * 0.0
    budget = liger_chunk_budget(targets.numel(), weight.shape[0], weight.shape[1], chunk)
    total = LigerFusedLinearCrossEntropyFunction.apply(
        states.contiguous(),
        weight,
        targets,
        None,  # bias
        None,  # class weights
        IGNORE_INDEX,
        0.0,  # z-loss scale
        0.0,  # label smoothing
        "sum",
        softcap or None,
        False,  # return z-loss
        None,  # accumulation dtype
        False,  # token scaling
        False,  # return accuracy
        False,  # return predictions
        None,  # implementation
        None,  # mode
        budget,
    )[0]
    return total / num_items


def liger_problem() -> str | None:
    """Why liger-kernel cannot serve here, or None when it can."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed (pip install liger-kernel==0.8.5)"
    if not torch.cuda.is_available():
        return "liger-kernel's Triton kernels need a GPU"
    return None


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


LOSSES = {"chunked": chunked_lm_loss, "liger": fused_lm_loss}


class Gemma4QLoRATrainer(Trainer):
    """Trainer with the chunked, correctly normalised loss.

    `loss` picks the loss implementation (LOSSES). `count_tokens_on_device` replaces the
    Trainer's `include_num_input_tokens_seen`, which reads each micro-batch's token count back
    from the GPU (one sync per micro-batch): the count stays on the device and is read once
    per logged step, just before the log is written (set include_num_input_tokens_seen="no"
    with it; `state.num_input_tokens_seen` is then current at every log, and so at every
    checkpoint saved on a logging step). With `logging_nan_inf_filter=False` the Trainer no
    longer reads every micro-batch loss back to filter NaN/inf out of its logs (two syncs per
    micro-batch); training_step then logs a non-finite micro-batch loss as the last finite
    one, on the device (NonFiniteGuard still drops the step and counts it).
    """

    def __init__(
        self,
        *args: Any,
        loss: str = "chunked",
        count_tokens_on_device: bool = False,
        **kwargs: Any,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r}: expected one of {', '.join(LOSSES)}")
        super().__init__(*args, **kwargs)
        # compute_loss divides by the window's target tokens itself: the Trainer must not
        # divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self.loss_function_name = loss
        self.count_tokens_on_device = count_tokens_on_device
        self._unlogged_tokens: torch.Tensor | None = None
        self._last_finite_loss: torch.Tensor | None = None

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.logging_nan_inf_filter:
            return loss  # the Trainer filters, reading the loss back
        if self._last_finite_loss is None:
            self._last_finite_loss = torch.zeros_like(loss)
        finite = torch.isfinite(loss)
        self._last_finite_loss = torch.where(finite, loss, self._last_finite_loss)
        return self._last_finite_loss.clone()

    def _count_tokens(self, inputs: dict[str, torch.Tensor]) -> None:
        mask = inputs.get("attention_mask")
        seen = mask.sum() if mask is not None else inputs["input_ids"].numel()
        if self._unlogged_tokens is None:
            self._unlogged_tokens = torch.zeros((), dtype=torch.int64, device=self.args.device)
        self._unlogged_tokens += seen

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.count_tokens_on_device and self._unlogged_tokens is not None:
            # One read for all micro-batches since the last log (a collective under DDP:
            # every rank logs).
            self.state.num_input_tokens_seen += int(
                self.accelerator.gather(self._unlogged_tokens).sum().item()
            )
            self._unlogged_tokens.zero_()
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
        super().log(logs, start_time)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        labels = inputs.pop("labels")
        if self.count_tokens_on_device and model.training:
            self._count_tokens(inputs)
        norm, head, text_config = language_model_parts(self.accelerator.unwrap_model(model))
        no_logits = torch.zeros(0, dtype=torch.long, device=labels.device)
        with captured_output(norm) as seen:
            outputs = model(**inputs, logits_to_keep=no_logits, use_cache=False)
        window_tokens = num_items_in_batch
        if window_tokens is None:
            window_tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
        loss = LOSSES[self.loss_function_name](
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


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite, with one device sync per device.

    The largest magnitude of each tensor (`_foreach_norm` with ord=inf: a few fused kernels
    for all of them, where a loop of isfinite().all() costs a kernel and a sync per tensor)
    is NaN or inf exactly when the tensor holds a NaN or an inf; unlike a 2-norm it cannot
    overflow on finite values."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    for group in by_device.values():
        largest = torch.stack([m.float() for m in torch._foreach_norm(group, math.inf)])
        if not bool(torch.isfinite(largest).all()):
            return False
    return True


class NonFiniteGuard(TrainerCallback):
    """Skip an optimizer step whose gradients are not finite, and count it."""

    def __init__(self) -> None:
        self.skipped = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = [p for p in model.parameters() if p.grad is not None]
        if params and not all_finite([p.grad for p in params]):
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
