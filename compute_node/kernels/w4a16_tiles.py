"""The W4A16 kernel's tile-level building blocks (Triton device functions): 4-bit codes
and dequantized weights as dot operands, the ways a K step becomes tensor-core dots
(X split in registers, nibbles joined back into k order, group tiles joined into one
dot), and the dot itself in either orientation. The kernel and its host side are in
compute_node/kernels/w4a16.py, whose docstring describes the variants."""

from __future__ import annotations

try:  # Triton ships with CUDA builds of PyTorch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None


# Per PTX float type: (magic: a nibble OR-ed under it is the float off + q, the float
# 1.0, the float -off), two 16-bit lanes each. off = 128 (bf16) or 1024 (f16).
PTX_CONSTANTS = {"bf16": (0x43004300, 0x3F803F80, 0xC300C300), "f16": (0x64006400, 0x3C003C00, 0xE400E400)}


def unpack_ptx(ty: str, dequant: bool) -> str:
    """PTX for 4 packed bytes ($4) -> the even-k (hi nibble: $0, $1) and odd-k (lo nibble:
    $2, $3) operands, two per 32-bit register. prmt spreads bytes b0, b1 (then b2, b3)
    into 16-bit lanes; lop3 keeps a nibble under `magic`, the float `off + q`. With
    `dequant`, an FMA takes off back exactly (x * one + neg) and a second gives
    q * s + m ($5, $6: s; $7, $8: m), rounded once."""
    magic, one, neg = PTX_CONSTANTS[ty]
    def half(dst0: str, dst1: str) -> list[str]:
        if not dequant:
            return [f"lop3.b32 {dst0}, t0, 0x000f000f, {magic:#x}, 0xea;",
                    f"lop3.b32 {dst1}, t1, 0x000f000f, {magic:#x}, 0xea;"]
        return [f"lop3.b32 c0, t0, 0x000f000f, {magic:#x}, 0xea;", f"lop3.b32 c1, t1, 0x000f000f, {magic:#x}, 0xea;",
                f"fma.rn.{ty}x2 c0, c0, one, neg;", f"fma.rn.{ty}x2 c1, c1, one, neg;",
                f"fma.rn.{ty}x2 {dst0}, c0, $5, $7;", f"fma.rn.{ty}x2 {dst1}, c1, $6, $8;"]

    body = [".reg .b32 t0, t1, c0, c1, one, neg;", f"mov.b32 one, {one:#x};", f"mov.b32 neg, {neg:#x};",
            "prmt.b32 t0, $4, 0, 0x4140;", "prmt.b32 t1, $4, 0, 0x4342;",
            *half("$2", "$3"), "shr.b32 t0, t0, 4;", "shr.b32 t1, t1, 4;", *half("$0", "$1")]
    return "{\n" + "\n".join(body) + "\n}"


if triton is not None:
    _CODES_BF16 = tl.constexpr(unpack_ptx("bf16", False))
    _CODES_F16 = tl.constexpr(unpack_ptx("f16", False))
    _WEIGHTS_BF16 = tl.constexpr(unpack_ptx("bf16", True))
    _WEIGHTS_F16 = tl.constexpr(unpack_ptx("f16", True))

    @triton.jit
    def _codes(nib, DT: tl.constexpr, DOT_F32: tl.constexpr):
        """4-bit codes as dot operands, offset by a power of two so a nibble becomes a
        float by one OR (bfloat16 0x4300 | q = 128 + q; float16 0x6400 | q = 1024 + q)."""
        if DT == tl.bfloat16:
            c = (nib.to(tl.uint16) | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            c = (nib.to(tl.uint16) | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
        if DOT_F32:  # the interpreter's tl.dot mishandles bf16: dot in fp32 there
            c = c.to(tl.float32)
        return c

    @triton.jit
    def _scaled(acc, part, rs, s, mn, DT: tl.constexpr, SWAP: tl.constexpr):
        """acc += the group's product on offset codes, scaled: s * part + (min - off * s) * rowsum(x)."""
        if DT == tl.bfloat16:
            m0 = mn - 128.0 * s
        else:
            m0 = mn - 1024.0 * s
        if SWAP:
            out = acc + part * s[:, None] + m0[:, None] * rs[None, :]
        else:
            out = acc + part * s[None, :] + rs[:, None] * m0[None, :]
        return out

    @triton.jit
    def _weights(nib, s, mn, DT: tl.constexpr, DOT_F32: tl.constexpr):
        """Dequantized weights, bit-for-bit strata.model.quant.dequantize: q * s + m in fp32, rounded to DT."""
        w = (nib.to(tl.float32) * s[:, None] + mn[:, None]).to(DT)
        if DOT_F32:
            w = w.to(tl.float32)
        return w

    @triton.jit
    def mma(acc, x, w, SWAP: tl.constexpr):
        """acc + x @ w^T ([BM, BN]), or its transpose w @ x^T ([BN, BM]) when SWAP."""
        if SWAP:  # (a return inside a constexpr if does not skip what follows it)
            out = tl.dot(w, tl.trans(x), acc)
        else:
            out = tl.dot(x, tl.trans(w), acc)
        return out

    @triton.jit
    def _unpack_asm(packed, s, mn, DT: tl.constexpr, ALGEBRAIC: tl.constexpr):
        """(even k, odd k) operands of 4 packed bytes per PTX block (`unpack_ptx`): the
        codes 128+q / 1024+q when ALGEBRAIC, else q * s + m (s, m rounded to DT)."""
        if ALGEBRAIC:
            if DT == tl.bfloat16:
                wh, wl = tl.inline_asm_elementwise(_CODES_BF16, "=r,=r,=r,=r,r", [packed],
                                                   (tl.bfloat16, tl.bfloat16), True, 4)
            else:
                wh, wl = tl.inline_asm_elementwise(_CODES_F16, "=r,=r,=r,=r,r", [packed],
                                                   (tl.float16, tl.float16), True, 4)
        else:
            sb = tl.broadcast_to(s.to(DT)[:, None], packed.shape)
            mb = tl.broadcast_to(mn.to(DT)[:, None], packed.shape)
            if DT == tl.bfloat16:
                wh, wl = tl.inline_asm_elementwise(_WEIGHTS_BF16, "=r,=r,=r,=r,r,r,r,r,r", [packed, sb, mb],
                                                   (tl.bfloat16, tl.bfloat16), True, 4)
            else:
                wh, wl = tl.inline_asm_elementwise(_WEIGHTS_F16, "=r,=r,=r,=r,r,r,r,r,r", [packed, sb, mb],
                                                   (tl.float16, tl.float16), True, 4)
        return wh, wl

    @triton.jit
    def _operands(packed, s, mn, DT: tl.constexpr, ALGEBRAIC: tl.constexpr, ASM: tl.constexpr,
                  DOT_F32: tl.constexpr):
        """The weight sub-tile's even-k and odd-k halves as dot operands [BN, KS/2]: offset
        codes when ALGEBRAIC, else dequantized weights."""
        if ASM:
            wh, wl = _unpack_asm(packed, s, mn, DT, ALGEBRAIC)
        elif ALGEBRAIC:
            wh = _codes(packed >> 4, DT, DOT_F32)
            wl = _codes(packed & 15, DT, DOT_F32)
        else:
            wh = _weights(packed >> 4, s, mn, DT, DOT_F32)
            wl = _weights(packed & 15, s, mn, DT, DOT_F32)
        return wh, wl

    @triton.jit
    def _in_k_order(packed, s, mn, DT: tl.constexpr, BLOCK_N: tl.constexpr, KS: tl.constexpr,
                    ALGEBRAIC: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr):
        """The sub-tile's operands with its two nibble halves joined back in k order:
        [BN, KS/2, 2] -> [BN, KS]."""
        wh, wl = _operands(packed, s, mn, DT, ALGEBRAIC, ASM, DOT_F32)
        return tl.reshape(tl.join(wh, wl), (BLOCK_N, KS))

    @triton.jit
    def split_step(acc, xt, packed, s, mn, DT: tl.constexpr, BLOCK_M: tl.constexpr, KS: tl.constexpr,
                   ALGEBRAIC: tl.constexpr, SWAP: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr):
        xe, xo = tl.split(tl.reshape(xt, (BLOCK_M, KS // 2, 2)))  # [BM, KS/2] each: even / odd k
        if DOT_F32:
            xe = xe.to(tl.float32)
            xo = xo.to(tl.float32)
        wh, wl = _operands(packed, s, mn, DT, ALGEBRAIC, ASM, DOT_F32)
        if ALGEBRAIC:
            rs = tl.sum(xe.to(tl.float32), axis=1) + tl.sum(xo.to(tl.float32), axis=1)  # [BM]
            part = mma(None, xe, wh, SWAP)
            out = _scaled(acc, mma(part, xo, wl, SWAP), rs, s, mn, DT, SWAP)
        else:
            out = mma(mma(acc, xe, wh, SWAP), xo, wl, SWAP)
        return out

    @triton.jit
    def join_step(acc, xt, packed, s, mn, DT: tl.constexpr, BLOCK_N: tl.constexpr, KS: tl.constexpr,
                  ALGEBRAIC: tl.constexpr, SWAP: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr):
        w = _in_k_order(packed, s, mn, DT, BLOCK_N, KS, ALGEBRAIC, ASM, DOT_F32)
        if DOT_F32:
            xt = xt.to(tl.float32)
        if ALGEBRAIC:
            out = _scaled(acc, mma(None, xt, w, SWAP), tl.sum(xt.to(tl.float32), axis=1), s, mn, DT, SWAP)
        else:
            out = mma(acc, xt, w, SWAP)
        return out

    @triton.jit
    def _sub_tile(d_rows, k0, s, mn, offs_h, mask_n, stride_dk, DT: tl.constexpr, BLOCK_N: tl.constexpr,
                  KS: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr):
        """Dequantized weights of the KS columns from k0 (in one group: scale s, min mn), in k order: [BN, KS]."""
        packed = tl.load(d_rows + ((k0 // 2) + offs_h)[None, :] * stride_dk, mask=mask_n[:, None], other=0)
        return _in_k_order(packed, s.to(tl.float32), mn.to(tl.float32), DT, BLOCK_N, KS, False, ASM, DOT_F32)

    @triton.jit
    def wide_tile(d_rows, s_rows, mn_rows, k0, offs_h, mask_n, stride_dk, stride_sg, stride_mg, DT: tl.constexpr,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KS: tl.constexpr,
                  ASM: tl.constexpr, DOT_F32: tl.constexpr):
        """BLOCK_K / KS (1, 2 or 4) sub-tiles joined: column c of sub-tile g lands at
        c * NG + g (NG = 2), or c * 4 + 2 * (g % 2) + g // 2 (NG = 4); `wide_order` puts
        X's columns in the same order. Scales and mins come as one [BN, NG] load each
        (4+ bytes a row where NG > 1, so the pipeliner prefetches them with the tiles)."""
        NG: tl.constexpr = BLOCK_K // KS
        if NG == 1:
            s0 = tl.load(s_rows + (k0 // GROUP) * stride_sg, mask=mask_n, other=0.0)
            m0 = tl.load(mn_rows + (k0 // GROUP) * stride_mg, mask=mask_n, other=0.0)
            w = _sub_tile(d_rows, k0, s0, m0, offs_h, mask_n, stride_dk, DT, BLOCK_N, KS, ASM, DOT_F32)
        else:
            g = k0 // GROUP + tl.arange(0, NG)
            st = tl.load(s_rows[:, None] + g[None, :] * stride_sg, mask=mask_n[:, None], other=0.0)  # [BN, NG]
            mt = tl.load(mn_rows[:, None] + g[None, :] * stride_mg, mask=mask_n[:, None], other=0.0)
            if NG == 2:
                s0, s1 = tl.split(st)
                m0, m1 = tl.split(mt)
                w0 = _sub_tile(d_rows, k0, s0, m0, offs_h, mask_n, stride_dk, DT, BLOCK_N, KS, ASM, DOT_F32)
                w1 = _sub_tile(d_rows, k0 + KS, s1, m1, offs_h, mask_n, stride_dk, DT, BLOCK_N, KS, ASM, DOT_F32)
                w = tl.reshape(tl.join(w0, w1), (BLOCK_N, BLOCK_K))
            else:
                sa, sb = tl.split(tl.reshape(st, (BLOCK_N, 2, 2)))  # sa: groups 0, 2; sb: 1, 3
                ma, mb = tl.split(tl.reshape(mt, (BLOCK_N, 2, 2)))
                s0, s2 = tl.split(sa)
                s1, s3 = tl.split(sb)
                m0, m2 = tl.split(ma)
                m1, m3 = tl.split(mb)
                w0 = _sub_tile(d_rows, k0, s0, m0, offs_h, mask_n, stride_dk, DT, BLOCK_N, KS, ASM, DOT_F32)
                w1 = _sub_tile(d_rows, k0 + KS, s1, m1, offs_h, mask_n, stride_dk, DT, BLOCK_N, KS, ASM, DOT_F32)
                w2 = _sub_tile(d_rows, k0 + 2 * KS, s2, m2, offs_h, mask_n, stride_dk, DT, BLOCK_N, KS, ASM,
                               DOT_F32)
                w3 = _sub_tile(d_rows, k0 + 3 * KS, s3, m3, offs_h, mask_n, stride_dk, DT, BLOCK_N, KS, ASM,
                               DOT_F32)
                w = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (BLOCK_N, BLOCK_K))
        return w
