"""The W4A16 kernel's pieces that CI can check without Triton or a GPU: the PTX that
unpacks nibbles (run here on a small emulator of the five instructions it uses) and the
column order that WIDE steps expect of X."""

from __future__ import annotations

import itertools

import pytest
import torch

from compute_node.kernels.w4a16 import wide_order
from compute_node.kernels.w4a16_tiles import PTX_CONSTANTS, unpack_ptx

FLOAT = {"bf16": torch.bfloat16, "f16": torch.float16}
M32 = 0xFFFFFFFF


def _lanes_to_float(word: int, ty: str) -> list[float]:
    halves = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16)
    return halves.view(FLOAT[ty]).double().tolist()


def _float_to_lanes(values: list[float], ty: str) -> int:
    h = torch.tensor(values, dtype=torch.float64).to(FLOAT[ty]).view(torch.int16).to(torch.int32) & 0xFFFF
    return int(h[0]) | int(h[1]) << 16


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out & M32


def _prmt(a: int, b: int, sel: int) -> int:
    pool = (b << 32 | a).to_bytes(8, "little")
    return int.from_bytes(bytes(pool[sel >> (4 * i) & 7] for i in range(4)), "little")


def emulate(ptx: str, operands: dict[str, int]) -> dict[str, int]:
    """Run the block's prmt / lop3 / shr / mov / fma.rn.{bf16,f16}x2 on 32-bit registers."""
    regs = dict(operands)
    val = lambda tok: regs[tok] if tok in regs else int(tok, 0)  # noqa: E731
    for line in ptx.strip("{}\n").splitlines():
        op, _, args = line.rstrip(";").partition(" ")
        if op.startswith(".reg"):
            continue
        a = [t.strip() for t in args.split(",")]
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "prmt.b32":
            regs[a[0]] = _prmt(val(a[1]), val(a[2]), val(a[3]))
        elif op == "lop3.b32":
            regs[a[0]] = _lop3(val(a[1]), val(a[2]), val(a[3]), val(a[4]))
        elif op == "shr.b32":
            regs[a[0]] = val(a[1]) >> val(a[2])
        elif op.startswith("fma.rn.") and op.endswith("x2"):
            ty = op[len("fma.rn."):-2]
            x, y, z = (_lanes_to_float(val(t), ty) for t in a[1:])
            regs[a[0]] = _float_to_lanes([x[i] * y[i] + z[i] for i in range(2)], ty)  # one rounding
        else:
            raise AssertionError(f"instruction not emulated: {line}")
    return regs


@pytest.mark.parametrize("ty", ["bf16", "f16"])
def test_ptx_codes_are_the_offset_nibbles_in_k_order(ty):
    off = 128 if ty == "bf16" else 1024
    ptx = unpack_ptx(ty, dequant=False)
    for b0, b1, b2, b3 in [(0x00, 0xFF, 0x5A, 0xA5), (0x12, 0x34, 0x56, 0x78), (0x9C, 0x0F, 0xF0, 0x81)]:
        out = emulate(ptx, {"$4": b0 | b1 << 8 | b2 << 16 | b3 << 24})
        hi = _lanes_to_float(out["$0"], ty) + _lanes_to_float(out["$1"], ty)  # even k of bytes 0..3
        lo = _lanes_to_float(out["$2"], ty) + _lanes_to_float(out["$3"], ty)  # odd k
        assert hi == [off + (b >> 4) for b in (b0, b1, b2, b3)]
        assert lo == [off + (b & 15) for b in (b0, b1, b2, b3)]


@pytest.mark.parametrize("ty", ["bf16", "f16"])
def test_ptx_dequant_is_q_times_scale_plus_min_rounded_once(ty):
    gen = torch.Generator().manual_seed(0)
    ptx = unpack_ptx(ty, dequant=True)
    for _ in range(20):
        packed = torch.randint(0, 256, (4,), generator=gen).tolist()
        s = (torch.rand(4, generator=gen) * 0.02).to(FLOAT[ty]).double().tolist()  # rounded to the type, as the kernel
        m = (-torch.rand(4, generator=gen) * 0.1).to(FLOAT[ty]).double().tolist()
        out = emulate(ptx, {"$4": sum(b << 8 * i for i, b in enumerate(packed)),
                            "$5": _float_to_lanes(s[:2], ty), "$6": _float_to_lanes(s[2:], ty),
                            "$7": _float_to_lanes(m[:2], ty), "$8": _float_to_lanes(m[2:], ty)})
        got_hi = _lanes_to_float(out["$0"], ty) + _lanes_to_float(out["$1"], ty)
        got_lo = _lanes_to_float(out["$2"], ty) + _lanes_to_float(out["$3"], ty)

        def want(q):
            exact = torch.tensor([q[i] * s[i] + m[i] for i in range(4)], dtype=torch.float64)
            return exact.to(FLOAT[ty]).double().tolist()

        assert got_hi == want([b >> 4 for b in packed])
        assert got_lo == want([b & 15 for b in packed])


def test_ptx_constants_are_the_offset_one_and_minus_offset():
    for ty, (magic, one, neg) in PTX_CONSTANTS.items():
        off = 128 if ty == "bf16" else 1024
        assert _lanes_to_float(magic, ty) == [off, off]
        assert _lanes_to_float(one, ty) == [1.0, 1.0]
        assert _lanes_to_float(neg, ty) == [-off, -off]


@pytest.mark.parametrize("ng", [1, 2, 4])
def test_wide_order_puts_x_columns_in_the_joined_tile_order(ng):
    """Column c of group sub-tile g sits at c * 2 + g (2 groups) or c * 4 + 2 * (g % 2) + g // 2
    (4 groups) of each BLOCK_K block, as `wide_tile` joins them."""
    ks, blocks, m = 8, 3, 2
    block_k = ks * ng
    x = torch.arange(m * blocks * block_k, dtype=torch.float32).view(m, -1)
    got = wide_order(x, block_k, ks)
    for blk, g, c in itertools.product(range(blocks), range(ng), range(ks)):
        pos = {1: c, 2: c * 2 + g, 4: c * 4 + 2 * (g % 2) + g // 2}[ng]
        assert torch.equal(got[:, blk * block_k + pos], x[:, blk * block_k + g * ks + c])
