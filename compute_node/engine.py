"""The generation loop: layer by layer over micro-batches, the schedule in plain view.

    for each step (prefill, then one token at a time):
        for layer i:
            w = weights.get(i, rows); weights.prefetch(i + 1)  # load i+1 while computing i; at few
                                                 # rows (decode) INT4 stays packed: fused matmul
            prefill, for micro-batch j: h_j = post_attention(w, prefill attention(pre_attention(w, h_j)))
            decode, for micro-batch j (a wavefront over layers):
                finish j's attention of layer i-1; h_j = post_attention(w_{i-1}, ...)
                q, k, v = pre_attention(w, h_j)
                start j's attention of layer i (device, or KV store on the CPU)
        finish every micro-batch's last layer
        logits -> next tokens (greedy: fed back as the next step's ids on the device, the
                  next step launched before they are read: compute_node/decode_loop.py)

Where every layer is resident and the KV cache is on the device unquantized, each
micro-batch's decode step (embedding, layers, head) is captured once as a CUDA graph and
replayed (compute_node/decode_graph.py); the caches and graphs are kept for the next
request of the same shapes.
"""

from __future__ import annotations

import itertools
import time
from typing import Iterator

import torch

from compute_node.batch import MicroBatch, positions, split, validate
from compute_node.decode_graph import DecodeGraphs, KeptDecode, Step
from compute_node.decode_loop import GreedyDecode
from compute_node.kv_cache import LocalKV, RemoteKV, _Shape
from compute_node.layer_weights import LayerWeights
from compute_node.model import family_for
from compute_node.sampling import Sampling, choose, greedy_ids
from strata.arch import dims_for
from strata.kv_quant import check_bits


# Capturing costs about one eager step: decode graphs only where at least two steps replay.
MIN_TOKENS_FOR_GRAPHS = 4


class Engine:
    def __init__(self, weights: LayerWeights, kv_factory, micro_batches: int = 1, max_batch: int = 256,
                 decode_graphs: bool = True):
        """`decode_graphs`: replay each decode step as a CUDA graph where the step allows
        it (compute_node/decode_graph.py)."""
        manifest = weights.host.manifest
        self.w = weights
        self.dims = dims_for(manifest.config)
        self.family = family_for(manifest.config, self.dims)
        self.kv_factory = kv_factory  # (shape: _Shape) -> KVCache
        self.micro_batches = micro_batches
        self.max_batch = max_batch
        self.decode_graphs = decode_graphs
        self.pad_id = self.dims.pad_token_id if self.dims.pad_token_id is not None else 0
        self.last_stats: dict = {}
        self.timing = {"start_s": 0.0, "finish_s": 0.0}  # host time blocked staging / awaiting attention
        self.kept = KeptDecode()  # the last request's device KV and decode graphs, for one of its shapes
        self._graphs: DecodeGraphs | None = None  # this request's
        self._reusable: DecodeGraphs | None = None  # kept graphs this request's caches were recorded with

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, stop_at_eos: bool = False
    ) -> Iterator[list[int]]:
        """Yields, per step, one token per prompt (-1 once a sequence has finished). Greedy
        decode keeps the tokens on the device and launches each step before the previous
        one's tokens are read (compute_node/decode_loop.py)."""
        validate(prompts, max_new_tokens, self.dims, self.max_batch)
        mbs = split(prompts, self.micro_batches, self.pad_id)
        gen = torch.Generator().manual_seed(sampling.seed)
        finished = [False] * len(prompts)
        eos = self.dims.eos_token_id
        t0 = time.perf_counter()
        self.timing = {"start_s": 0.0, "finish_s": 0.0}
        t1 = steps = None
        key = (tuple((mb.ids.shape[0], mb.ids.shape[1] + max_new_tokens) for mb in mbs), sampling.greedy)
        try:
            self._allocate(mbs, max_new_tokens, key)
            logits = self.forward(mbs, [self._inputs(mb, True, None, 0) for mb in mbs], prefill=True)
            chosen = [greedy_ids(x) if sampling.greedy else choose(x, sampling, gen) for x in logits]
            tokens = torch.cat(chosen).tolist()
            self.last_stats = {"prefill_s": time.perf_counter() - t0}
            t1 = time.perf_counter()
            if sampling.greedy:
                steps = GreedyDecode(self, mbs, chosen, max_new_tokens)
            else:
                steps = self._sampled(mbs, tokens, sampling, gen, self.graphs_for(mbs, max_new_tokens, self._logits))
            for step in range(max_new_tokens):
                out = []
                for i, tok in enumerate(tokens):
                    out.append(-1 if finished[i] else tok)
                    if stop_at_eos and tok == eos:
                        finished[i] = True
                yield out
                if step + 1 == max_new_tokens or all(finished):
                    break
                tokens = next(steps)
        finally:  # also when the consumer stops early (stop sequences, a cancelled call)
            if steps is not None:
                steps.close()  # a step launched ahead is done before its KV cache goes
            if t1 is not None:
                self.last_stats["decode_s"] = time.perf_counter() - t1
                self.last_stats.update(self.timing)
            self._release(mbs, key)

    def _allocate(self, mbs: list[MicroBatch], max_new_tokens: int, key: tuple) -> None:
        """Each micro-batch's KV cache: the kept ones where the last request had these
        shapes (its decode graphs then replay), else new ones."""
        kept = self.kept.take(key) if self.decode_graphs else None
        self._graphs, self._reusable = None, kept[1] if kept else None
        for j, mb in enumerate(mbs):
            shape = self._shape(mb, mb.ids.shape[1] + max_new_tokens)
            mb.kv = kept[0][j].renew(shape) if kept else self.kv_factory(shape)

    def _release(self, mbs: list[MicroBatch], key: tuple) -> None:
        """Keep the caches with their graphs where every step was captured; free the rest."""
        graphs, self._graphs, self._reusable = self._graphs, None, None
        if graphs is not None and graphs.complete:
            self.kept.keep(key, [mb.kv for mb in mbs], graphs)
            return
        for mb in mbs:
            if mb.kv is not None:
                mb.kv.free()

    def graphs_for(self, mbs: list[MicroBatch], max_new_tokens: int, step: Step) -> DecodeGraphs | None:
        """Decode graphs running `step`, where asked for and worth capturing (else None):
        the kept ones where this request's caches were recorded with them."""
        if not self.decode_graphs or max_new_tokens < MIN_TOKENS_FOR_GRAPHS:
            return None
        if self._reusable is not None:
            self._graphs, self._reusable = self._reusable, None
            self._graphs.reuse(mbs, step)
        else:
            self._graphs = DecodeGraphs.for_request(self.w.device, bool(self.w.streamed), mbs, step)
        self.last_stats["graphs_reused"] = float(self._graphs is not None and self._graphs.complete)
        return self._graphs

    def _shape(self, mb: MicroBatch, max_tokens: int) -> _Shape:
        d = self.dims
        return _Shape(d.num_layers, d.num_heads, d.head_dim, max_tokens, mb.pad, self.family.scale, self.family.alibi,
                      d.kv_heads)

    def _sampled(self, mbs, tokens: list[int], sampling: Sampling, gen,
                 graphs: DecodeGraphs | None) -> Iterator[list[int]]:
        """Decode steps with sampling: each step's tokens are drawn on the host (with the
        request's generator, in order), then the next step's inputs built from them."""
        for offset in itertools.count():
            inputs = [self._inputs(mb, False, tokens, offset) for mb in mbs]
            logits = graphs.run(inputs) if graphs is not None else self.forward(mbs, inputs, False)
            tokens = torch.cat([choose(x, sampling, gen) for x in logits]).tolist()
            yield tokens

    def _logits(self, mb: MicroBatch, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One micro-batch's decode step, as a decode graph records it for sampling."""
        return self.forward([mb], [(ids, pos)], False)[0]

    def _inputs(self, mb: MicroBatch, prefill: bool, feed, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's token ids and positions on the device."""
        dev = self.w.device
        if prefill:
            return mb.ids.to(dev), positions(mb.pad, 0, mb.ids.shape[1]).to(dev)
        ids = torch.tensor([feed[i] for i in mb.index], dtype=torch.long).view(-1, 1)
        return ids.to(dev), positions(mb.pad, mb.ids.shape[1] + offset, 1).to(dev)

    def forward(self, mbs: list[MicroBatch], inputs: list[tuple[torch.Tensor, torch.Tensor]],
                prefill: bool) -> list[torch.Tensor]:
        """Embedding, every layer, head: each micro-batch's logits at its last position."""
        for mb, (ids, pos) in zip(mbs, inputs):
            mb.h = self.family.embed(self.w.embed, ids, pos)
            mb.pos = pos
        self._layers(mbs, prefill)
        return [self.family.logits(self.w.head, self.w.embed, mb.h[:, -1]) for mb in mbs]

    def _layers(self, mbs: list[MicroBatch], prefill: bool) -> None:
        rows = max(mb.h.shape[0] * mb.h.shape[1] for mb in mbs)  # tokens of the largest micro-batch
        self.w.prefetch(0)
        if prefill:
            for i in range(self.dims.num_layers):
                w = self.w.get(i, rows)
                self.w.prefetch(i + 1)
                for mb in mbs:
                    q, k, v = self.family.pre_attention(w, mb.h, mb.pos)
                    mb.h = self.family.post_attention(w, mb.h, mb.kv.prefill(i, q, k, v))
            return
        # Decode as a wavefront: micro-batch j finishes layer i-1 and starts layer i
        # while the attention of j+1 (layer i-1) and of 0..j-1 (layer i) is queued, so
        # the KV store always has the next call in hand when it finishes one.
        handles: list = [None] * len(mbs)
        w_prev = None
        for i in range(self.dims.num_layers):
            w = self.w.get(i, rows)
            self.w.prefetch(i + 1)
            for j, mb in enumerate(mbs):
                if w_prev is not None:
                    self._finish(w_prev, mb, handles[j])
                q, k, v = self.family.pre_attention(w, mb.h, mb.pos)
                t0 = time.perf_counter()
                handles[j] = mb.kv.decode_start(i, q, k, v)
                self.timing["start_s"] += time.perf_counter() - t0
            w_prev = w
        for j, mb in enumerate(mbs):
            self._finish(w_prev, mb, handles[j])

    def _finish(self, w, mb: MicroBatch, handle) -> None:
        t0 = time.perf_counter()
        attn = mb.kv.decode_finish(handle)
        self.timing["finish_s"] += time.perf_counter() - t0
        mb.h = self.family.post_attention(w, mb.h, attn)


def local_kv_factory(dtype: torch.dtype, device: torch.device, kv_bits: int = 16):
    """LocalKV per micro-batch, stored at `kv_bits` (16, 8 or 4; checked here, at once)."""
    check_bits(kv_bits)
    return lambda shape: LocalKV(shape, dtype, device, kv_bits)


def remote_kv_factory(dtype: torch.dtype, device: torch.device, client, exchange, kv_bits: int = 16):
    return lambda shape: RemoteKV(shape, dtype, device, client, exchange, kv_bits)
