"""The device's KV layer stores: K and V of every layer for a group of rows, in the
compute dtype (`_PlainLayers`) or group-wise quantized to 8 or 4 bits (`_QuantLayers`,
strata/model/kv_quant.py's format). compute_node/slot_kv.py's LocalSlots holds one per group
of sequence slots; its shape gives num_layers, num_kv_heads, max_tokens (columns per
row), head_dim and `pad` (one entry per row: the rows)."""

from __future__ import annotations

import torch

from compute_node.kernels import dequant, kv_quantize
from compute_node.kernels.decode_attention import CachePlanes
from strata.model.kv_quant import KVFormat

DEQUANT_CHUNK = 256  # tokens rebuilt at a time where not whole (float32 arithmetic on that many only)


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src, as 8-byte words where both last dims are contiguous rows of whole
    words. A strided copy (the prompt's K/V, [B, T, heads, head_dim] read as [B, heads,
    T, head_dim], into the cache) pays index arithmetic per element: 16-bit elements
    held T2's prefill writes to ~0.6 TB/s, a few percent of its prefill (BENCHMARKS.md)."""
    if dst.dtype == src.dtype and dst.element_size() < 8:
        try:
            dst.view(torch.int64).copy_(src.view(torch.int64))
            return
        except RuntimeError:  # rows not whole aligned words: the plain copy below
            pass
    dst.copy_(src)


# Runs of consecutive rows a prompt batch's keys and values are written as, one slice copy
# each; more (rows scattered over the slots) take one indexed write
MAX_RUN_COPIES = 8


def consecutive_runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, first row) of each run of consecutive rows in `rows`, in order:
    positions [start, end) of the list hold rows first row, first row + 1, ..."""
    runs: list[tuple[int, int, int]] = []
    for i, r in enumerate(rows):
        if runs and r == runs[-1][2] + (i - runs[-1][0]):
            runs[-1] = (runs[-1][0], i + 1, runs[-1][2])
        else:
            runs.append((i, i + 1, r))
    return runs


class _PlainLayers:
    """K and V of every layer in the compute dtype, [B, kv_heads, max_tokens, head_dim]."""

    def __init__(self, s, dtype: torch.dtype, device: torch.device):
        dims = (s.pad.numel(), s.num_kv_heads, s.max_tokens, s.head_dim)
        self.k = [torch.empty(dims, dtype=dtype, device=device) for _ in range(s.num_layers)]
        self.v = [torch.empty(dims, dtype=dtype, device=device) for _ in range(s.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def tensors(self) -> list[torch.Tensor]:
        return self.k + self.v

    # One row per sequence, each its own length.
    def write_rows(self, layer: int, rows: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Prompts of one length, k, v [len(rows), kv_heads, n, head_dim], into columns
        [0, n) of `rows`."""
        n = k.shape[2]
        runs = consecutive_runs(rows)
        if len(runs) <= MAX_RUN_COPIES:  # slices: word copies (an index_put ran T2's at ~0.6 TB/s)
            for a, z, r in runs:
                copy_rows(self.k[layer][r : r + z - a, :, :n], k[a:z])
                copy_rows(self.v[layer][r : r + z - a, :, :n], v[a:z])
            return
        index = torch.tensor(rows, device=k.device)
        self.k[layer][index, :, :n] = k
        self.v[layer][index, :, :n] = v

    def write_columns(self, layer: int, rows: torch.Tensor, cols: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> None:
        """One token per listed row: k[r] [kv_heads, 1, head_dim] at column cols[i] of
        row r = rows[i]."""
        self.k[layer][rows, :, cols] = k[rows, :, 0]
        self.v[layer][rows, :, cols] = v[rows, :, 0]

    def planes(self, layer: int) -> tuple[CachePlanes, CachePlanes]:
        """A layer's K and V as they lie, for the fused decode attention."""
        return CachePlanes(self.k[layer]), CachePlanes(self.v[layer])

    def read_rows(self, layer: int, rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:rows, :, :n], self.v[layer][:rows, :, :n]

    def write_piece(self, layer: int, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A prompt's later piece, k, v [1, kv_heads, n, head_dim], at columns [start, start + n) of `row`."""
        n = k.shape[2]
        copy_rows(self.k[layer][row : row + 1, :, start : start + n], k)
        copy_rows(self.v[layer][row : row + 1, :, start : start + n], v)

    def read_row(self, layer: int, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][row : row + 1, :, :n], self.v[layer][row : row + 1, :, :n]


class _QuantLayers:
    """K and V of every layer group-wise quantized (strata/model/kv_quant.py), token-major:
    codes [max_tokens, B, kv_heads, code_width], scale and min [max_tokens, B, kv_heads,
    groups] per layer, so the first n tokens are one contiguous block. `read_rows`
    rebuilds a layer's first n tokens of its first rows in the compute dtype: with
    `whole` (the device's choice: on CUDA, one fused kernel, no float32 copy) at once,
    else in chunks of DEQUANT_CHUNK tokens."""

    def __init__(self, s, dtype: torch.dtype, device: torch.device, fmt: KVFormat, whole: bool = False):
        self.fmt, self.dtype, self.whole = fmt, dtype, whole
        lead = (s.max_tokens, s.pad.numel(), s.num_kv_heads)

        def planes():
            return (torch.empty(*lead, fmt.code_width, dtype=torch.uint8, device=device),
                    torch.empty(*lead, fmt.groups, dtype=torch.float16, device=device),
                    torch.empty(*lead, fmt.groups, dtype=torch.float16, device=device))

        self.k = [planes() for _ in range(s.num_layers)]
        self.v = [planes() for _ in range(s.num_layers)]
        # one kernel quantizes straight into the planes where it can run (kernels/kv_quantize.py)
        self.kernel = kv_quantize.available(self.k[0][0], fmt)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.k + self.v for t in parts)

    def _store(self, layer: int, rows: torch.Tensor, col0: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [m, kv_heads, n, head_dim]: input row i's tokens at columns col0[i].. of row rows[i]."""
        for parts, x in ((self.k[layer], k), (self.v[layer], v)):
            kv_quantize.quantize_into(x, self.fmt, *parts, rows, col0)

    def tensors(self) -> list[torch.Tensor]:
        return [t for parts in self.k + self.v for t in parts]

    # One row per sequence, each its own length.
    def write_rows(self, layer: int, rows: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        index = torch.tensor(rows, device=k.device)
        if self.kernel:
            return self._store(layer, index, torch.zeros_like(index), k, v)
        for parts, x in ((self.k[layer], k), (self.v[layer], v)):
            n = x.shape[2]
            for plane, q in zip(parts, self.fmt.quantize(x.permute(2, 0, 1, 3))):
                plane[:n, index] = q

    def write_columns(self, layer: int, rows: torch.Tensor, cols: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> None:
        if self.kernel:
            return self._store(layer, rows, cols, k[rows], v[rows])
        for parts, x in ((self.k[layer], k), (self.v[layer], v)):
            for plane, q in zip(parts, self.fmt.quantize(x[rows].permute(2, 0, 1, 3))):
                plane[cols, rows] = q[0]

    def planes(self, layer: int) -> tuple[CachePlanes, CachePlanes]:
        """A layer's K and V as they lie, for the fused decode attention."""
        return (CachePlanes(self.k[layer][0], self.fmt, *self.k[layer][1:]),
                CachePlanes(self.v[layer][0], self.fmt, *self.v[layer][1:]))

    def read_rows(self, layer: int, rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._dequantize(tuple(p[:, :rows] for p in self.k[layer]), n),
                self._dequantize(tuple(p[:, :rows] for p in self.v[layer]), n))

    def write_piece(self, layer: int, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.kernel:
            at = torch.tensor([[row], [start]], device=k.device)
            return self._store(layer, at[0], at[1], k, v)
        for parts, x in ((self.k[layer], k), (self.v[layer], v)):
            n = x.shape[2]
            for plane, q in zip(parts, self.fmt.quantize(x.permute(2, 0, 1, 3))):
                plane[start : start + n, row : row + 1] = q

    def read_row(self, layer: int, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._dequantize(tuple(p[:, row : row + 1] for p in self.k[layer]), n),
                self._dequantize(tuple(p[:, row : row + 1] for p in self.v[layer]), n))

    def _dequantize(self, parts, n: int) -> torch.Tensor:
        codes, scale, w_min = (p[:n] for p in parts)
        out = torch.empty(*codes.shape[:-1], self.fmt.head_dim, dtype=self.dtype, device=codes.device)
        rows = out.view(-1, self.fmt.head_dim)
        per_token = rows.shape[0] // n
        step = n if self.whole else DEQUANT_CHUNK
        for a in range(0, n, step):
            z = min(a + step, n)
            flat = [p[a:z].reshape(-1, p.shape[-1]) for p in (codes, scale, w_min)]
            dequant.dequantize(*flat, self.fmt.bits, self.fmt.group, self.dtype, out=rows[a * per_token : z * per_token])
        return out.permute(1, 2, 0, 3)  # [B, kv_heads, n, head_dim], strided
