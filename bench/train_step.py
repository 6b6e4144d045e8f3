"""The training example's step before and after issue 17's fast paths, in one process.

    python apply_patches.py --apply     # P13 (4-bit experts) in the GPU machine's transformers
    python bench/train_step.py run --ckpt /tmp/ckpt-26b --out "$OUT"
    python bench/train_step.py report "$OUT" > bench/results/train_step.md

`run` makes the random-weight 26B-A4B checkpoint if it is missing (bench/whole_model_memory.py,
~80 s) and loads it once as examples/train_gemma4_qlora.py does (NF4 + P13, LoRA r16 on
q/k/v/o, non-reentrant checkpointing); then, under a hard 23 GiB cap, it trains the same
LoRA start, on the same samples in the same order, with each configuration switched on and
off on that one model:

- main: what main did before issue 17 (P13's bincount routing, a per-parameter NaN check,
  the Trainer's per-micro-batch token count and NaN filter, bitsandbytes' paged 8-bit AdamW,
  which synchronises after every parameter, the chunked loss, SDPA);
- default: what examples/train_gemma4_qlora.py does by default on a GPU with liger-kernel
  installed: syncs, liger's fused linear cross-entropy, and the wide-head attention of
  `--wide-attention auto` (chunked from 1,024 tokens);
- syncs: main without those device syncs (fused torch AdamW);
- liger: syncs + liger-kernel RMSNorm/GeGLU + fused linear cross-entropy;
- fast: liger + the fastest correct attention kernel of the head_dim-512 layers (measured
  first, below);
- compile: syncs + regional torch.compile of the decoder layers + liger's loss + that
  attention (its warm-up is reported);
- no-ckpt: default with no decoder layer under gradient checkpointing (the example's
  `--checkpoint-layers 0`): no forward recompute in backward, every activation kept (it may
  not fit under the cap at the longer lengths; the run then records the error).

Before loading it measures, on bare tensors: the wide-head attention kernels (forward +
backward of one global layer's attention) and liger's kernels against Gemma 4's own
(values, gradients, time and memory; liger's loss against the chunked loss).

Every run writes its record to OUT/train_step.jsonl as it finishes (and the report to
OUT/train_step.md), so a run cut short by a time limit still leaves what it measured;
`--budget-s` skips the runs that would not finish in time. Per run: tokens/s (median step of
the unprofiled steps), one step under torch.profiler (kernel launches, stream/device syncs,
memcpys, `.item()`s, GPU kernel time; table in OUT/profiles/), one step under
torch.cuda.set_sync_debug_mode("warn") with the Python stack of every sync (OUT/syncs/),
peak allocated/reserved, and the losses.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "examples"), str(ROOT)]

GIB = 2**30
CAP_GIB = 23.0
LENGTHS = (2048, 512, 4096)
LOSS_STEPS = 10  # at the first length: the losses compared between configurations
STEPS = 6  # elsewhere: 2 warm-up, timed, one profiled, one sync-traced
CONFIGS = ("main", "default", "syncs", "liger", "fast", "compile", "no-ckpt")
# Which runs come first: the before/after pair at every length, then compile, then the
# single-switch configurations, so a time limit cuts the least needed.
PLAN = (
    [(length, c) for length in LENGTHS for c in ("main", "default", "fast")]
    + [(length, "no-ckpt") for length in LENGTHS]
    + [(length, "compile") for length in LENGTHS]
    + [(length, c) for length in LENGTHS for c in ("syncs", "liger")]
)
WIDE = {"heads": 16, "kv_heads": 2, "head_dim": 512}  # a 26B-A4B global attention layer


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Results:
    """OUT/train_step.jsonl, appended record by record, and the report beside it."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / "train_step.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        (out / "profiles").mkdir(exist_ok=True)
        (out / "syncs").mkdir(exist_ok=True)

    def add(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        text = report(load_records(self.path))
        partial = self.out / "train_step.md.tmp"
        partial.write_text(text, encoding="utf-8")
        partial.replace(self.out / "train_step.md")


def load_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# ------------------------------------------------------------------ what main did before


def legacy_route(top_k_index, num_experts: int):
    """P13's route() as on main at d675761: bincount syncs to size its output."""
    import torch

    expert_ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    counts = torch.bincount(sorted_ids, minlength=num_experts)
    return perm, torch.cumsum(counts, dim=0, dtype=torch.int32)


def legacy_guard_class():
    import torch
    from qlora_training import NonFiniteGuard

    class LegacyNonFiniteGuard(NonFiniteGuard):
        """NonFiniteGuard as on main at d675761: one isfinite().all() and sync per gradient."""

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            params = [p for p in model.parameters() if p.grad is not None]
            if params and not all(torch.isfinite(p.grad).all() for p in params):
                for p in params:
                    p.grad = None
                self.skipped += 1
            return control

    return LegacyNonFiniteGuard


# ---------------------------------------------------------------------- sync tracing


@contextlib.contextmanager
def traced_syncs(sites: Counter):
    """Count every synchronising CUDA call by the Python frames that made it."""
    import torch

    previous = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return previous(message, category, filename, lineno, file, line)
        frames = [
            f
            for f in traceback.extract_stack()[:-1]
            if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")
        ]
        sites[
            " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1][:4])
        ] += 1
        return None

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = previous


# -------------------------------------------------------------------- profiler counts

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_counts(prof) -> dict:
    from torch.autograd import DeviceType

    counts: Counter = Counter()
    intervals = []
    for event in prof.events():
        name = event.name
        if event.device_type == DeviceType.CUDA:
            intervals.append((event.time_range.start, event.time_range.end))
            continue
        if name in LAUNCHES:
            counts["launches"] += 1
        elif name in SYNCS:
            counts["syncs"] += 1
        elif name == "cudaMemcpyAsync":
            counts["memcpy"] += 1
        elif name == "aten::_local_scalar_dense":
            counts["item"] += 1
    busy, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return {**counts, "kernel_s": round(busy / 1e6, 4)}


# ------------------------------------------------------------------ bare-tensor checks


def close(ours, reference) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    scale = reference.float().abs().max().clamp_min(1e-12)
    return float((ours.float() - reference.float()).abs().max() / scale)


def wide_attention_bench(lengths: tuple[int, ...]) -> list[dict]:
    """Forward + backward of one head_dim-512 causal GQA attention: each kernel against a
    float32 reference (time, extra memory, largest relative error of output and gradients)."""
    import torch
    from fast_paths import SDPA_BACKENDS, chunked_causal_attention, flex_causal_attention
    from gpu_timing import median_ms
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Layer(torch.nn.Module):
        num_key_value_groups = WIDE["heads"] // WIDE["kv_heads"]
        is_causal = True

    layer = Layer()

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])]):
                return sdpa_attention_forward(layer, q, k, v, None, scaling=1.0)[0]

        return run

    def own(attend):
        return lambda q, k, v: attend(q, k, v, 1.0).transpose(1, 2)

    kernels = {name: sdpa(name) for name in SDPA_BACKENDS}
    kernels["chunked"] = own(chunked_causal_attention)
    kernels["flex"] = own(flex_causal_attention)
    rows = []
    for length in lengths:
        gen = torch.Generator(device="cuda").manual_seed(length)
        shape = {"heads": WIDE["heads"], "kv": WIDE["kv_heads"]}
        # Gemma 4 RMS-normalises queries and keys and scales scores by 1: logits of standard
        # deviation ~sqrt(512), where bf16 scores would lose ~0.1 absolute.
        q = torch.randn(1, shape["heads"], length, 512, device="cuda", generator=gen)
        k = torch.randn(1, shape["kv"], length, 512, device="cuda", generator=gen)
        v = torch.randn(1, shape["kv"], length, 512, device="cuda", generator=gen)
        grad = torch.randn(1, length, shape["heads"], 512, device="cuda", generator=gen)
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        with sdpa_kernel([SDPBackend.MATH]):
            reference = sdpa_attention_forward(layer, *inputs, None, scaling=1.0)[0]
        ref_grads = torch.autograd.grad(reference, inputs, grad)
        for name, kernel in kernels.items():
            row = {"kind": "wide_attention", "tokens": length, "kernel": name}
            try:
                half = [t.detach().bfloat16().requires_grad_(True) for t in (q, k, v)]

                step = functools.partial(_attention_step, kernel, half, grad.bfloat16())
                out, grads = step()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                row["extra_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20)
                row["ms"] = round(median_ms(step, repeats=5), 3)
                row["error_out"] = round(close(out, reference), 5)
                row["error_grad"] = round(max(map(close, grads, ref_grads)), 5)
            except Exception as exc:  # a kernel that does not take the shape says why
                row["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            rows.append(row)
            log(f"wide attention {length} {name}: {row}")
        del reference, ref_grads, inputs
        torch.cuda.empty_cache()
    return rows


def _attention_step(kernel, inputs, grad):
    import torch

    out = kernel(*inputs)
    return out, torch.autograd.grad(out, inputs, grad)


def _loss_step(loss_fn, x, labels, weight, window):
    loss = loss_fn(x, labels, weight, 30.0, window)
    loss.backward()
    return loss


def pick_wide_kernel(rows: list[dict]) -> str:
    """The fastest kernel (total time) that ran at every length, within twice the error of
    the efficient kernel (or bf16-level error: 0.02 out, 0.05 grads) and with at most 2 GiB
    of extra memory (the step peaks ~17 GiB at 4,096 tokens; the cap is 23)."""
    by_kernel: dict[str, list[dict]] = {}
    for row in rows:
        by_kernel.setdefault(row["kernel"], []).append(row)
    efficient = {r["tokens"]: r for r in by_kernel.get("efficient", []) if "ms" in r}

    def acceptable(row: dict) -> bool:
        if "ms" not in row or row["extra_peak_mib"] > 2048:
            return False
        reference = efficient.get(row["tokens"], {})
        out_bound = max(0.02, 2 * reference.get("error_out", 0.0))
        grad_bound = max(0.05, 2 * reference.get("error_grad", 0.0))
        return row["error_out"] <= out_bound and row["error_grad"] <= grad_bound

    good = {
        name: sum(r["ms"] for r in group)
        for name, group in by_kernel.items()
        if all(map(acceptable, group))
    }
    return min(good, key=good.get) if good else "efficient"


def liger_checks(lengths: tuple[int, ...]) -> list[dict]:
    """liger's kernels against Gemma 4's own modules and the chunked loss, bf16 on the GPU."""
    import torch
    from fast_paths import use_liger_kernels
    from gpu_timing import median_ms
    from qlora_training import IGNORE_INDEX, chunked_lm_loss, fused_lm_loss
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm, Gemma4TextMLP
    from whole_model_memory import CONFIG_26B_A4B

    rows = []
    config = Gemma4TextConfig(**CONFIG_26B_A4B)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def compare(name: str, module: torch.nn.Module, x: torch.Tensor) -> None:
        x = x.requires_grad_(True)
        out = module(x)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        container = torch.nn.ModuleDict({"m": module})
        undo = use_liger_kernels(container)
        ours = module(x)
        (ours_grad,) = torch.autograd.grad(ours, x, torch.ones_like(ours))
        row = {"kind": "liger", "module": name, "swapped": undo.count}
        row["error_out"] = round(close(ours, out), 5)
        row["error_grad"] = round(close(ours_grad, grad), 5)
        row["ms_liger"] = round(median_ms(lambda: module(x).sum().backward(), repeats=10), 3)
        undo()
        row["ms_eager"] = round(median_ms(lambda: module(x).sum().backward(), repeats=10), 3)
        rows.append(row)
        log(f"liger {name}: {row}")

    hidden = torch.randn(4096, 2816, device="cuda", generator=gen, dtype=torch.bfloat16)
    norm = Gemma4RMSNorm(2816).cuda().bfloat16()
    norm.weight.data = 1 + 0.1 * torch.randn(2816, device="cuda", generator=gen).bfloat16()
    norm.weight.requires_grad_(False)
    compare("RMSNorm(2816) 4096 rows", norm, hidden.clone())

    class VNorm(torch.nn.Module):
        """An attention layer's scale-free v_norm over 512-wide heads."""

        def __init__(self) -> None:
            super().__init__()
            self.head_dim = 512
            self.v_norm = Gemma4RMSNorm(512, with_scale=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.v_norm(x)

    heads = torch.randn(4096, 2, 512, device="cuda", generator=gen, dtype=torch.bfloat16)
    compare("RMSNorm(512, no scale) v_norm", VNorm(), heads)
    mlp = Gemma4TextMLP(config, 0).cuda().bfloat16().requires_grad_(False)
    compare("GeGLU MLP 2816->2112", mlp, hidden.clone() * 0.5)

    weight = 0.02 * torch.randn(262144, 2816, device="cuda", generator=gen, dtype=torch.bfloat16)
    for length in lengths:
        states = torch.randn(1, length, 2816, device="cuda", generator=gen, dtype=torch.bfloat16)
        labels = torch.randint(0, 262144, (1, length), device="cuda", generator=gen)
        labels[:, : length // 4] = IGNORE_INDEX  # a prompt, as in the chat data
        window = int((labels[:, 1:] != IGNORE_INDEX).sum())
        row = {"kind": "loss", "tokens": length}
        for name, loss_fn in (("chunked", chunked_lm_loss), ("liger", fused_lm_loss)):
            x = states.clone().requires_grad_(True)
            step = functools.partial(_loss_step, loss_fn, x, labels, weight, window)
            loss = step()
            row[f"loss_{name}"] = float(loss)
            row[f"grad_{name}"] = x.grad.clone()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            row[f"extra_peak_mib_{name}"] = round(
                (torch.cuda.max_memory_allocated() - base) / 2**20
            )
            row[f"ms_{name}"] = round(median_ms(step, repeats=5), 3)
        row["error_loss"] = abs(row["loss_liger"] - row["loss_chunked"]) / row["loss_chunked"]
        row["error_grad"] = round(close(row.pop("grad_liger"), row.pop("grad_chunked")), 5)
        rows.append(row)
        log(f"loss {length}: {row}")
    return rows


# ------------------------------------------------------------------- the model runs


class Switches:
    """Puts one loaded model into a configuration and back."""

    def __init__(self, model, wide_kernel: str) -> None:
        self.model = model
        self.wide_kernel = wide_kernel
        self.wide = "sdpa"
        self.undo: list = []

    def __enter__(self):
        return self

    def apply(self, config: str, length: int) -> dict:
        import transformers.integrations.bitsandbytes as integration
        from fast_paths import (
            checkpoint_first_layers,
            compile_decoder_layers,
            use_liger_kernels,
            use_wide_head_attention,
        )
        from qlora_training import NonFiniteGuard
        from train_gemma4_qlora import wide_attention_choice

        legacy = config == "main"
        if legacy:
            current = integration.route
            integration.route = legacy_route
            self.undo.append(lambda: setattr(integration, "route", current))
        if config in ("liger", "fast"):
            self.undo.append(use_liger_kernels(self.model))
        if config in ("fast", "compile"):
            self.wide = self.wide_kernel
            if self.wide_kernel != "efficient":
                self.undo.append(use_wide_head_attention(self.model, self.wide_kernel))
        if config in ("default", "no-ckpt"):
            self.wide = wide_attention_choice("auto", True, length)
            if self.wide != "sdpa":
                self.undo.append(use_wide_head_attention(self.model, self.wide))
        if config == "no-ckpt":  # the example's --checkpoint-layers 0
            self.undo.append(checkpoint_first_layers(self.model, 0))
        if config == "compile":
            self.undo.append(compile_decoder_layers(self.model))
        return {
            "guard": legacy_guard_class()() if legacy else NonFiniteGuard(),
            "loss": "liger"
            if config in ("default", "liger", "fast", "compile", "no-ckpt")
            else "chunked",
            "device_tokens": not legacy,
        }

    def __exit__(self, *exc) -> None:
        while self.undo:
            self.undo.pop()()


def trainer_for(model, tokenizer, rows, steps: int, out: Path, setup: dict, probe):
    from qlora_training import Gemma4QLoRATrainer
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    legacy = not setup["device_tokens"]
    arguments = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        max_grad_norm=1.0,
        optim="paged_adamw_8bit" if legacy else "adamw_torch_fused",
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding" if legacy else "no",
        logging_nan_inf_filter=legacy,
        seed=0,
    )
    return Gemma4QLoRATrainer(
        model=model,
        args=arguments,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[setup["guard"], probe],
        loss=setup["loss"],
        count_tokens_on_device=not legacy,
    )


def make_probe(steps: int, name: str, out: Path):
    """A callback that times steps, profiles one and traces the syncs of the next."""
    import torch
    from transformers import TrainerCallback

    profiled, traced = steps - 2, steps - 1

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.losses: list[float] = []
            self.sites: Counter = Counter()
            self.counts: dict = {}
            self._prof = None
            self._trace = None
            self._start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            step = state.global_step
            if step == profiled:
                torch.cuda.synchronize()
                self._prof = torch.profiler.profile(
                    activities=[
                        torch.profiler.ProfilerActivity.CPU,
                        torch.profiler.ProfilerActivity.CUDA,
                    ]
                )
                self._prof.start()
            if step == traced:
                self._finish_profile()
                self._trace = traced_syncs(self.sites)
                self._trace.__enter__()
            return control

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])
            return control

        def on_train_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            if self._trace is not None:
                self._trace.__exit__(None, None, None)
                self._trace = None
            self._finish_profile()
            return control

        def _finish_profile(self) -> None:
            if self._prof is None:
                return
            torch.cuda.synchronize()
            self._prof.stop()
            self.counts = profile_counts(self._prof)
            table = self._prof.key_averages().table(sort_by="cuda_time_total", row_limit=60)
            (out / "profiles" / f"{name}.txt").write_text(table, encoding="utf-8")
            self._prof = None

        def close(self) -> None:
            """Leave no profiler running and no sync tracing on (a run that raised)."""
            if self._trace is not None:
                self._trace.__exit__(None, None, None)
                self._trace = None
            if self._prof is not None:
                self._prof.stop()
                self._prof = None

        def step_seconds(self) -> list[float]:
            marks = [self._start, *self.ends]
            return [b - a for a, b in itertools.pairwise(marks)]

        def timed(self) -> list[float]:
            """Steps after the two warm-up ones, without the profiled and traced steps."""
            return [s for i, s in enumerate(self.step_seconds()) if 2 <= i < profiled]

    return Probe()


def run_one(model, tokenizer, rows, length, config, steps, wide_kernel, results, snapshot):
    import torch

    name = f"{config}-{length}"
    record: dict[str, Any] = {"kind": "run", "config": config, "tokens": length, "steps": steps}
    for parameter_name, parameter in model.named_parameters():
        if parameter_name in snapshot:
            parameter.data.copy_(snapshot[parameter_name])
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    probe = make_probe(steps, name, results.out)
    started = time.perf_counter()
    try:
        with Switches(model, wide_kernel) as switches:
            setup = switches.apply(config, length)
            record["loss_impl"] = setup["loss"]
            record["wide_attention"] = switches.wide
            trainer = trainer_for(
                model, tokenizer, rows, steps, results.out / "trainer", setup, probe
            )
            probe._start = time.perf_counter()
            trainer.train()
            record["skipped_nonfinite"] = setup["guard"].skipped
            del trainer
    except Exception as exc:
        record["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        (results.out / "syncs" / f"{name}.error.txt").write_text(traceback.format_exc())
    finally:
        probe.close()
    model.zero_grad(set_to_none=True)
    seconds = probe.step_seconds()
    timed = probe.timed()
    record.update(
        wall_s=round(time.perf_counter() - started, 1),
        step_s=[round(s, 4) for s in seconds],
        losses=probe.losses,
        peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3),
        **{f"profile_{k}": v for k, v in probe.counts.items()},
    )
    if timed:
        median = statistics.median(timed)
        record["median_step_s"] = round(median, 4)
        record["tokens_per_s"] = round(length / median, 1)
        if "kernel_s" in probe.counts:
            record["gpu_busy"] = round(min(1.0, probe.counts["kernel_s"] / median), 3)
        if len(seconds) >= 2:
            record["warmup_s"] = round(seconds[0] + seconds[1] - 2 * median, 2)
    record["sync_sites"] = dict(probe.sites.most_common())
    record["syncs_traced"] = sum(probe.sites.values())
    lines = [f"{count:5d}  {site}" for site, count in probe.sites.most_common()]
    (results.out / "syncs" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    results.add(record)
    log(
        f"{name}: {record.get('tokens_per_s')} tok/s, {record.get('profile_launches')} launches, "
        f"{record['syncs_traced']} syncs traced, peak {record['peak_allocated_gib']} GiB"
        f"{', ERROR ' + record['error'] if 'error' in record else ''}"
    )


def guarded(results: Results, name: str, measure, *args) -> list[dict]:
    """Run one bare-tensor measurement; its failure is recorded, not fatal to the runs."""
    try:
        rows = measure(*args)
    except Exception as exc:
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        results.add({"kind": "failed", "stage": name, "error": message})
        log(f"{name} failed: {message}")
        return []
    for row in rows:
        results.add(row)
    return rows


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    results = Results(args.out)
    import torch

    versions = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for package in ("transformers", "peft", "accelerate", "bitsandbytes", "triton", "liger-kernel"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    results.add({"kind": "environment", **versions, "date": time.strftime("%Y-%m-%d")})
    log(f"environment: {versions}")

    lengths = tuple(args.lengths)
    wide_rows = guarded(results, "wide_attention_bench", wide_attention_bench, lengths)
    wide_kernel = args.wide_kernel or pick_wide_kernel(wide_rows)
    results.add({"kind": "wide_choice", "kernel": wide_kernel})
    log(f"wide-head attention for fast/compile: {wide_kernel}")
    guarded(results, "liger_checks", liger_checks, lengths)
    gc.collect()
    torch.cuda.empty_cache()

    model, tokenizer, data = load(args, results)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(CAP_GIB * GIB / total)
    plan = [(length, c) for length, c in PLAN if length in lengths and c in args.configs]
    estimates: dict[str, float] = {}
    for length, config in plan:
        steps = steps_for(length, lengths, args.steps)
        guess = estimates.get(config, 40.0) * (steps / STEPS) * max(1.0, length / 2048)
        if time.perf_counter() - started + guess > args.budget_s:
            results.add({"kind": "run", "config": config, "tokens": length, "skipped": "budget"})
            log(f"{config}-{length}: skipped, the time budget would run out")
            continue
        before = time.perf_counter()
        run_one(
            model, tokenizer, data[length], length, config, steps, wide_kernel, results, snapshot
        )
        estimates[config] = (
            (time.perf_counter() - before) * (STEPS / steps) / max(1.0, length / 2048)
        )
    log(f"done in {time.perf_counter() - started:.0f} s")


def steps_for(length: int, lengths: tuple[int, ...], requested: int | None) -> int:
    """Optimizer steps of one run: LOSS_STEPS at the first length (its losses are compared),
    STEPS elsewhere, or `requested` everywhere; the last two are profiled and traced, the
    first two warm up, so STEPS leaves two timed steps and 10 leaves six."""
    if requested is not None:
        return requested
    return LOSS_STEPS if length == lengths[0] else STEPS


def load(args: argparse.Namespace, results: Results):
    """The example's model, LoRA and data, for every length."""
    import torch

    if not (args.ckpt / "config.json").is_file():
        from whole_model_memory import make

        log(f"making the random-weight checkpoint in {args.ckpt}")
        make(args.ckpt)
    import random

    from example_data import WORDS, conversation
    from tiny import build_tokenizer
    from train_gemma4_qlora import (
        add_lora,
        build_dataset,
        enable_checkpointing,
        experts_in_4bit,
        freeze_towers,
        load_model,
        parse_args,
    )

    if not (args.ckpt / "tokenizer.json").is_file():
        build_tokenizer(set(WORDS)).save_pretrained(args.ckpt)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.ckpt)
    data = {}
    rng = random.Random(0)
    for length in args.lengths:
        path = args.out / f"chat{length}.jsonl"
        rows = [conversation(rng, length) for _ in range(LOSS_STEPS)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        example_args = parse_args(
            [
                *("--model", str(args.ckpt), "--data", str(path)),
                *("--output-dir", str(args.out), "--max-length", str(length)),
            ]
        )
        data[length], _ = build_dataset(example_args, tokenizer)
    started = time.perf_counter()
    model = load_model(example_args, "cuda:0")
    load_s = time.perf_counter() - started
    packed, experts = experts_in_4bit(model)
    freeze_towers(model)
    enable_checkpointing(model)
    model, lora_modules = add_lora(model, example_args)
    results.add(
        {
            "kind": "model",
            "load_s": round(load_s, 1),
            "experts_4bit": f"{packed}/{experts}",
            "lora_modules": lora_modules,
            "resident_gib": round(torch.cuda.memory_allocated() / GIB, 3),
        }
    )
    log(f"model loaded in {load_s:.0f} s, experts 4-bit {packed}/{experts}")
    if packed < experts:
        raise SystemExit("P13 is not applied: run python apply_patches.py --apply first")
    return model, tokenizer, data


# ------------------------------------------------------------------------- the report


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def report(records: list[dict]) -> str:
    """bench/results/train_step.md from the records of one `run`."""
    env = next((r for r in records if r["kind"] == "environment"), {})
    model = next((r for r in records if r["kind"] == "model"), {})
    runs = {(r["config"], r["tokens"]): r for r in records if r["kind"] == "run"}
    lines = [
        f"# Training step before and after issue 17 ({env.get('device', '?')}, "
        f"{env.get('date', '?')})",
        "",
        "`bench/train_step.py run`: examples/train_gemma4_qlora.py's model (26B-A4B text config,"
        " random weights, NF4 + P13, LoRA r16 on q/k/v/o, non-reentrant checkpointing), batch 1,"
        f" one process, one load ({_fmt(model.get('load_s'), 1)} s, experts 4-bit "
        f"{model.get('experts_4bit', '?')}), every configuration switched on and off on that "
        f"model, same LoRA start and samples, under a {CAP_GIB:g} GiB cap. "
        + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("kind", "device", "date"))
        + ".",
        "",
        "Step = one optimizer step (forward, backward, clipping, paged 8-bit AdamW, logging). "
        "tokens/s from the median unprofiled step after two warm-up steps; launches, syncs "
        "(cudaStream/Device/EventSynchronize), memcpys and `.item()`s counted by torch.profiler "
        "over one step; GPU busy = kernel time of that step / the median step; syncs traced = "
        "calls torch.cuda.set_sync_debug_mode('warn') reports in one step.",
        "",
    ]
    for length in sorted({t for _, t in runs}):
        base = runs.get(("main", length), {})
        lines += [
            f"## {length:,} tokens",
            "",
            "| config | tokens/s | × main | step s | GPU busy | launches | syncs (profiler) | "
            "syncs traced | .item() | memcpy | peak alloc / reserved GiB | warm-up s | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for config in CONFIGS:
            r = runs.get((config, length))
            if r is None:
                continue
            ratio = None
            if r.get("tokens_per_s") and base.get("tokens_per_s"):
                ratio = r["tokens_per_s"] / base["tokens_per_s"]
            note = r.get("skipped") or r.get("error", "")
            lines.append(
                f"| {config} | {_fmt(r.get('tokens_per_s'))} | {_fmt(ratio, 2)} | "
                f"{_fmt(r.get('median_step_s'), 3)} | {_fmt(r.get('gpu_busy'), 2)} | "
                f"{_fmt(r.get('profile_launches'))} | {_fmt(r.get('profile_syncs'))} | "
                f"{_fmt(r.get('syncs_traced'))} | {_fmt(r.get('profile_item'))} | "
                f"{_fmt(r.get('profile_memcpy'))} | {_fmt(r.get('peak_allocated_gib'), 2)} / "
                f"{_fmt(r.get('peak_reserved_gib'), 2)} | "
                f"{_fmt(r.get('warmup_s'), 1) if config == 'compile' else ''} | {note} |"
            )
        lines.append("")
        lines += _loss_lines(runs, length)
    lines += _wide_lines(records) + _liger_lines(records) + _sync_lines(runs)
    failed = [r for r in records if r["kind"] == "failed"]
    if failed:
        lines += ["## Measurements that failed", ""]
        lines += [f"- {r['stage']}: {r['error']}" for r in failed] + [""]
    return "\n".join(lines) + "\n"


def _loss_lines(runs: dict, length: int) -> list[str]:
    base = runs.get(("main", length), {}).get("losses") or []
    out = []
    for config in CONFIGS[1:]:
        losses = runs.get((config, length), {}).get("losses") or []
        pairs = list(zip(base, losses, strict=False))
        if pairs:
            worst = max(abs(b - a) / max(abs(a), 1e-12) for a, b in pairs)
            out.append(
                f"- losses of {config} vs main, first {len(pairs)} steps: largest relative "
                f"difference {worst:.2%} ({'within' if worst <= 0.01 else 'OUTSIDE'} 1%)"
            )
    if base:
        out.append(f"- main's losses: {', '.join(f'{x:.4f}' for x in base)}")
    return [*out, ""] if out else []


def _wide_lines(records: list[dict]) -> list[str]:
    rows = [r for r in records if r["kind"] == "wide_attention"]
    if not rows:
        return []
    choice = next((r["kernel"] for r in records if r["kind"] == "wide_choice"), "?")
    out = [
        "## Attention of the head_dim-512 layers (one layer, forward + backward, bf16)",
        "",
        f"16 query heads on 2 key/value heads, causal, scale 1, unit-variance q/k/v (Gemma 4 "
        f"normalises q and k). Error = largest difference "
        f"to a float32 reference over its largest magnitude. Chosen for fast/compile: "
        f"**{choice}**.",
        "",
        "| tokens | kernel | ms | extra peak MiB | error out | error grads | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['tokens']:,} | {r['kernel']} | {_fmt(r.get('ms'), 2)} | "
            f"{_fmt(r.get('extra_peak_mib'))} | {_fmt(r.get('error_out'), 4)} | "
            f"{_fmt(r.get('error_grad'), 4)} | {r.get('error', '')} |"
        )
    return [*out, ""]


def _liger_lines(records: list[dict]) -> list[str]:
    modules = [r for r in records if r["kind"] == "liger"]
    losses = [r for r in records if r["kind"] == "loss"]
    out = []
    if modules:
        out += [
            "## liger-kernel against Gemma 4's modules (bf16, forward + backward)",
            "",
            "| module | error out | error grad | ms eager | ms liger |",
            "| --- | --- | --- | --- | --- |",
        ]
        out += [
            f"| {r['module']} | {r['error_out']:.4f} | {r['error_grad']:.4f} | "
            f"{r['ms_eager']:.3f} | {r['ms_liger']:.3f} |"
            for r in modules
        ]
        out.append("")
    if losses:
        out += [
            "## Loss: liger's fused linear cross-entropy against the chunked loss",
            "",
            "LM head 262,144 × 2,816 (bf16), softcap 30, first quarter of the tokens prompt "
            "(ignored), sum over targets / target count; forward + backward w.r.t. the hidden "
            "states.",
            "",
            "| tokens | ms chunked | ms liger | extra peak MiB chunked | liger | "
            "loss rel. diff | grad error |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        out += [
            f"| {r['tokens']:,} | {r['ms_chunked']:.2f} | {r['ms_liger']:.2f} | "
            f"{r['extra_peak_mib_chunked']:,} | {r['extra_peak_mib_liger']:,} | "
            f"{r['error_loss']:.2e} | {r['error_grad']:.4f} |"
            for r in losses
        ]
        out.append("")
    return out


def _sync_lines(runs: dict) -> list[str]:
    """Where each configuration's syncs come from, at the length with the most steps."""
    if not runs:
        return []
    length = max(runs.values(), key=lambda r: r.get("steps", 0))["tokens"]
    out = []
    for config in CONFIGS:
        sites = runs.get((config, length), {}).get("sync_sites")
        if sites:
            out += [f"## Syncs of one {config} step by their Python stack ({length:,} tokens)", ""]
            out += [f"- {count} × `{site}`" for site, count in sites.items()]
            out.append("")
    return out


def step_count(text: str) -> int:
    """--steps: at least STEPS (two warm-up steps, two timed, one profiled, one traced)."""
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not STEPS <= steps <= 200:
        raise argparse.ArgumentTypeError(f"{steps} is outside {STEPS}..200")
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="measure on the GPU")
    go.add_argument("--ckpt", type=Path, default=Path("/tmp/ckpt-26b"))
    go.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/train-step")))
    go.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    go.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    go.add_argument("--wide-kernel", help="skip the choice: use this wide-head attention")
    go.add_argument("--budget-s", type=float, default=540, help="skip runs past this time")
    go.add_argument(
        "--steps",
        type=step_count,
        metavar=f"{STEPS}..200",
        help=f"steps of every run (default {LOSS_STEPS} at the first length, {STEPS} elsewhere; "
        "all but four are timed)",
    )
    show = sub.add_parser("report", help="markdown from a run's records")
    show.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "report":
        path = args.out / "train_step.jsonl" if args.out.is_dir() else args.out
        if not path.is_file():
            print(f"error: {path}: no such file (give the OUT of a run)", file=sys.stderr)
            sys.exit(2)
        print(report(load_records(path)), end="")
        return
    import torch

    if not torch.cuda.is_available():
        print("error: bench/train_step.py run needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    run(args)


if __name__ == "__main__":
    main()
