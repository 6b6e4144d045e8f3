"""One full-size Gemma 4 26B-A4B experts layer, forward + backward w.r.t. its input, side by side.

Variants, all in one run on one GPU:
  bf16-eager       transformers' Gemma4TextExperts, per-expert loop (experts_implementation="eager")
  bf16-grouped     the same module with experts_implementation="grouped_mm"
  nf4-linear4bit   one bitsandbytes Linear4bit per expert (the post-load swap of unsloth's PR)
  nf4-dequant-ours-<N>MiB
                   patches/inject/experts_4bit.py with kernel="dequantize": fused 3D weights
                   packed in NF4, dequantized N MiB of experts at a time, grouped GEMM,
                   re-dequantized in backward
  nf4-fused-ours   the same packed weights through the fused Triton 4-bit grouped GEMM of
                   patches/inject/experts_4bit_triton.py (what P13 runs on a GPU)
  nf4-fused-ours+lora<r>
                   the fused path with LoRA rank r on both fused weights, run as P15 runs it
                   (trainable float32 A and B, gradients for them too): a small kernel for
                   the rank-r rows, their up-projection in the fused 4-bit kernel's
                   epilogue, forward and backward, and one small kernel per factor for its
                   gradient
  nf4-fused-ours+lora<r>-unfused
                   the same with STACKPATCH_EXPERT_LORA_KERNEL=unfused, the path before the
                   fusion: two low-rank grouped GEMMs per weight beside the 4-bit kernel
  bf16-grouped+peft-lora<r>
                   bf16-grouped wrapped by stock peft's ParamWrapper (target_parameters) with
                   the same A and B: it folds B_e A_e into the whole weight on every forward

For each token count: median ms over timed repeats (CUDA events), ratio to bf16-grouped,
extra peak memory over the resident weights, and the output's cosine similarity to
bf16-grouped. The fused kernel's output is also compared with the dequantize path's (same
packed weights, so they must agree to bf16 rounding): the script exits 1 if they do not.
Prints a table and writes JSON + Markdown under --out.

    python bench/moe_experts.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_timing import fused_kernel_configs, median_ms

from patches.inject.experts_4bit import ExpertLoRA, experts_4bit_forward, pack_experts
from patches.inject.experts_4bit_triton import fused_4bit_available

EXPERTS, HIDDEN, INTERMEDIATE, TOP_K = 128, 2816, 704, 8


def make_experts(variant: str):
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    config = Gemma4TextConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=INTERMEDIATE,
        num_experts=EXPERTS,
        top_k_experts=TOP_K,
        enable_moe_block=True,
        hidden_activation="gelu_pytorch_tanh",
    )
    config._experts_implementation = variant
    torch.manual_seed(0)
    experts = Gemma4TextExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    experts.config = config
    return experts.to("cuda", torch.bfloat16).requires_grad_(False)


def linear4bit_forward(reference) -> Callable:
    import bitsandbytes as bnb

    def quantized(weight: torch.Tensor) -> torch.nn.ModuleList:
        layers = torch.nn.ModuleList()
        for e in range(weight.shape[0]):
            layer = bnb.nn.Linear4bit(
                weight.shape[2],
                weight.shape[1],
                bias=False,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
                compress_statistics=True,
            )
            layer.weight = bnb.nn.Params4bit(
                weight[e].detach().cpu(), requires_grad=False, quant_type="nf4"
            )
            layers.append(layer)
        return layers.to("cuda")

    gate_up, down = quantized(reference.gate_up_proj), quantized(reference.down_proj)
    act = reference.act_fn

    def forward(x, top_k_index, top_k_weights):
        out = torch.zeros_like(x)
        for e in range(EXPERTS):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            gate, up = gate_up[e](x[token]).chunk(2, dim=-1)
            y = down[e](act(gate) * up) * top_k_weights[token, slot, None]
            out = out.index_add(0, token, y.to(out.dtype))
        return out

    return forward


def peft_wrapped(experts, rank: int):
    """`experts` under stock peft ParamWrappers on both fused weights, A and B random (B is not
    left at zero: both variants must compute a real update)."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = torch.nn.Module()
    holder.experts = experts
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights=False,
    )
    inject_adapter_in_model(config, holder)
    for name, parameter in holder.named_parameters():
        if "lora_" in name:
            parameter.data = (parameter.data.float() * 0.1).contiguous()
            parameter.requires_grad_(True)
    return holder.experts


def adapters_of(wrapped) -> dict[str, ExpertLoRA]:
    """The peft wrappers' A and B (the same tensors), in the form P15 hands to P13."""
    found = {}
    module = wrapped
    while hasattr(module, "parameter_name"):
        found[module.parameter_name] = ExpertLoRA(
            module.lora_A["default"].weight,
            module.lora_B["default"].weight,
            module.scaling["default"],
        )
        module = module.base_layer
    return found


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(
        a.float().flatten(), b.float().flatten(), dim=0
    ).item()


def lora_paths_agree(
    fused: Callable, dequantize: Callable, lora: dict[str, ExpertLoRA], x, idx, weights
) -> dict[str, float]:
    """One forward + backward through each path on the same packed weights and adapters: the
    cosine of their outputs and of the gradients of x and of every A and B."""
    grad = torch.randn_like(x)
    factors = [t for adapter in lora.values() for t in (adapter.lora_A, adapter.lora_B)]
    seen = []
    for fn in (fused, dequantize):
        x.grad = None
        for t in factors:
            t.grad = None
        out = fn(x, idx, weights)
        out.backward(grad)
        seen.append([out.detach(), x.grad.clone(), *(t.grad.clone() for t in factors)])
    names = ["output", "grad_x"] + [
        f"grad_{name}.{ab}" for name in lora for ab in ("lora_A", "lora_B")
    ]
    return {n: round(cosine(a, b), 6) for n, a, b in zip(names, *seen, strict=True)}


def profile_variants(variants: dict[str, Callable], tokens: int, out: Path) -> None:
    """One forward + backward of each variant under torch.profiler: its kernel table."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(1)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights, idx = torch.topk(torch.randn(tokens, EXPERTS, device="cuda").softmax(-1), TOP_K)
    weights = weights.to(torch.bfloat16)
    grad = torch.randn_like(x)
    for name, fn in variants.items():
        fn(x, idx, weights).backward(grad)  # warm
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn(x, idx, weights).backward(grad)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        (out / f"moe_experts-profile-{name}-{tokens}.txt").write_text(table)


def time_fwd_bwd(
    fn: Callable, x: torch.Tensor, idx, weights, repeats: int, leaves: Sequence[torch.Tensor] = ()
) -> tuple[float, int, torch.Tensor]:
    grad = torch.randn_like(x)

    def step() -> torch.Tensor:
        # As a training step after optimizer.zero_grad(): gradients are written, not added.
        for leaf in (x, *leaves):
            leaf.grad = None
        out = fn(x, idx, weights)
        out.backward(grad)
        return out

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    return median_ms(step, repeats, warmup=0), extra, out.detach()


# Issue 12's targets for expert LoRA on one layer at 2,048 tokens, against the fused path
# without LoRA (time ratio, extra peak GiB) and BF16 grouped_mm under stock peft (time ratio).
TARGET_TOKENS, TARGET_RATIO, TARGET_EXTRA_GIB, TARGET_PEFT_RATIO = 2048, 1.25, 0.25, 1.0


def lora_ratios(by: dict, tokens: int, variant: str, rank: int) -> tuple[float, float, float]:
    """(time over nf4-fused-ours, extra peak GiB over it, time over bf16-grouped+peft)."""
    ours, fused = by[(tokens, variant)], by[(tokens, "nf4-fused-ours")]
    peft = by[(tokens, f"bf16-grouped+peft-lora{rank}")]
    return (
        ours["median_ms"] / fused["median_ms"],
        ours["extra_peak_gib"] - fused["extra_peak_gib"],
        ours["median_ms"] / peft["median_ms"],
    )


def lora_verdict(by: dict, rank: int) -> str:
    """Whether the fused LoRA variant meets each target, in one line."""
    ratio, extra, peft = lora_ratios(by, TARGET_TOKENS, f"nf4-fused-ours+lora{rank}", rank)
    checks = (
        (f"{ratio:.3f}x nf4-fused-ours (<= {TARGET_RATIO}x)", ratio <= TARGET_RATIO),
        (f"+{extra:.3f} GiB peak (<= {TARGET_EXTRA_GIB})", extra <= TARGET_EXTRA_GIB),
        (f"{peft:.3f}x bf16-grouped+peft (< {TARGET_PEFT_RATIO}x)", peft < TARGET_PEFT_RATIO),
    )
    verdicts = ", ".join(f"{text}: {'met' if ok else 'MISSED'}" for text, ok in checks)
    return f"nf4-fused-ours+lora{rank} at {TARGET_TOKENS:,} tokens: {verdicts}"


def lora_summary(rows: list[dict], rank: int) -> list[str]:
    """Expert LoRA against its two references, per token count: time over the fused path
    without LoRA, extra peak over it, and time over stock peft on BF16 experts; the fused
    LoRA path and the unfused one side by side, and the targets judged."""
    if not rank:
        return []
    by = {(r["tokens"], r["variant"]): r for r in rows}
    lines = [
        "",
        f"Expert LoRA r{rank} (targets at {TARGET_TOKENS:,} tokens: <= {TARGET_RATIO}x, "
        f"<= {TARGET_EXTRA_GIB} GiB, < {TARGET_PEFT_RATIO}x):",
        "",
        "| tokens | variant | × nf4-fused-ours | extra peak over it GiB | × bf16-grouped+peft |",
        "| --- | --- | --- | --- | --- |",
    ]
    references = ("nf4-fused-ours", f"bf16-grouped+peft-lora{rank}")
    for suffix in ("", "-unfused"):
        variant = f"nf4-fused-ours+lora{rank}{suffix}"
        for tokens in sorted({r["tokens"] for r in rows}):
            if all((tokens, v) in by for v in (variant, *references)):
                ratio, extra, peft = lora_ratios(by, tokens, variant, rank)
                lines.append(f"| {tokens} | {variant} | {ratio:.3f} | {extra:.3f} | {peft:.3f} |")
    if all((TARGET_TOKENS, v) in by for v in (f"nf4-fused-ours+lora{rank}", *references)):
        lines += ["", lora_verdict(by, rank)]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[], help="variants to leave out")
    parser.add_argument(
        "--chunk-mb",
        type=int,
        nargs="+",
        default=[256],
        help="dequantization chunk budgets to compare for nf4-dequant-ours (MiB of BF16 weights)",
    )
    parser.add_argument("--lora-rank", type=int, default=16, help="0: no LoRA variants")
    parser.add_argument(
        "--profile-tokens",
        type=int,
        default=0,
        help="also write torch.profiler kernel tables of the fused variants at this size",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()

    import bitsandbytes
    import transformers

    grouped = make_experts("grouped_mm")
    eager = make_experts("eager")
    packed_gate_up, packed_down = (
        pack_experts(grouped.gate_up_proj.data),
        pack_experts(grouped.down_proj.data),
    )

    def ours(
        kernel: str, chunk_mb: int = 256, lora: dict | None = None, lora_kernel: str = "auto"
    ) -> Callable:
        lora = lora or {}

        def forward(x, idx, w):
            chunk = chunk_mb * 2**20
            gate = grouped._apply_gate
            return experts_4bit_forward(
                packed_gate_up,
                packed_down,
                gate,
                x,
                idx,
                w,
                chunk,
                kernel,
                gate_up_lora=[lora["gate_up_proj"]] if "gate_up_proj" in lora else (),
                down_lora=[lora["down_proj"]] if "down_proj" in lora else (),
                lora_kernel=lora_kernel,
            )

        return forward

    probe = torch.zeros(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    if not fused_4bit_available(probe, packed_gate_up.state):
        print("the fused 4-bit kernel cannot run here (no Triton, or a GPU older than sm80)")
        return 1
    variants: dict[str, Callable] = {"bf16-eager": eager, "bf16-grouped": grouped}
    for chunk_mb in args.chunk_mb:
        variants[f"nf4-dequant-ours-{chunk_mb}MiB"] = ours("dequantize", chunk_mb)
    variants["nf4-fused-ours"] = ours("auto")
    if args.lora_rank:
        peft_experts = peft_wrapped(make_experts("grouped_mm"), args.lora_rank)
        variants[f"bf16-grouped+peft-lora{args.lora_rank}"] = peft_experts
        for lora_kernel, suffix in (("auto", ""), ("unfused", "-unfused")):
            variants[f"nf4-fused-ours+lora{args.lora_rank}{suffix}"] = ours(
                "auto", lora=adapters_of(peft_experts), lora_kernel=lora_kernel
            )
    if "nf4-linear4bit" not in args.skip:
        variants["nf4-linear4bit"] = linear4bit_forward(grouped)
    for name in args.skip:
        variants.pop(name, None)
    resident = {
        "bf16": (grouped.gate_up_proj.numel() + grouped.down_proj.numel()) * 2,
        "nf4-packed": packed_gate_up.nbytes() + packed_down.nbytes(),
    }

    trainable = []
    if args.lora_rank:
        trainable = [p for p in peft_experts.parameters() if p.requires_grad]
    rows, agreement, lora_agreement = [], {}, {}
    for tokens in args.tokens:
        torch.manual_seed(tokens)
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        probs = torch.randn(tokens, EXPERTS, device="cuda").softmax(-1)
        weights, idx = torch.topk(probs, TOP_K)
        weights = (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)
        results = {}
        for name, fn in variants.items():
            ms, extra, out = time_fwd_bwd(fn, x, idx, weights, args.repeats, trainable)
            results[name] = (ms, extra, out)
        base_ms, _, base_out = results["bf16-grouped"]
        fused_out = results["nf4-fused-ours"][2]
        dequant_out = ours("dequantize")(x, idx, weights).detach()
        agreement[tokens] = cosine(fused_out, dequant_out)
        if args.lora_rank:
            lora = adapters_of(peft_experts)
            lora_agreement[tokens] = lora_paths_agree(
                ours("auto", lora=lora), ours("dequantize", lora=lora), lora, x, idx, weights
            )
        for name, (ms, extra, out) in results.items():
            rows.append(
                {
                    "tokens": tokens,
                    "variant": name,
                    "median_ms": round(ms, 3),
                    "ratio_to_bf16_grouped": round(ms / base_ms, 3),
                    "extra_peak_gib": round(extra / 2**30, 3),
                    "cosine_to_bf16_grouped": round(cosine(out, base_out), 4),
                }
            )

    meta = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": platform.python_version(),
        "shape": {
            "experts": EXPERTS,
            "hidden": HIDDEN,
            "intermediate": INTERMEDIATE,
            "top_k": TOP_K,
        },
        "resident_weights_gib": {k: round(v / 2**30, 3) for k, v in resident.items()},
        "repeats": args.repeats,
        "fused_vs_dequantize_cosine": {t: round(c, 6) for t, c in agreement.items()},
        "lora_fused_vs_dequantize_cosine": lora_agreement,
        "fused_kernel_configs": fused_kernel_configs(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_experts.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# MoE experts layer benchmark ({meta['device']}, {meta['date']})",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, bitsandbytes "
        f"{meta['bitsandbytes']}; one layer E={EXPERTS}, H={HIDDEN}, I={INTERMEDIATE}, "
        f"top-{TOP_K}; forward + backward "
        f"w.r.t. the input, weights frozen; median of {args.repeats}. Resident weights: "
        f"bf16 {meta['resident_weights_gib']['bf16']} GiB, NF4 packed "
        f"{meta['resident_weights_gib']['nf4-packed']} GiB. Fused kernel vs dequantize path "
        f"(same packed weights), output cosine per token count: "
        f"{meta['fused_vs_dequantize_cosine']}.",
        "",
        "| tokens | variant | median ms | × bf16 grouped | extra peak GiB | cosine to bf16 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['tokens']} | {row['variant']} | {row['median_ms']} | "
            f"{row['ratio_to_bf16_grouped']} | {row['extra_peak_gib']} | "
            f"{row['cosine_to_bf16_grouped']} |"
        )
    lines += lora_summary(rows, args.lora_rank)
    (args.out / "moe_experts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("fused kernel tile configs chosen by the autotuner:", meta["fused_kernel_configs"])
    if args.profile_tokens:
        fused = {n: fn for n, fn in variants.items() if n.startswith("nf4-fused-ours")}
        profile_variants(fused, args.profile_tokens, args.out)
    if lora_agreement:
        print("expert LoRA, fused vs dequantize path (output, grads):", lora_agreement)
    # Same packed weights, so the two paths differ only by bf16 rounding and summation order.
    lora_ok = all(c > 0.999 for checks in lora_agreement.values() for c in checks.values())
    return 0 if min(agreement.values()) > 0.9999 and lora_ok else 1


if __name__ == "__main__":
    sys.exit(main())
