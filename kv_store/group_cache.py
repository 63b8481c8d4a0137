"""KV cache storage in host memory and decode attention over it on the CPU.

One `GroupCache` per group (a micro-batch): per layer K and V of shape
[batch, heads, max_tokens, head_dim] in the cache dtype, a per-layer length, and the
left padding of each sequence. Attention runs through PyTorch's CPU
scaled_dot_product_attention (flash kernel, float32 accumulation), or for a bfloat16
cache the KV store's own kernel (kv_store/native.py), with one additive float32 mask
built at allocation: -inf on padding, plus BLOOM's ALiBi when asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F

from kv_store.host_pages import huge_page_tensor
from kv_store.native import NewVectors
from strata.model.alibi import alibi_slopes
from strata.model.kv_quant import default_group
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport import packed

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """Shape and attention settings of one group, as Allocate gave them."""

    num_layers: int
    batch: int
    num_heads: int
    head_dim: int
    max_tokens: int
    dtype: torch.dtype
    scale: float
    alibi: bool = False
    pad: tuple[int, ...] = ()  # left padding per sequence; () = none
    num_kv_heads: int = 0  # grouped-query attention: key/value heads; 0 = num_heads
    kv_bits: int = 16  # 8 or 4: stored quantized (kv_store/quantized.py)
    kv_group_size: int = 0  # head_dim elements per quantization group; 0 = 64 where that divides head_dim

    @property
    def kv_group(self) -> int:
        return self.kv_group_size or default_group(self.head_dim)  # as a device cache (strata/model/kv_quant.py)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def validate(self) -> None:
        for name in ("num_layers", "batch", "num_heads", "head_dim", "max_tokens"):
            if getattr(self, name) <= 0:
                raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{name} must be > 0, got {getattr(self, name)}")
        if self.dtype not in CACHE_DTYPES:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"cache dtype {self.dtype} is not float32/16 or bfloat16")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"scale must be a positive number, got {self.scale}")
        if self.kv_bits not in (4, 8, 16):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"KV cache bits must be 4, 8 or 16, got {self.kv_bits}")
        if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
            raise StrataError(ErrorKind.INVALID_ARGUMENT,
                              f"{self.num_heads} query heads are not a multiple of {self.kv_heads} key/value heads")
        if self.pad and len(self.pad) != self.batch:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"pad has {len(self.pad)} entries for batch {self.batch}")
        if any(p < 0 or p >= self.max_tokens for p in self.pad):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"pad {list(self.pad)} outside [0, {self.max_tokens})")

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()


def build_mask(spec: GroupSpec) -> torch.Tensor | None:
    """Additive float32 mask over all key positions, [batch, heads or 1, 1, max_tokens]:
    -inf where j < pad[b], plus slope_h * (j - pad[b]) with ALiBi. None when it is all 0."""
    pad = torch.tensor(spec.pad or (0,) * spec.batch, dtype=torch.float32).view(-1, 1, 1, 1)
    if not spec.alibi and not any(spec.pad):
        return None
    j = torch.arange(spec.max_tokens, dtype=torch.float32).view(1, 1, 1, -1)
    mask = torch.zeros(spec.batch, 1, 1, spec.max_tokens, dtype=torch.float32)
    mask.masked_fill_(j < pad, float("-inf"))
    if spec.alibi:
        slopes = alibi_slopes(spec.num_heads).view(1, -1, 1, 1)
        mask = mask + slopes * (j - pad)
    return mask.contiguous()


@contextlib.contextmanager
def one_thread(when: bool = True):
    """PyTorch ops inside run on the calling thread alone. Around the one-token append
    before the native kernel: an OpenMP team started for that copy keeps spinning on
    the cores the kernel's threads are about to use."""
    if not when:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class GroupCache:
    """The K/V tensors of one group and decode attention over them. Not thread-safe:
    the caller serializes calls on one group."""

    def __init__(self, spec: GroupSpec, storage: torch.Tensor | None = None, native=None):
        """`storage`: uint8 bytes to hold the cache (a slice of the KV store's
        preallocated arena); default: fresh memory. `native`: the KV store's own decode
        kernel (kv_store/native.py), used where it supports the call; else SDPA."""
        self.native = native
        spec.validate()
        self.spec = spec
        shape = (spec.batch, spec.kv_heads, spec.max_tokens, spec.head_dim)
        numel = 2 * spec.num_layers * torch.Size(shape).numel()
        try:
            if storage is None:
                store = huge_page_tensor(numel * spec.itemsize).view(spec.dtype)
            else:
                store = storage[: numel * spec.itemsize].view(spec.dtype)
        except (RuntimeError, OSError, ValueError) as e:
            raise StrataError(ErrorKind.RESOURCE_EXHAUSTED, f"host memory for the KV cache: {e}") from None
        layers = store.view(2, spec.num_layers, *shape)
        self.keys = list(layers[0].unbind(0))
        self.values = list(layers[1].unbind(0))
        self.lengths = [0] * spec.num_layers
        self.mask = build_mask(spec)
        self._slot_masks: tuple[tuple[int, ...], torch.Tensor] | None = None  # (positions, mask) of the last step

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store k, v [batch, heads, tokens, head_dim] at the layer's current length;
        returns the new length."""
        self._check_layer(layer)
        self._check(k, "key", None, self.spec.kv_heads)
        self._check(v, "value", k.shape[2], self.spec.kv_heads)
        start, n = self.lengths[layer], k.shape[2]
        self._check_room(layer, n)
        self.keys[layer][:, :, start : start + n].copy_(k)
        self.values[layer][:, :, start : start + n].copy_(v)
        self.lengths[layer] = start + n
        return start + n

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Append one decode token, then softmax(scale * q.K^T + bias + mask) . V over
        every cached token of the layer. Returns [batch, heads, 1, head_dim] (in `out`
        where given: q's shape and dtype)."""
        self._check_layer(layer)
        self._check(q, "query", 1, self.spec.num_heads)
        self._check(k_new, "key", 1, self.spec.kv_heads)
        self._check(v_new, "value", 1, self.spec.kv_heads)
        start = self.lengths[layer]
        self._check_room(layer, 1)
        mask = None if self.mask is None else self.mask[..., : start + 1]
        out = self._step(layer, q, k_new, v_new, [start] * q.shape[0], start + 1, mask, out)
        self.lengths[layer] = start + 1
        return out

    # Slots (compute_node/slot_kv.py): each row one sequence with its own length, told
    # by the caller; the layer's shared length is not used.
    def append_rows(self, layer: int, rows: list[int], lengths: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Prompts packed along the token axis, k, v [1, heads, sum(lengths), head_dim]:
        row rows[i] gets lengths[i] tokens at columns [0, lengths[i])."""
        self._check_layer(layer)
        self._check_rows(rows, lengths, k, v)
        a = 0
        for i, j in packed.runs(lengths, rows):  # one store a run: each store fans out to the kernel's threads
            m, n = j - i, lengths[i]
            self._store_rows(layer, rows[i], packed.stacked(k, a, m, n), packed.stacked(v, a, m, n))
            a += m * n

    def attend_at(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                  positions: list[int], idle: list[int] = (), out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows 0..n-1 (n = len(positions)): row r's new key and value at column
        positions[r], then its attention over columns [0, positions[r]]. Rows in `idle`
        store nothing and attend over column 0 (their position must be 0). The result
        goes to `out` where given (q's shape and dtype)."""
        self._check_layer(layer)
        n = self._check_positions(positions)
        self._check_slot_step(q, k_new, v_new, n)
        idle_set = set(idle)
        if any(r >= n or positions[r] != 0 for r in idle_set):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"idle rows {sorted(idle_set)} must be rows at position 0")
        first = positions[0]
        uniform = not idle_set and all(p == first for p in positions)  # one column for all: as a shared length
        mask = None if uniform and self.mask is None else self._slot_mask(positions)
        cols = [-1 if r in idle_set else positions[r] for r in range(n)]
        return self._step(layer, q, k_new, v_new, cols, max(positions) + 1, mask, out)

    def _step(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cols: list[int],
              length: int, mask: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
        """A decode step on q's rows (the group's first q.shape[0]): row r's new vectors
        at column cols[r] (negative: none), then its attention over columns [0, length).
        The bfloat16 kernel stores the vectors itself, each row on the thread that then
        reads it; otherwise they are stored here first, on this one thread."""
        n = q.shape[0]
        if self._kernel_stores(layer, q, k_new, v_new):
            keys, values = self.keys[layer][:n, :, :length], self.values[layer][:n, :, :length]
            into = out if out is not None and out.is_contiguous() else None
            result = self.native(q, keys, values, mask, self.spec.scale, NewVectors(k_new, v_new, cols), into)
        else:
            with one_thread(self.native is not None):
                self._store_new(layer, n, cols, k_new, v_new)
            result = self._attend_rows(layer, q, length, mask)
        if out is None or result is out:
            return result
        with one_thread(self.native is not None):
            return out.copy_(result)

    def _kernel_stores(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> bool:
        return (self.native is not None and NewVectors.fits(k_new, v_new)
                and self.native.supports(q, self.keys[layer]))

    def _store_new(self, layer: int, n: int, cols: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Row r's new key and value at column cols[r] (negative: none), r < n."""
        if cols and cols[0] >= 0 and all(c == cols[0] for c in cols):
            self._store_row_block(layer, n, cols[0], k, v)
            return
        active = [r for r in range(n) if cols[r] >= 0]
        rows = torch.tensor(active, dtype=torch.long)
        self._store_columns(layer, rows, torch.tensor([cols[r] for r in active], dtype=torch.long), k, v)

    def _store_row_block(self, layer: int, n: int, col: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows 0..n-1's new vectors, all at column `col`."""
        self.keys[layer][:n, :, col : col + 1].copy_(k)
        self.values[layer][:n, :, col : col + 1].copy_(v)

    def _store_rows(self, layer: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [count, heads, n, head_dim] (strided views) into rows row.. at columns [0, n)."""
        count, n = k.shape[0], k.shape[2]
        self.keys[layer][row : row + count, :, :n].copy_(k)
        self.values[layer][row : row + count, :, :n].copy_(v)

    def _store_columns(self, layer: int, rows: torch.Tensor, cols: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> None:
        """Row r's new vector of each head at column cols[r]: one index_copy_ of
        head_dim-long rows over the layer viewed as [batch * heads * max_tokens,
        head_dim] (advanced-index assignment into the 4-d layer ran element by element,
        on this one thread, while the kernel's threads waited)."""
        s = self.spec
        heads = torch.arange(s.kv_heads)
        index = ((rows[:, None] * s.kv_heads + heads[None, :]) * s.max_tokens + cols[:, None]).reshape(-1)
        for cache, x in ((self.keys[layer], k), (self.values[layer], v)):
            cache.view(-1, s.head_dim).index_copy_(0, index, x[rows, :, 0].reshape(-1, s.head_dim))

    def _attend_rows(self, layer: int, q: torch.Tensor, length: int, mask: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        keys = self.keys[layer][:n, :, :length]
        values = self.values[layer][:n, :, :length]
        if self.native is not None and self.native.supports(q, keys):
            return self.native(q, keys, values, mask, self.spec.scale)
        gqa = self.spec.kv_heads != self.spec.num_heads
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.spec.scale, enable_gqa=gqa)

    def _slot_mask(self, positions: list[int]) -> torch.Tensor:
        """[n, heads or 1, 1, max + 1] float32: -inf past each row's position, plus
        ALiBi. Every layer of a step has the same positions: built once a step."""
        key = tuple(positions)
        cached = self._slot_masks
        if cached is not None and cached[0] == key:
            return cached[1]
        length = max(positions) + 1
        j = torch.arange(length, dtype=torch.float32).view(1, 1, 1, -1)
        pos = torch.tensor(positions, dtype=torch.float32).view(-1, 1, 1, 1)
        mask = torch.zeros(len(positions), 1, 1, length).masked_fill_(j > pos, float("-inf"))
        if self.spec.alibi:
            mask = mask + alibi_slopes(self.spec.num_heads).view(1, -1, 1, 1) * j
        mask = mask.contiguous()
        self._slot_masks = (key, mask)
        return mask

    def _check_rows(self, rows: list[int], lengths: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        s = self.spec
        if len(rows) != len(lengths) or not rows:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{len(rows)} rows for {len(lengths)} lengths")
        if any(r >= s.batch for r in rows) or len(set(rows)) != len(rows):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"rows {list(rows)} are not distinct rows of [0, {s.batch})")
        if any(n < 1 or n > s.max_tokens for n in lengths):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"lengths {list(lengths)} outside [1, {s.max_tokens}]")
        for t, what in ((k, "key"), (v, "value")):
            want = (1, s.kv_heads, sum(lengths), s.head_dim)
            if tuple(t.shape) != want:
                raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{what} has shape {list(t.shape)}, expected {list(want)}")
            if t.dtype != s.dtype:
                raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{what} has dtype {t.dtype}, the cache holds {s.dtype}")

    def _check_positions(self, positions: list[int]) -> int:
        n = len(positions)
        if not 0 < n <= self.spec.batch:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{n} positions for a group of {self.spec.batch} rows")
        if max(positions) >= self.spec.max_tokens:
            raise StrataError(ErrorKind.RESOURCE_EXHAUSTED,
                              f"position {max(positions)} is past the {self.spec.max_tokens} tokens a row holds")
        return n

    def _check_slot_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        s = self.spec
        for t, what, heads in ((q, "query", s.num_heads), (k, "key", s.kv_heads), (v, "value", s.kv_heads)):
            if tuple(t.shape) != (n, heads, 1, s.head_dim):
                raise StrataError(ErrorKind.INVALID_ARGUMENT,
                                  f"{what} has shape {list(t.shape)}, expected {[n, heads, 1, s.head_dim]}")
            if t.dtype != s.dtype:
                raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{what} has dtype {t.dtype}, the cache holds {s.dtype}")

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.spec.num_layers:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"layer {layer} outside [0, {self.spec.num_layers})")

    def _check(self, t: torch.Tensor, what: str, tokens: int | None, heads: int) -> None:
        s = self.spec
        want = (s.batch, heads, tokens if tokens is not None else "T", s.head_dim)
        ok = t.dim() == 4 and (t.shape[0], t.shape[1], t.shape[3]) == (s.batch, heads, s.head_dim)
        ok = ok and t.shape[2] >= 1 and (tokens is None or t.shape[2] == tokens)
        if not ok:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{what} has shape {list(t.shape)}, expected {list(want)}")
        if t.dtype != s.dtype:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{what} has dtype {t.dtype}, the cache holds {s.dtype}")

    def _check_room(self, layer: int, n: int) -> None:
        length = self.lengths[layer]
        if length + n > self.spec.max_tokens:
            raise StrataError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"layer {layer} holds {length} tokens; {n} more exceed max_tokens {self.spec.max_tokens}",
            )
