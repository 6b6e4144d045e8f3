"""patches/inject/experts_4bit.py on CPU, inside a real stack venv (torch 2.13.0 + bitsandbytes).

Run by tests/test_torch_suite.py as `<stack python> -m pytest tests/torch --noconftest`.
"""

from __future__ import annotations

import pytest
import torch
from tiny_gemma4 import plain_dequantize_4bit
from transformers import Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

from patches.inject.experts_4bit import (
    dequantize_all,
    dequantize_experts,
    experts_4bit_forward,
    pack_experts,
    route,
)

# Deliberately not the sizes bitsandbytes' CPU kernels like (tiny_gemma4's): down_proj's rows
# of INTERMEDIATE = 32 values are shorter than a quantization block (64), which bitsandbytes'
# own CPU dequantization gets wrong on CPUs with AVX-512F (P17); P13 must not depend on that.
EXPERTS, HIDDEN, INTERMEDIATE, TOP_K, TOKENS = 8, 64, 32, 2, 48


def make_experts(implementation: str) -> Gemma4TextExperts:
    config = Gemma4TextConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=INTERMEDIATE,
        num_experts=EXPERTS,
        top_k_experts=TOP_K,
        enable_moe_block=True,
        hidden_activation="gelu_pytorch_tanh",
    )
    config._experts_implementation = implementation
    torch.manual_seed(0)
    experts = Gemma4TextExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.05)
        experts.down_proj.normal_(0, 0.05)
    return experts.to(torch.bfloat16).requires_grad_(False)


def routing(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, generator=generator).to(torch.bfloat16)
    probs = torch.randn(TOKENS, EXPERTS, generator=generator).softmax(-1)
    weights, index = torch.topk(probs, TOP_K)
    return x, index, weights.to(torch.bfloat16)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(
        a.float().flatten(), b.float().flatten(), dim=0
    ).item()


@pytest.fixture(scope="module")
def experts() -> Gemma4TextExperts:
    return make_experts("grouped_mm")


def test_packed_size_is_a_quarter_and_a_bit(experts) -> None:
    packed = pack_experts(experts.gate_up_proj.data)
    bf16_bytes = experts.gate_up_proj.numel() * 2
    # 4 bits per value plus double-quantized absmax: a little over a quarter of BF16.
    assert bf16_bytes / 4 < packed.nbytes() < bf16_bytes / 4 * 1.1


def test_chunks_dequantize_to_slices_of_the_whole(experts) -> None:
    packed = pack_experts(experts.down_proj.data)
    whole = dequantize_all(packed)
    assert whole.shape == experts.down_proj.shape and whole.dtype == torch.bfloat16
    for start, stop in [(0, 1), (3, 6), (5, EXPERTS)]:
        assert torch.equal(dequantize_experts(packed, start, stop), whole[start:stop])
    relative = (whole.float() - experts.down_proj.float()).norm() / experts.down_proj.float().norm()
    assert relative < 0.12  # NF4 on Gaussian weights


# (experts, rows, cols): rows shorter than a block, rows of one and a half blocks, whole blocks.
SHAPES = [(8, 64, 32), (4, 32, 96), (4, 64, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [True, False], ids=["nested", "plain"])
def test_dequantize_is_exact_on_every_cpu(shape, quant_type: str, compress_statistics) -> None:
    """The same values as plain torch over the flattened blocks, whatever the CPU's ISA; on
    CPUs with AVX-512F bitsandbytes' own dequantize_4bit of these shapes differs
    (tests/torch/test_cpu_branches.py)."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    packed = pack_experts(weight, quant_type, compress_statistics=compress_statistics)
    expected = plain_dequantize_4bit(packed.data, packed.state)
    assert torch.equal(dequantize_all(packed), expected)
    assert torch.equal(dequantize_experts(packed, 1, 3), expected[1:3])


@pytest.mark.parametrize("chunk_experts", [1, 3, EXPERTS])
def test_matches_grouped_mm_on_the_dequantized_weights(experts, chunk_experts: int) -> None:
    """Chunking changes nothing: same output and input gradient as one grouped_mm pass."""
    packed_gate_up = pack_experts(experts.gate_up_proj.data)
    packed_down = pack_experts(experts.down_proj.data)
    reference = make_experts("grouped_mm")
    with torch.no_grad():
        reference.gate_up_proj.copy_(dequantize_all(packed_gate_up))
        reference.down_proj.copy_(dequantize_all(packed_down))
    x, index, weights = routing(chunk_experts)
    chunk_bytes = chunk_experts * 2 * INTERMEDIATE * HIDDEN * 2
    grad = torch.randn(TOKENS, HIDDEN).to(torch.bfloat16)

    ours_x = x.clone().requires_grad_(True)
    ours = experts_4bit_forward(
        packed_gate_up, packed_down, experts._apply_gate, ours_x, index, weights, chunk_bytes
    )
    ours.backward(grad)
    ref_x = x.clone().requires_grad_(True)
    expected = reference(ref_x, index, weights)
    expected.backward(grad)

    torch.testing.assert_close(ours, expected, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=2e-2, atol=2e-3)


def test_close_to_the_bf16_model(experts) -> None:
    x, index, weights = routing(7)
    packed = pack_experts(experts.gate_up_proj.data), pack_experts(experts.down_proj.data)
    ours = experts_4bit_forward(*packed, experts._apply_gate, x, index, weights)
    assert cosine(ours, experts(x, index, weights)) > 0.98


def test_fp4_and_uncompressed_statistics(experts) -> None:
    x, index, weights = routing(11)
    packed = (
        pack_experts(experts.gate_up_proj.data, quant_type="fp4", compress_statistics=False),
        pack_experts(experts.down_proj.data, quant_type="fp4", compress_statistics=False),
    )
    ours = experts_4bit_forward(*packed, experts._apply_gate, x, index, weights)
    assert cosine(ours, experts(x, index, weights)) > 0.95


def test_backward_keeps_no_dequantized_weights(experts) -> None:
    """What autograd saves between forward and backward holds no (n, out, in) weight tensor."""
    packed = pack_experts(experts.gate_up_proj.data), pack_experts(experts.down_proj.data)
    x, index, weights = routing(3)
    x.requires_grad_(True)
    saved: list[torch.Size] = []

    def pack_hook(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out = experts_4bit_forward(*packed, experts._apply_gate, x, index, weights)
    assert saved
    assert not [shape for shape in saved if len(shape) == 3]
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_misaligned_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="straddle experts"):
        pack_experts(torch.randn(4, 3, 5, dtype=torch.bfloat16), blocksize=64)


@pytest.mark.parametrize(
    "ids",
    [
        [[3, 0], [3, 5], [5, 5], [1, 7]],  # some experts without tokens, the last one used
        [[2, 2], [2, 2]],  # every pair on one expert
        [[0, 1], [2, 3], [4, 5], [6, 7]],  # one pair per expert
    ],
)
def test_route_sorts_pairs_by_expert_and_ends_each_expert(ids: list[list[int]]) -> None:
    """The offsets are the cumulative per-expert counts (what grouped GEMM needs), the
    permutation is the stable sort of the flattened (token, k) pairs."""
    index = torch.tensor(ids)
    perm, ends = route(index, EXPERTS)
    flat = index.reshape(-1)
    expected_ends = torch.cumsum(torch.bincount(flat, minlength=EXPERTS), 0).to(torch.int32)
    assert ends.dtype == torch.int32 and torch.equal(ends, expected_ends)
    assert torch.equal(perm, torch.sort(flat, stable=True).indices)
    assert torch.equal(flat[perm], torch.sort(flat).values)


def test_route_of_a_random_routing_matches_counting() -> None:
    generator = torch.Generator().manual_seed(5)
    index = torch.topk(torch.rand(300, 128, generator=generator), 8).indices
    _, ends = route(index, 128)
    counts = torch.bincount(index.reshape(-1), minlength=128)
    assert torch.equal(ends, torch.cumsum(counts, 0).int())
