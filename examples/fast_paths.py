"""Faster paths for the Gemma 4 training step, each switchable on and off on a loaded model.

A 26B-A4B QLoRA step at batch 1 launches ~22,000 kernels; most are the elementwise pieces of
Gemma 4's eleven RMSNorms per decoder layer (float casts, pow, mean, rsqrt, two multiplies,
a cast back: ~9 kernels forward and more in backward, run again by checkpointing), its GeGLU
and its residual arithmetic. At 512 tokens the host cannot launch them as fast as the GPU
runs them; at 4,096 they are half the GPU time. Three independent remedies:

- `use_liger_kernels`: liger-kernel's Triton RMSNorm (one kernel forward, one backward) for
  every Gemma4RMSNorm of the language model, the scale-free ones included, and its fused
  GeGLU for every dense MLP, those beside the experts too. liger's own
  `apply_liger_kernel_to_gemma4_text(model=...)` on a loaded model patches only the four
  standard norms and q/k_norm of a layer and skips the MLP of MoE layers: on 26B-A4B, no
  MLP and 5 of the 11 norms per layer stay (`pre_feedforward_layernorm_2`,
  `post_feedforward_layernorm_1/_2`, the router's norm, v_norm). Called before loading it
  swaps the classes instead (every MLP, the scaled norms; scale-free norms keep PyTorch
  code inside liger's class) and replaces the model's forward with its own loss, which
  this example's loss (assistant-only targets, window normalisation) must not lose.
- `compile_decoder_layers`: regional torch.compile of each decoder layer (one compiled code
  for all layers of a kind), with bitsandbytes' 4-bit matmuls and P13's packed experts left
  out of the graph: Inductor fuses what lies between them.
- `use_wide_head_attention`: another attention kernel for the head_dim-512 global layers,
  which PyTorch's flash kernel does not take (SDPA falls back to the memory-efficient one).

Each returns an `Undo` that puts the model back as it was, so a benchmark can compare both
paths on one loaded model; the example keeps them for the run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain
from types import MethodType
from typing import Any

import torch

TOWERS = ("vision", "audio")  # frozen and unused by text-only training: left as they are
WIDE_HEAD_DIM = 512
WIDE_ATTENTION = "sdpa_wide_heads"  # the attention implementation name registered below
WIDE_KERNELS = ("efficient", "cudnn", "flash", "math", "chunked", "flex")


class Undo:
    """Restores what a fast path changed, in reverse order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0  # what was switched (modules, layers, configs)
        self.excluded = 0  # what was deliberately left out (compile: eager modules)
        self._steps: list[Callable[[], None]] = []

    def add(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def __call__(self) -> None:
        while self._steps:
            self._steps.pop()()


def _override_forward(module: torch.nn.Module, forward: Callable, undo: Undo) -> None:
    """Replace `module.forward` on the instance only; undo deletes the instance attribute."""
    had_own = "forward" in vars(module)
    previous = vars(module).get("forward")
    module.forward = forward

    def restore() -> None:
        if had_own:
            module.forward = previous
        else:
            del module.forward

    undo.add(restore)
    undo.count += 1


def language_modules(model: torch.nn.Module, class_name: str) -> list[torch.nn.Module]:
    return [
        module
        for name, module in model.named_modules()
        if type(module).__name__ == class_name and not any(t in name for t in TOWERS)
    ]


# ----------------------------------------------------------------------------- liger-kernel


def _liger_rms_norm(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Gemma4RMSNorm.forward by liger: float32 statistics, x * rsqrt(mean(x^2) + eps) * w,
    cast back (casting mode "gemma", offset 0: Gemma 4 scales by w, not 1 + w)."""
    from liger_kernel.ops import LigerRMSNormFunction

    if self.with_scale:
        weight = self.weight
    else:
        weight = self._stackpatch_unit_scale
        if weight.device != hidden_states.device:  # a holder without tensors built it on CPU
            self._stackpatch_unit_scale = weight = weight.to(hidden_states.device)
    return LigerRMSNormFunction.apply(hidden_states, weight, self.eps, 0.0, "gemma", False, None)


def _liger_geglu_mlp(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops import LigerGELUMulFunction

    return self.down_proj(LigerGELUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def use_liger_kernels(model: torch.nn.Module) -> Undo:
    """liger's RMSNorm on every Gemma4RMSNorm and its GeGLU on every dense Gemma4TextMLP.

    Scale-free norms (v_norm, the router's norm) get a unit weight: multiplying by 1.0 in
    float32 is exact, so they compute what Gemma 4's own forward does. An MLP whose
    activation is not tanh-approximated GELU (liger's only GeGLU) is left alone."""
    undo = Undo("liger")
    modules = dict(model.named_modules())
    for name, norm in modules.items():
        if type(norm).__name__ != "Gemma4RMSNorm" or any(t in name for t in TOWERS):
            continue
        if not norm.with_scale:
            # v_norm normalises one head (its attention's head_dim), the router's norm the
            # hidden state; neither keeps a weight to read the width from.
            parent = modules[name.rsplit(".", 1)[0]]
            width = getattr(parent, "head_dim", None) or parent.hidden_size
            anchor = next(chain(parent.parameters(), parent.buffers(), model.parameters()), None)
            device = anchor.device if anchor is not None else None
            norm.register_buffer(
                "_stackpatch_unit_scale", torch.ones(width, device=device), persistent=False
            )
            undo.add(functools.partial(delattr, norm, "_stackpatch_unit_scale"))
        _override_forward(norm, MethodType(_liger_rms_norm, norm), undo)
    for mlp in language_modules(model, "Gemma4TextMLP"):
        if getattr(mlp.config, "hidden_activation", None) == "gelu_pytorch_tanh":
            _override_forward(mlp, MethodType(_liger_geglu_mlp, mlp), undo)
    return undo


# ------------------------------------------------------------------------- torch.compile


def _is_opaque(module: torch.nn.Module) -> bool:
    """Modules left out of compiled graphs: bitsandbytes' 4-bit/8-bit linear layers (tensor
    subclass weights and an autograd.Function over a QuantState) and the MoE experts (P13's
    autograd.Function over packed weights launches an autotuned Triton kernel; BF16 experts
    run grouped_mm, one kernel with nothing to fuse, whose CPU fallback op AOTAutograd
    cannot differentiate)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Gemma4TextExperts")


def checkpoint_first_layers(model: torch.nn.Module, count: int) -> Undo:
    """Gradient checkpointing stays on the language model's first `count` decoder layers and
    goes off on the rest, which keep their activations from forward to backward instead of
    running their forward again in backward; the undo restores each layer's setting."""
    undo = Undo("checkpoint-layers")
    for layer in language_modules(model, "Gemma4TextDecoderLayer")[count:]:
        undo.add(
            functools.partial(
                setattr, layer, "gradient_checkpointing", layer.gradient_checkpointing
            )
        )
        layer.gradient_checkpointing = False
        undo.count += 1
    return undo


def compile_decoder_layers(
    model: torch.nn.Module, dynamic: bool = True, backend: str = "inductor"
) -> Undo:
    """torch.compile each Gemma4TextDecoderLayer's forward (checkpointing stays outside).

    `dynamic=True` compiles shape-generic code from the start. With automatic dynamic shapes
    the layers of the other attention kind (other head dims), or the next batch length,
    make dynamo add a dynamic graph beside the static one, and checkpointing's recomputation
    in backward may then run the other graph than forward did, which saves other tensors:
    "Recomputed values for the following tensors have different metadata" (seen on CPU with
    the tiny model; https://github.com/pytorch/pytorch/issues/166926). `backend` is
    torch.compile's ("aot_eager" traces and partitions the same graphs without generating
    kernels: what the CPU tests use)."""
    undo = Undo("compile")
    for module in model.modules():
        if _is_opaque(module):
            _override_forward(module, torch.compiler.disable(module.forward), undo)
    undo.excluded, undo.count = undo.count, 0  # count the compiled layers only
    for layer in language_modules(model, "Gemma4TextDecoderLayer"):
        # nn.Module.compile compiles _call_impl; GradientCheckpointingLayer.__call__ wraps
        # that in checkpoint(), so the recomputation in backward reruns the compiled code.
        layer.compile(dynamic=dynamic, backend=backend)
        undo.add(functools.partial(setattr, layer, "_compiled_call_impl", None))
        undo.count += 1
    undo.add(torch._dynamo.reset)
    return undo


# ------------------------------------------------------------ attention of wide heads


def _matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b with float32 results: on the GPU straight from bf16/fp16 tensor cores
    (`out_dtype`, which has no autograd formula: used inside ChunkedCausalAttention only)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _chunk_probabilities(q3, k3, scale, start, lse=None):
    """Scores of queries [start, start + rows) (stacked by GQA group) against keys [0, stop):
    float32, future keys at -inf; softmax probabilities by `lse` (computed when None)."""
    groups_rows, stop = q3.shape[1], k3.shape[1]
    rows = stop - start
    scores = _matmul_f32(q3, k3.transpose(1, 2)) * scale
    positions = torch.arange(start, stop, device=q3.device).repeat(groups_rows // rows)
    future = torch.arange(stop, device=q3.device)[None, :] > positions[:, None]
    scores = scores.masked_fill(future, -torch.inf)
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]), lse


def _grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """(query shape, key/value heads, query heads per key head, keys and values as
    (batch x key heads, length, dim))."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    k3 = key.reshape(batch * kv_heads, length, dim)
    v3 = value.reshape(batch * kv_heads, length, dim)
    return query.shape, kv_heads, heads // kv_heads, k3, v3


class ChunkedCausalAttention(torch.autograd.Function):
    """Causal attention by matmuls, a chunk of queries at a time, flash-style: float32
    scores and softmax, bf16 probabilities into P @ V; backward recomputes each chunk's
    probabilities from the saved log-sum-exp, so no (queries x keys) tensor outlives its
    chunk. q (B, H, S, D), k/v (B, KV, S, D) with H a multiple of KV (GQA, not copied)."""

    @staticmethod
    def forward(ctx, query, key, value, scale, chunk):  # type: ignore[override]
        (batch, heads, length, dim), kv_heads, groups, k3, v3 = _grouped(query, key, value)
        out = torch.empty_like(query)
        lse_all = query.new_empty((batch, heads, length), dtype=torch.float32)
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            rows = stop - start
            q3 = query[:, :, start:stop].reshape(batch * kv_heads, groups * rows, dim)
            probs, lse = _chunk_probabilities(q3, k3[:, :stop], scale, start)
            o3 = torch.bmm(probs.to(value.dtype), v3[:, :stop])
            out[:, :, start:stop] = o3.view(batch, heads, rows, dim)
            lse_all[:, :, start:stop] = lse.view(batch, heads, rows)
        ctx.save_for_backward(query, key, value, out, lse_all)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        query, key, value, out, lse_all = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        (batch, heads, length, dim), kv_heads, groups, k3, v3 = _grouped(query, key, value)
        grad_q = torch.empty_like(query)
        grad_k = torch.zeros(k3.shape, dtype=torch.float32, device=key.device)
        grad_v = torch.zeros(v3.shape, dtype=torch.float32, device=value.device)
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            rows = stop - start

            def stacked(t: torch.Tensor, start=start, stop=stop, rows=rows) -> torch.Tensor:
                return t[:, :, start:stop].reshape(batch * kv_heads, groups * rows, -1)

            q3, do3 = stacked(query), stacked(grad_out.to(query.dtype))
            lse = stacked(lse_all[..., None])[..., 0]
            probs, _ = _chunk_probabilities(q3, k3[:, :stop], scale, start, lse)
            grad_v[:, :stop] += _matmul_f32(probs.to(value.dtype).transpose(1, 2), do3)
            grad_probs = _matmul_f32(do3, v3[:, :stop].transpose(1, 2))
            delta = (do3.float() * stacked(out).float()).sum(-1, keepdim=True)
            grad_scores = (probs * (grad_probs - delta) * scale).to(query.dtype)
            grad_q3 = _matmul_f32(grad_scores, k3[:, :stop])
            grad_q[:, :, start:stop] = grad_q3.view(batch, heads, rows, dim).to(query.dtype)
            grad_k[:, :stop] += _matmul_f32(grad_scores.transpose(1, 2), q3)
        return (
            grad_q,
            grad_k.view(key.shape).to(key.dtype),
            grad_v.view(value.shape).to(value.dtype),
            None,
            None,
        )


def chunked_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    chunk: int = 1024,
) -> torch.Tensor:
    """Causal attention by matmuls, `chunk` queries at a time; (B, H, S, D) in and out
    (ChunkedCausalAttention). Memory beyond inputs and output: one chunk's float32 scores."""
    return ChunkedCausalAttention.apply(query, key, value, scale, chunk)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _causal_block_mask(length: int, device: str) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q, k):
        return q >= k

    return create_block_mask(causal, None, None, length, length, device=device)


# FlexAttention's default tiles keep Q, K and V blocks in shared memory; at head_dim 512
# they do not fit (out of resource: shared memory), so wide heads take small tiles, one stage.
FLEX_WIDE_OPTIONS = {
    "fwd_BLOCK_M": 32,
    "fwd_BLOCK_N": 32,
    "bwd_BLOCK_M1": 16,
    "bwd_BLOCK_N1": 32,
    "bwd_BLOCK_M2": 32,
    "bwd_BLOCK_N2": 16,
    "num_stages": 1,
}


def flex_causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    mask = _causal_block_mask(query.shape[2], str(query.device))
    options = FLEX_WIDE_OPTIONS if query.shape[-1] > 256 else None
    return _compiled_flex()(
        query, key, value, block_mask=mask, scale=scale, enable_gqa=True, kernel_options=options
    )


SDPA_BACKENDS = {
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "math": "MATH",
}
_wide_kernel: dict[str, Any] = {}  # kernel and head_dim of the registered attention


def wide_head_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except for causal, unmasked heads of WIDE_HEAD_DIM."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kernel = _wide_kernel.get("kernel", "efficient")
    wide = query.shape[-1] == _wide_kernel.get("head_dim", WIDE_HEAD_DIM)
    wide = wide and attention_mask is None and dropout == 0.0
    wide = wide and getattr(module, "is_causal", True) and query.shape[2] == key.shape[2] > 1
    if not wide:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    if kernel in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[kernel])]):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout, scaling, **kwargs
            )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    attend = chunked_causal_attention if kernel == "chunked" else flex_causal_attention
    return attend(query, key, value, scale).transpose(1, 2).contiguous(), None


def use_wide_head_attention(
    model: torch.nn.Module, kernel: str, head_dim: int = WIDE_HEAD_DIM
) -> Undo:
    """Run the attention of layers with `head_dim` (Gemma 4's global layers: 512) by `kernel`
    (WIDE_KERNELS) where it is causal and unmasked; everything else keeps SDPA as it
    dispatches. Registers WIDE_ATTENTION with transformers (its masks are SDPA's) and
    switches the text config to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if kernel not in WIDE_KERNELS:
        raise ValueError(f"wide-head attention {kernel!r}: expected one of {WIDE_KERNELS}")
    AttentionInterface.register(WIDE_ATTENTION, wide_head_attention)
    AttentionMaskInterface.register(WIDE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    undo = Undo("attention")
    previous = dict(_wide_kernel)
    _wide_kernel.update(kernel=kernel, head_dim=head_dim)
    configs = {id(c): c for c in _configs_of(model)}.values()
    for config in configs:
        before = config._attn_implementation
        config._attn_implementation = WIDE_ATTENTION
        undo.add(functools.partial(setattr, config, "_attn_implementation", before))
        undo.count += 1

    def restore_kernel() -> None:
        _wide_kernel.clear()
        _wide_kernel.update(previous)

    undo.add(restore_kernel)
    return undo


def _configs_of(model: torch.nn.Module) -> list[Any]:
    """The text configs the attention layers and mask builders read."""
    return [
        module.config.get_text_config()
        for module in model.modules()
        if type(module).__name__ in ("Gemma4TextModel", "Gemma4TextAttention")
    ]
