"""The PTX that decodes 4-bit codes in the fused kernel, run through a small emulator.

No GPU here, so this checks the decoding logic (byte lookups, nibble order, pairing, block
scales) instruction by instruction for every byte value, against bitsandbytes' code table;
that the PTX assembles and runs is checked on a GPU by bench/moe_experts.py, which compares
the fused kernel's output with the dequantize path's.
"""

from __future__ import annotations

import struct

import pytest
import torch

from patches.inject.experts_4bit import pack_experts
from patches.inject.experts_4bit_triton import decode_asm, decode_asm_for

MASK = 0xFFFFFFFF


def lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out & MASK


def prmt(a: int, b: int, selector: int) -> int:
    pool, out = a | b << 32, 0
    for byte in range(4):
        choice = selector >> (4 * byte) & 0xF
        value = pool >> (8 * (choice & 7)) & 0xFF
        if choice & 8:  # sign-replicate mode, which the decoder must not trigger
            value = 0xFF if value & 0x80 else 0
        out |= value << (8 * byte)
    return out


def to_bits(value: float, dtype: torch.dtype) -> int:
    return torch.tensor([value], dtype=torch.float64).to(dtype).view(torch.int16).item() & 0xFFFF


def from_bits(bits: int, dtype: torch.dtype) -> float:
    return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(dtype).item()


def run(asm: str, registers: dict[str, int], dtype: torch.dtype) -> dict[str, int]:
    """Execute the straight-line PTX subset the decoder uses."""
    regs = dict(registers)

    def value(operand: str) -> int:
        return int(operand, 16) if operand.startswith("0x") else regs[operand]

    for statement in asm.strip().strip("{}").split(";"):
        statement = statement.strip()
        if not statement or statement.startswith(".reg"):
            continue
        opcode, operands = statement.split(None, 1)
        d, *src = (o.strip() for o in operands.split(","))
        if opcode == "mov.b32":
            regs[d] = value(src[0])
        elif opcode == "and.b32":
            regs[d] = value(src[0]) & value(src[1])
        elif opcode == "shr.b32":
            regs[d] = value(src[0]) >> int(src[1])
        elif opcode == "lop3.b32":
            regs[d] = lop3(*(value(o) for o in src[:3]), int(src[3], 16))
        elif opcode == "prmt.b32":
            regs[d] = prmt(value(src[0]), value(src[1]), value(src[2]))
        elif opcode.startswith("cvt.rn."):  # d = {high: cvt(a), low: cvt(b)} from two f32
            high, low = (struct.unpack("<f", struct.pack("<I", value(o)))[0] for o in src)
            regs[d] = to_bits(high, dtype) << 16 | to_bits(low, dtype)
        elif opcode.startswith("fma.rn."):  # lane-wise a * b + c, one rounding
            lanes = []
            for shift in (0, 16):
                a, b, c = (from_bits(value(o) >> shift & 0xFFFF, dtype) for o in src)
                lanes.append(to_bits(a * b + c, dtype) << shift)
            regs[d] = lanes[0] | lanes[1]
        else:
            raise AssertionError(f"the emulator does not know {opcode}")
    return regs


def f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_byte_decodes_to_its_two_scaled_codes(quant_type: str, dtype: torch.dtype) -> None:
    code = pack_experts(torch.randn(1, 4, 64), quant_type=quant_type).state.code
    asm = decode_asm(code, dtype)
    scales = (0.75, 1.5, 0.0421, 3.0)
    for first in range(0, 256, 4):
        packed = [first, first + 1, first + 2, first + 3]
        registers = {"$4": sum(b << (8 * i) for i, b in enumerate(packed))}
        registers |= {f"${5 + i}": f32_bits(s) for i, s in enumerate(scales)}
        regs = run(asm, registers, dtype)
        words = [regs[f"${i}"] for i in range(4)]  # (h0,h1), (h2,h3), (l0,l1), (l2,l3)
        lanes = [w >> shift & 0xFFFF for w in words for shift in (0, 16)]
        high, low = lanes[:4], lanes[4:]
        for i, byte in enumerate(packed):
            # The code, then the scale, rounded to the compute dtype; one rounded product.
            for got, nibble in ((high[i], byte >> 4), (low[i], byte & 15)):
                value = from_bits(to_bits(code[nibble].item(), dtype), dtype)
                scale = from_bits(to_bits(scales[i], dtype), dtype)
                assert got == to_bits(value * scale + 0.0, dtype), (byte, nibble)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_cached_decoding_uses_the_table_quantization_stores(quant_type: str) -> None:
    state = pack_experts(torch.randn(1, 4, 64), quant_type=quant_type).state
    assert decode_asm_for(quant_type, torch.bfloat16) == decode_asm(state.code, torch.bfloat16)
    assert decode_asm_for("nf4", torch.bfloat16) != decode_asm_for("fp4", torch.bfloat16)
