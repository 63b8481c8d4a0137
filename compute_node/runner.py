"""One pass of the running batch through the model: the sequences joining it are
prefilled and every running sequence decodes one token, in the same pass over the
layers, so a layer streamed from host or disk is loaded once for all of them.

    for layer i:
        w = weights.get(i)                         # the ring loads i+1.. meanwhile
        for each prefill chunk c:  h_c = layer(w, h_c)       # packed prompts, per-sequence attention
        for each group g (a wavefront: g's attention in the KV store overlaps the others' GPU work):
            finish g's attention of layer i-1; h_g = post_attention(w_{i-1}, ...)
            q, k, v = pre_attention(w, h_g); start g's attention of layer i
            (a group whose cache is on the GPU finishes layer i at once: w_{i-1} is
            then dropped before layer i is dequantized, one dense copy at a time)
    finish every group's last layer; logits at each sequence's last token

Where to put whom is the scheduler's (compute_node/scheduler.py): a pass gets the
joining sequences (group, row, prompt) and each group's decode step (token and
position per row) and returns logits."""

from __future__ import annotations

import dataclasses

import torch

from compute_node.layer_weights import LayerWeights
from compute_node.slot_graphs import GroupGraphs
from compute_node.slot_kv import Joining


@dataclasses.dataclass
class Join:
    """A sequence joining the batch: the slot it takes and its prompt."""

    group: int
    row: int
    ids: list[int]
    start: int = 0  # where these ids begin in the prompt: > 0 for a long prompt's later pieces


@dataclasses.dataclass
class GroupStep:
    """A group's decode step: rows 0..n-1, each its token and position. Idle rows
    (`idle`) store nothing and read column 0 only: a sequence may be joining there."""

    group: int
    ids: list[int]
    positions: list[int]
    idle: list[int] = dataclasses.field(default_factory=list)


class _Chunk:
    """Prompts packed into one row of tokens: [1, sum(lengths)], grouped by KV group."""

    def __init__(self, joins: list[Join], device: torch.device):
        joins = sorted(joins, key=lambda j: j.group)
        self.order = joins
        ids = [t for j in joins for t in j.ids]
        pos = [p for j in joins for p in range(j.start, j.start + len(j.ids))]
        self.ids = torch.tensor([ids], dtype=torch.long, device=device)
        self.pos = torch.tensor([pos], dtype=torch.long, device=device)
        self.tokens = len(ids)
        self.parts: list[tuple[int, int, int, Joining]] = []  # (group, start, end, joining)
        a = 0
        for j in joins:
            n = len(j.ids)
            if self.parts and self.parts[-1][0] == j.group:
                g, start, _, joining = self.parts[-1]
                joining.rows.append(j.row)
                joining.lengths.append(n)
                joining.starts.append(j.start)
                self.parts[-1] = (g, start, a + n, joining)
            else:
                self.parts.append((j.group, a, a + n, Joining([j.row], [n], [j.start])))
            a += n
        ends = torch.tensor([len(j.ids) for j in joins], dtype=torch.long).cumsum(0)
        self.last = (ends - 1).to(device)  # each prompt's last token
        self.h: torch.Tensor | None = None


class _Decoding:
    def __init__(self, step: GroupStep, kv, device: torch.device):
        self.kv = kv
        self.view = kv.view(step.positions, step.idle)
        self.ids = torch.tensor(step.ids, dtype=torch.long, device=device).view(-1, 1)
        self.pos = torch.tensor(step.positions, dtype=torch.long, device=device).view(-1, 1)
        self.h: torch.Tensor | None = None
        self.handle = None


class Runner:
    def __init__(self, weights: LayerWeights, family, num_layers: int, groups: list, chunk_tokens: int,
                 graphs: bool = False):
        """`groups`: the KV cache of each group (compute_node/slot_kv.py). `chunk_tokens`:
        most prompt tokens prefilled through a layer at once (activation memory).
        `graphs`: decode-only passes run each group's step as fixed-shape steps, captured
        by the weights' device (compute_node/slot_graphs.py: CUDA graphs on CUDA); only
        where every layer is resident and the KV cache is local (unquantized, or read in
        place by the fused decode attention)."""
        self.w, self.family, self.num_layers = weights, family, num_layers
        self.groups = groups
        self.chunk_tokens = max(1, chunk_tokens)
        fixed = graphs and not weights.streamed and all(getattr(g, "fixed_steps", False) for g in groups)
        self.graphs = [GroupGraphs(kv, self._fixed_step(kv), weights.dev) for kv in groups] if fixed else None

    @property
    def uses_graphs(self) -> bool:
        return self.graphs is not None

    def _fixed_step(self, kv):
        def step(view) -> torch.Tensor:
            w, fam = self.w, self.family
            h = fam.embed(w.embed, view.ids, view.pos)
            for i in range(self.num_layers):
                wi = w.get(i, view.n)
                q, k, v = fam.pre_attention(wi, h, view.pos)
                h = fam.post_attention(wi, h, kv.decode_start(i, view, q, k, v))
            return fam.logits(w.head, w.embed, h[:, -1])

        return step

    def chunks(self, joins: list[Join]) -> list[list[Join]]:
        """Joining prompts in chunks of at most chunk_tokens (a longer prompt alone)."""
        out: list[list[Join]] = []
        tokens = 0
        for j in joins:
            if out and tokens + len(j.ids) <= self.chunk_tokens:
                out[-1].append(j)
                tokens += len(j.ids)
            else:
                out.append([j])
                tokens = len(j.ids)
        return out

    def step(self, joins: list[Join], steps: list[GroupStep]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """One pass. Returns the joining prompts' logits [len(joins), vocab] (in the
        order given) and each group step's logits [n, vocab]."""
        if not joins and self.graphs is not None:
            return None, [self.graphs[s.group].run(s.ids, s.positions, s.idle) for s in steps]
        dev = self.w.device
        chunks = [_Chunk(c, dev) for c in self.chunks(joins)]
        decoding = [_Decoding(s, self.groups[s.group], dev) for s in steps]
        w = self.w
        for c in chunks:
            c.h = self.family.embed(w.embed, c.ids, c.pos)
        for d in decoding:
            d.h = self.family.embed(w.embed, d.ids, d.pos)
        prefill_rows = max((c.tokens for c in chunks), default=0)
        decode_rows = max((d.ids.shape[0] for d in decoding), default=0)
        w.top_up()  # the ring loads the first streamed layers ahead of layer 0
        # layer i-1's decode weights, kept only while a group's attention of it runs
        # elsewhere (the KV store): else one dense layer copy is alive at a time
        w_prev = None
        for i in range(self.num_layers):
            w_pre, w_dec = w.get_pair(i, prefill_rows, decode_rows)
            for c in chunks:
                self._prefill_layer(i, w_pre, c)
            w_pre = None
            for d in decoding:
                if d.handle is not None:
                    d.h = self.family.post_attention(w_prev, d.h, d.kv.decode_finish(d.handle))
                q, k, v = self.family.pre_attention(w_dec, d.h, d.pos)
                d.handle = d.kv.decode_start(i, d.view, q, k, v)
                if not d.kv.overlaps:  # computed here: finish the layer now
                    d.h = self.family.post_attention(w_dec, d.h, d.kv.decode_finish(d.handle))
                    d.handle = None
            w_prev = w_dec if any(d.handle is not None for d in decoding) else None
            w_dec = None
        for d in decoding:
            if d.handle is not None:
                d.h = self.family.post_attention(w_prev, d.h, d.kv.decode_finish(d.handle))
        head, embed = w.head, w.embed
        joined = None
        if chunks:
            parts = [self.family.logits(head, embed, c.h[0, c.last]) for c in chunks]
            logits = torch.cat(parts) if len(parts) > 1 else parts[0]
            order = [j for c in chunks for j in c.order]
            where = {id(j): r for r, j in enumerate(order)}
            joined = logits[torch.tensor([where[id(j)] for j in joins], device=logits.device)]
        return joined, [self.family.logits(head, embed, d.h[:, -1]) for d in decoding]

    def _prefill_layer(self, i: int, w, c: _Chunk) -> None:
        q, k, v = self.family.pre_attention(w, c.h, c.pos)
        outs = [self.groups[g].prefill(i, joining, q[:, :, a:z], k[:, :, a:z], v[:, :, a:z])
                for g, a, z, joining in c.parts]
        attn = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        c.h = self.family.post_attention(w, c.h, attn)
