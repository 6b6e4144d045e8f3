"""The training loop the peers' adapters share (stackpatch runs the example's own Trainer).

Every length starts from the same state: the LoRA weights as the trainer initialised them
(saved once after set-up, copied back before each later length), a new optimizer and a new
schedule. The loop is the one a Trainer runs at batch 1, gradient accumulation 1: forward
with labels, backward, clip to norm 1.0, optimizer step, cosine schedule with 3% warm-up
(the example's settings), zero the gradients; the batch is the example's collator's
(input_ids, attention_mask of ones, labels), row k of the shared tokens file at step k.
"""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokens as shared_tokens
from measure import DeadlineReached, Process, parse_lengths

LEARNING_RATE = 2e-4
WARMUP_FRACTION = 0.03  # the example's --warmup, which TrainingArguments rounds up to steps
MAX_GRAD_NORM = 1.0
OPTIMIZERS = {
    "adamw8bit": "bitsandbytes.optim.AdamW8bit (8-bit AdamW, not paged)",
    "paged_adamw8bit": "bitsandbytes.optim.PagedAdamW8bit (the example's paged_adamw_8bit)",
    "adamw": "torch.optim.AdamW (fp32 states)",
}


def warmup_steps(steps: int) -> int:
    return math.ceil(steps * WARMUP_FRACTION)


def cosine_factor(step: int, warmup: int, total: int) -> float:
    """transformers' get_cosine_schedule_with_warmup, half a cosine period."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(name: str, params: Sequence[Any]):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    import bitsandbytes as bnb

    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=LEARNING_RATE, weight_decay=0.0)
    if name == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=LEARNING_RATE, weight_decay=0.0)
    raise ValueError(f"optimizer {name!r}: one of {sorted(OPTIMIZERS)}")


def snapshot(params: Sequence[Any]) -> list[Any]:
    return [p.detach().to("cpu", copy=True) for p in params]


def restore(params: Sequence[Any], saved: Sequence[Any]) -> None:
    import torch

    with torch.no_grad():
        for param, value in zip(params, saved, strict=True):
            param.copy_(value)
            param.grad = None


def trainable_numel(params: Sequence[Any]) -> int:
    return sum(p.numel() for p in params)


def release_memory() -> None:
    """Free what the finished length held, as if the next length ran in a fresh process."""
    import torch

    paging = sys.modules.get("bitsandbytes.functional")
    if paging is not None and hasattr(paging, "GlobalPageManager"):
        # Paged optimizers register their state buffers here for good; the optimizer is gone.
        paging.GlobalPageManager.get_instance().paged_tensors.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_lengths(
    process: Process,
    model: Any,
    trainable: Sequence[Any],
    lengths: Sequence[int],
    steps: int,
    data_dir: Path,
    device: str,
    optimizer: str,
    autocast: bool,
) -> None:
    """Train `steps` steps at each length, one result line per length as soon as it ends.

    `autocast`: run the forward under torch.autocast(bfloat16), as a Trainer with bf16=True
    does (unsloth trains through one); experts4bit-qlora's CLI does not autocast.
    """
    import contextlib

    import torch

    initial = snapshot(trainable)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    for index, length in enumerate(lengths):
        if index:
            restore(trainable, initial)
        path = shared_tokens.tokens_path(data_dir, length)
        try:
            rows = shared_tokens.load(path, length, steps)
        except shared_tokens.TokensProblem as exc:
            process.length_result(length, process.clock(), exc)
            continue
        process.reset_peaks()
        clock = process.clock()
        error: BaseException | None = None
        optim = None
        try:
            optim = make_optimizer(optimizer, trainable)
            total, warm = steps, warmup_steps(steps)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optim, lambda step, w=warm, t=total: cosine_factor(step, w, t)
            )
            model.train()
            clock.start()
            for row in rows:
                ids = torch.tensor([row["input_ids"]], device=device)
                labels = torch.tensor([row["labels"]], device=device)
                mixed = torch.autocast(kind, dtype=torch.bfloat16) if autocast else None
                with mixed or contextlib.nullcontext():
                    # .loss alone: the output (and its logits) is not held through backward
                    mask = torch.ones_like(ids)
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                optim.step()
                schedule.step()
                optim.zero_grad(set_to_none=True)
                clock.step_end(ids.numel(), loss.item())
                del loss
        except (Exception, DeadlineReached) as exc:
            error = exc
        optim = None
        for param in trainable:
            param.grad = None
        process.length_result(
            length,
            clock,
            error,
            tokens_sha256=shared_tokens.digest_of(path),
            optimizer=optimizer,
            autocast_bf16=autocast,
        )
        deadline = isinstance(error, DeadlineReached)
        error = None  # its traceback holds the failed step's tensors
        release_memory()
        if deadline:
            raise DeadlineReached("SIGTERM")


def train_all(
    process: Process, model: Any, trainable: Sequence[Any], args: Any, autocast: bool
) -> int:
    """`train_lengths` with adapter_arguments' settings; 1 when run.sh's deadline cut it off."""
    try:
        train_lengths(
            process,
            model,
            trainable,
            parse_lengths(args.lengths),
            args.steps,
            args.data,
            "cuda" if process.cuda else "cpu",
            args.optimizer,
            autocast,
        )
    except DeadlineReached as exc:
        process.failed("train", exc)
        return 1
    return 0


ROWS = {
    "attn": "LoRA r16 a16 on q/k/v/o",
    "experts": "LoRA r16 a16 on q/k/v/o + the experts (gate_up_proj, down_proj)",
}


def adapter_arguments(description: str, optimizers: Sequence[str] = ("adamw8bit",)):
    """The arguments every adapter takes from run.sh."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--row", choices=sorted(ROWS), required=True)
    parser.add_argument("--ckpt", type=Path, required=True, help="the 26B-A4B checkpoint dir")
    parser.add_argument("--data", type=Path, required=True, help="dir with tokensL.json")
    parser.add_argument("--lengths", default="512 2048 4096")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--work", type=Path, required=True, help="scratch dir (cwd, outputs)")
    parser.add_argument("--optimizer", choices=optimizers, default=optimizers[0])
    return parser


def _expert_storage(model: Any) -> dict[str, Any]:
    """What the expert stacks are after loading: module classes and their tensors' types."""
    modules: dict[str, int] = {}
    tensors: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if "Experts" not in name:
            continue
        modules[name] = modules.get(name, 0) + 1
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for key, tensor in own:
            kind = f"{key}: {type(tensor).__name__} {str(tensor.dtype).removeprefix('torch.')}"
            tensors[kind] = tensors.get(kind, 0) + 1
    return {"expert_modules": modules, "expert_tensors": tensors}


def _weights_by_kind(model: Any) -> dict[str, dict[str, float]]:
    """Parameters and buffers by tensor class, dtype and device: what each trainer keeps in 4
    bits and what it moved off the GPU (packed bytes; quantization statistics held outside the
    module tree are not counted)."""
    totals: dict[str, list[int]] = {}
    seen: set[int] = set()
    for _, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        dtype = str(tensor.dtype).removeprefix("torch.")
        key = f"{type(tensor).__name__} {dtype} on {tensor.device.type}"
        entry = totals.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += tensor.numel() * tensor.element_size()
    return {
        key: {"tensors": count, "gib": round(size / 2**30, 3)}
        for key, (count, size) in sorted(totals.items())
    }


def storage(model: Any) -> dict[str, Any]:
    """The `loaded` line's account of what the trainer stores, and how."""
    return {"weights": _weights_by_kind(model), **_expert_storage(model)}
