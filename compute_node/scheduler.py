"""The compute node's scheduler: turns the requests of any number of concurrent calls
into the engine's passes (iteration-level batching).

One thread owns the device and loops:

    drop cancelled and expired requests (their slots free at once)
    admit waiting requests while their sequences fit the free slots (compute_node/slots.py);
        their sequences take slots at once
    one pass (compute_node/runner.py): seated prompts are prefilled (all of them, or
        with a prefill budget the next ones in line, up to the budget's tokens) and every
        running sequence decodes a token, in the same pass over the layers
    choose each sequence's token (its request's sampling), stream it to its call,
        end sequences at EOS, a stop string or max tokens; free their slots

Calls (gRPC threads) only enqueue a request and read its outbox: health and stats
never wait behind generation."""

from __future__ import annotations

import logging
import threading
import time

import torch

from compute_node.metrics import Metrics
from compute_node.requests import Request, Sequence
from compute_node.runner import GroupStep, Join, Runner
from compute_node.sampling import choose
from compute_node.slots import Limits, SlotPool, WaitQueue, check_fits
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport.wire import generate_pb2

log = logging.getLogger("strata.compute_node")


class Scheduler:
    def __init__(self, runner: Runner, limits: Limits, eos_id: int | None, pad_id: int, metrics: Metrics,
                 peak_bytes=lambda: 0, kv_gauge: tuple[str, int] = ("", 0), prompt_pieces: bool = False,
                 empty_cache=lambda: None, prefill_budget: int = 0):
        """`peak_bytes()`: the device's peak allocated bytes; `empty_cache()`: hands its
        cached free memory back (compute_node/device/). `kv_gauge`: (metric name, bytes a
        cached token takes): the KV bytes in use. `prompt_pieces`: a prompt longer than
        the runner's chunk goes in over several passes, a chunk each, while the running
        sequences decode (the KV cache must be on the device: the pieces attend over the
        earlier ones there). `prefill_budget`: prompt tokens a pass prefills, at most (at
        least one prompt or piece: a longer one goes alone); the seated sequences past it
        wait, idle in their rows, for the next passes, so a large request's prefill is
        spread over passes that also decode its first sequences (the KV store's attention
        of those runs while the GPU prefills the next: compute_node/runner.py). 0: no
        bound, every seated prompt in the first pass after its admission."""
        self.prompt_pieces = prompt_pieces
        self.prefill_budget = prefill_budget
        self.runner, self.limits, self.eos, self.pad = runner, limits, eos_id, pad_id
        self.metrics, self.peak_bytes, self.kv_gauge = metrics, peak_bytes, kv_gauge
        self.empty_cache = empty_cache
        self.pool = SlotPool(limits.groups)
        self.waiting = WaitQueue(limits.max_queue)
        self.running: list[Request] = []
        self.cv = threading.Condition()
        self.stopping = False
        self._pass_end: float | None = None  # when the last pass's host work ended (None: idle since)
        metrics.set("batch_slots", limits.slots)
        metrics.set("admit_cap", limits.slots)
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    # -- calls' side -------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request; raises StrataError(RESOURCE_EXHAUSTED) when it can never fit
        or the wait queue is full."""
        try:
            check_fits(self.limits, [(len(s.prompt), s.max_new) for s in request.seqs])
            with self.cv:
                if self.stopping:
                    raise StrataError(ErrorKind.UNAVAILABLE, "the compute node is stopping")
                self.waiting.push(request, len(request.seqs))
                self.metrics.set("queue_depth", self.waiting.sequences)
                self.cv.notify()
        except StrataError:
            self.metrics.count("requests_total:rejected")
            raise
        return request

    def cancel(self, request: Request) -> None:
        with self.cv:
            request.cancel()
            self.cv.notify()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=30)

    # -- the device's side -------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException:  # a bug here would leave every call waiting forever: end them all
            log.exception("the scheduler stopped")
            with self.cv:
                self.stopping = True
                self._fail_all(StrataError(ErrorKind.INTERNAL, "the compute node's scheduler stopped"))
            raise

    def _fail_all(self, error: StrataError) -> None:
        for r in list(self.running) + self.waiting.remove(lambda r: False):
            r.outbox.put(error)
        self.running.clear()

    def _serve(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.running and not len(self.waiting):
                    self._pass_end = None
                    self.cv.wait()
                if self.stopping:
                    break
                self._drop_ended()
                admitted = self.waiting.admissible(self.pool.free)
                self._seat(admitted)
                self.running.extend(admitted)
                joins = self._joins()
                self.metrics.set("queue_depth", self.waiting.sequences)
            if not self.running:
                continue
            try:
                self._pass_shrinking(joins, admitted)
            except Exception as e:  # noqa: BLE001 - the requests in this pass fail; the service goes on
                log.exception("pass failed")
                error = e if isinstance(e, StrataError) else StrataError(ErrorKind.INTERNAL, f"generation failed: {e}")
                with self.cv:
                    for r in list(self.running):
                        self._end(r, error, "error")
        with self.cv:
            self._fail_all(StrataError(ErrorKind.UNAVAILABLE, "the compute node is stopping"))

    def _pass_shrinking(self, joins: list[tuple[Sequence, Join]], admitted: list[Request]) -> None:
        """A pass; where the device runs out of memory in it, again with the prefill in
        smaller chunks (a pass is idempotent: it writes the same KV at the same places),
        down to one prompt (or piece of one) at a time. The smaller chunk size stays; it is logged and
        counted (`oom_shrinks_total`), and no request is lost."""
        while True:
            try:
                return self._pass(joins, admitted)
            except torch.OutOfMemoryError:
                self.empty_cache()
                biggest = max((len(j.ids) for _, j in joins), default=0)  # a piece runs alone at least
                if joins and self.runner.chunk_tokens > biggest:
                    self.runner.chunk_tokens = max(biggest, self.runner.chunk_tokens // 2)
                    self.metrics.count("oom_shrinks_total")
                    log.warning("out of device memory in a pass: prefill chunks shrink to %d tokens",
                                self.runner.chunk_tokens)
                    continue
                victim = self._preempt_last()
                if victim is None:
                    raise StrataError(ErrorKind.RESOURCE_EXHAUSTED, "the device ran out of memory in a decode step")
                joins = [(s, j) for s, j in joins if s.slot is not None]
                admitted = [r for r in admitted if r is not victim]

    def _preempt_last(self) -> Request | None:
        """Fewer sequences: the request admitted last (of two or more running) leaves the
        batch for the head of the queue, its slots freed; it comes back when the batch has
        room, its prompt and the tokens it has generated prefilled again (recomputed), and
        its call sees nothing but a pause. The batch's cap drops to the sequences still
        running, for the server's life (`admit_cap`, `oom_preemptions_total`). None where
        one request runs alone."""
        with self.cv:
            running = [r for r in self.running if r.live]
            if len(running) < 2:
                return None
            victim = running[-1]
            for s in victim.live:
                if s.slot is not None:
                    self.pool.give(s.slot)
                    s.slot = None
                s.context, s.prefilled = s.prompt + s.generated, 0
            self.running.remove(victim)
            self.waiting.push_front(victim, len(victim.live))
            self.pool.cap = max(self.pool.in_use, len(victim.live))
            self.metrics.count("oom_preemptions_total")
            self.metrics.set("admit_cap", self.pool.cap)
            self.metrics.set("queue_depth", self.waiting.sequences)
        log.warning("out of device memory in a decode step: %d sequences wait to be recomputed; at most %d run now",
                    len(victim.live), self.pool.cap)
        return victim

    def _seat(self, admitted: list[Request]) -> None:
        """Slots for the admitted requests' sequences; their prefill follows (_joins)."""
        now = time.monotonic()
        for r in admitted:
            r.admitted = r.admitted or now  # a preempted request keeps its first admission
            for s in r.live:
                s.slot = self.pool.take()
                if not s.generated:
                    self.metrics.count("prompt_tokens_total", len(s.prompt))

    def _joins(self) -> list[tuple[Sequence, Join]]:
        """This pass's prefill: the next piece of each seated sequence's context not yet
        in its KV cache, in admission order, within the prefill budget (at least one)."""
        joins: list[tuple[Sequence, Join]] = []
        tokens = 0
        for r in self.running:
            for s in r.live:
                if s.slot is None or s.prefilled >= len(s.context):
                    continue
                end = self._piece_end(s)
                if self.prefill_budget and joins and tokens + end - s.prefilled > self.prefill_budget:
                    return joins
                tokens += end - s.prefilled
                joins.append((s, self._piece(s, end)))
        return joins

    def _piece_end(self, s: Sequence) -> int:
        """Where the next part of s's context to prefill ends: all of it, or with
        prompt_pieces at most a chunk."""
        end = len(s.context)
        if self.prompt_pieces:
            end = min(end, s.prefilled + max(1, self.runner.chunk_tokens))
        return end

    @staticmethod
    def _piece(s: Sequence, end: int) -> Join:
        """s's context from what is prefilled up to `end`, marked as prefilled."""
        join = Join(s.slot[0], s.slot[1], s.context[s.prefilled : end], s.prefilled)
        s.prefilled = end
        return join

    def _drop_ended(self) -> None:
        """Cancelled or expired requests, waiting or running, end now."""
        now = time.monotonic()

        def expired(r: Request) -> bool:
            return r.deadline is not None and now > r.deadline

        for r in self.waiting.remove(lambda r: not (r.cancelled or expired(r))):
            self._end(r, *self._why(r))
        for r in [r for r in self.running if r.cancelled or expired(r)]:
            self._end(r, *self._why(r))

    @staticmethod
    def _why(r: Request) -> tuple[StrataError, str]:
        if r.cancelled:
            return StrataError(ErrorKind.CANCELLED, "the call was cancelled"), "cancelled"
        return StrataError(ErrorKind.DEADLINE_EXCEEDED, "the request's deadline passed"), "deadline"

    def _end(self, r: Request, error: StrataError | None, outcome: str) -> None:
        """Free r's slots; send its error, or its last message."""
        for s in r.seqs:
            if s.slot is not None:
                self.pool.give(s.slot)
                s.slot = None
        if r in self.running:
            self.running.remove(r)
        self.metrics.count(f"requests_total:{outcome}")
        self.metrics.set("running_sequences", sum(len(x.live) for x in self.running))
        r.outbox.put(error if error is not None else self._final(r))

    def _pass(self, joins: list[tuple[Sequence, Join]], admitted: list[Request]) -> None:
        t0 = time.perf_counter()
        joining = {id(s) for s, _ in joins}
        steps, where = self._group_steps(joining)
        joined_logits, group_logits = self.runner.step([j for _, j in joins], steps)
        t1 = time.perf_counter()
        parts = ([joined_logits] if joined_logits is not None else []) + group_logits
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        greedy = logits.float().argmax(dim=-1).tolist()  # one device sync a pass
        t2 = time.perf_counter()
        self.metrics.count("pass_issue_seconds_total", t1 - t0)
        self.metrics.count("pass_wait_seconds_total", t2 - t1)
        if self._pass_end is not None:
            self.metrics.count("pass_host_seconds_total", t0 - self._pass_end)
        # a join's logits choose a token where its piece ends the prompt
        rows: dict[int, int] = {id(s): i for i, (s, j) in enumerate(joins) if s.prefilled == len(s.context)}
        offset = len(joins)
        for st, logit in zip(steps, group_logits):
            for row, s in where[st.group].items():
                rows[id(s)] = offset + row
            offset += logit.shape[0]
        now = time.monotonic()
        with self.cv:
            # counted before any call sees this pass's tokens: a caller reading Stats after
            # its last message finds its passes there
            self.metrics.step(sum(len(r.live) for r in self.running), self.limits.slots)
            for r in list(self.running):
                live = [s for s in r.live if id(s) in rows]
                if not live:
                    continue
                if r.generator is None:
                    tokens = [greedy[rows[id(s)]] for s in live]
                else:
                    picked = logits[torch.tensor([rows[id(s)] for s in live], device=logits.device)]
                    tokens = choose(picked, r.sampling, r.generator).tolist()
                self._advance(r, live, tokens, now)
            self._gauges()
        self._pass_end = time.perf_counter()
        self.metrics.count("pass_host_seconds_total", self._pass_end - t2)

    def _gauges(self) -> None:
        live = [s for r in self.running for s in r.live]
        self.metrics.set("running_sequences", len(live))
        name, per_token = self.kv_gauge
        if name:
            self.metrics.set(name, per_token * sum(s.position + 1 for s in live))

    def _group_steps(self, joining: set[int]) -> tuple[list[GroupStep], dict[int, dict[int, Sequence]]]:
        """Each group's decode step over its rows in use; rows joining this pass, or
        seated but not yet prefilled, idle."""
        by_group: dict[int, dict[int, Sequence]] = {}
        for r in self.running:
            for s in r.live:
                if id(s) not in joining and s.slot is not None and s.prefilled == len(s.context):
                    g, row = s.slot
                    by_group.setdefault(g, {})[row] = s
        steps = []
        for g in sorted(by_group):
            n = self.pool.rows_in_use(g)
            ids, positions, idle = [self.pad] * n, [0] * n, set(range(n))
            for row, s in by_group[g].items():
                ids[row], positions[row] = s.generated[-1], s.position
                idle.discard(row)
            steps.append(GroupStep(g, ids, positions, sorted(idle)))
        return steps, by_group

    def _advance(self, r: Request, live: list[Sequence], tokens: list[int], now: float) -> None:
        """Each live sequence's new token; ends those done; streams the step."""
        out = [-1] * len(r.seqs)
        for s, t in zip(live, tokens):
            s.generated.append(t)
            out[s.index] = t
            if (r.stop_at_eos and t == self.eos) or r.stops.check(s.index, s.generated):
                s.finish = "stop"
            elif len(s.generated) >= s.max_new:
                s.finish = "length"
            if s.finish is not None:
                self.pool.give(s.slot)
                s.slot = None
        self.metrics.count("generated_tokens_total", len(tokens))
        if r.steps == 0:
            r.first_token = now
            self.metrics.observe_ttft(now - r.arrival)
        else:
            self.metrics.observe_itl(now - r.last_token)
        r.last_token = now
        r.outbox.put(generate_pb2.GenerateResponse(step=r.steps, tokens=out))
        r.steps += 1
        if not r.live:
            self._end(r, None, "ok")

    def _final(self, r: Request) -> generate_pb2.GenerateResponse:
        return generate_pb2.GenerateResponse(
            step=r.steps, done=True,
            texts=[r.stops.text(s.generated) for s in r.seqs],
            finish_reasons=[s.finish or "length" for s in r.seqs],
            prompt_tokens=[len(s.prompt) for s in r.seqs],
            stats=generate_pb2.GenerateStats(
                prefill_s=r.first_token - r.admitted, decode_s=r.last_token - r.first_token,
                generated_tokens=sum(len(s.generated) for s in r.seqs), peak_gpu_bytes=self.peak_bytes(),
                prompt_tokens=sum(len(s.prompt) for s in r.seqs), queued_s=r.admitted - r.arrival,
                first_token_s=r.first_token - r.arrival,
            ),
        )
