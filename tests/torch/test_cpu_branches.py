"""What bitsandbytes' CPU backend does differently by the CPU's instruction set (issue 16).

These tests depend on the CPU they run on, and say which branch they checked:
- bitsandbytes' native 4-bit dequantization (0.49.0 and later) takes an AVX-512 branch on
  CPUs with AVX-512F, decided inside the C library (`__builtin_cpu_supports`), so Python
  cannot force the other one: each CPU checks its own branch, and CI on the other kind of
  CPU checks the other;
- `Linear4bit.forward` in eval mode without gradients repacks its weight, in place, for a
  fused kernel where `has_avx512bf16()` (kept per layer as `support_avx512bf16_for_cpu`).
  Setting that to False forces the generic branch, which any CPU can run; forcing it to True
  elsewhere is not safe (the fused kernel is only registered on CPUs with the instructions).

Run by tests/test_torch_suite.py inside the stack venvs.
"""

from __future__ import annotations

import torch
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16, quantize_4bit
from bitsandbytes.nn import Linear4bit, Params4bit
from tiny_gemma4 import cpu_has_avx512f, load_in_4bit, plain_dequantize_4bit, text_config


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_stock_dequantize_of_rows_shorter_than_a_block_depends_on_avx512f() -> None:
    """P17's bug, on the unpatched stack: rows of 32 values with blocksize 64."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 64, 32, generator=generator).to(torch.bfloat16)
    data, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
    expected = plain_dequantize_4bit(data, state)
    if cpu_has_avx512f():  # the AVX-512 branch scales rows with other blocks' absmax
        assert relative(dequantize_4bit(data, state), expected) > 0.1
    else:  # the scalar loop indexes blocks over the flattened tensor
        assert torch.equal(dequantize_4bit(data, state), expected)
    # The same values as rows of whole blocks: right on either branch.
    data, state = quantize_4bit(weight.view(8, 32, 64), blocksize=64, quant_type="nf4")
    assert torch.equal(dequantize_4bit(data, state), plain_dequantize_4bit(data, state))


def test_eval_forward_of_the_tiny_model_agrees_on_both_linear4bit_branches() -> None:
    """tiny_gemma4's sizes run on both branches of Linear4bit.forward (its 8-expert router
    failed the packed one: 'N must be divisible by block_n'), and every layer computes the
    same on both; the packed branch runs only on a CPU with AVX512-BF16."""
    torch.manual_seed(0)
    model = load_in_4bit(text_config())
    layers = {name: m for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str):
        def hook(module, args, out) -> None:  # returns None: the output stays as it is
            seen.setdefault(name, (args[0], out))

        return hook

    hooks = [layer.register_forward_hook(keep(name)) for name, layer in layers.items()]
    for layer in layers.values():
        layer.support_avx512bf16_for_cpu = False  # the generic branch, on any CPU
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    assert set(seen) == set(layers)
    for name, layer in layers.items():
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        layer.support_avx512bf16_for_cpu = has_avx512bf16()  # this CPU's own branch
        x, generic = seen[name]
        with torch.no_grad():
            this_cpu = layer(x)
        packed = getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert packed == has_avx512bf16(), name
        # The packed kernel keeps the block scales in BF16: close, not identical.
        assert relative(this_cpu, generic) < 0.02, name
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_eval_forward_repacks_linear4bit_weights_in_place_on_avx512_bf16() -> None:
    """Why test_p13_loading keeps Linear4bit on the generic branch before model.dequantize():
    where `has_avx512bf16()`, one eval forward without gradients leaves the weight in the
    fused kernel's layout, and bitsandbytes' dequantize_4bit (which transformers'
    model.dequantize() and PEFT's merge call) then reads it as the plain one. Elsewhere
    nothing changes."""
    torch.manual_seed(0)
    layer = Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = Params4bit(
        torch.randn(64, 128).to(torch.bfloat16), requires_grad=False, quant_type="nf4"
    )
    layer = layer.to("cpu").eval()
    before = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    with torch.no_grad():
        layer(torch.randn(3, 128, dtype=torch.bfloat16))
    after = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    if has_avx512bf16():
        assert layer.weight.quant_state.packing_format_for_cpu
        assert relative(after, before) > 0.5
    else:
        assert torch.equal(after, before)
