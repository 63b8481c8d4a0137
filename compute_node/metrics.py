"""The compute node's counters, gauges and latency histograms, kept in plain Python
(no torch, no grpc) and read as one flat name -> value map by `Generator.Stats`.

Names (a label, where there is one, follows a colon):
  requests_total:<outcome>      calls ended: ok, cancelled, deadline, rejected, error
  queue_depth                   sequences waiting for a slot
  running_sequences             sequences holding a slot
  batch_slots                   slots in the running batch (the planner's batch)
  batch_occupancy               running / slots, averaged over the decode steps so far
  prompt_tokens_total, generated_tokens_total
  steps_total                   engine passes (each a decode step, with any prefill joined to it)
  kv_bytes_used:<home>, kv_bytes_capacity:<home>   home: gpu or kv_store
  weight_bytes_per_pass         bytes of weights copied host-to-device each pass
  decode_graphs                 1 where decode-only passes replay fixed-shape steps (CUDA graphs)
  plan_resident_layers          layers resident on the device (the run plan's, as the node holds them)
  resident_layer:<i>            1 for each resident layer, by index
  plan_micro_batches            groups of the running batch
  plan_kv_bits                  the KV cache's bits (16, 8 or 4)
  plan_prefill_tokens_per_pass  prompt tokens a pass prefills, at most (0: no bound)
  kernel:<name>                 1 where the CUDA kernel (w4a16_wgmma, w4a16_mma) is built and switched on
  oom_shrinks_total             passes retried with smaller prefill chunks after running out of memory
  oom_preemptions_total         requests taken out of a pass that ran out of memory, recomputed later
  admit_cap                     sequences that may run at once after such a preemption (else the slots)
  h2d_bytes_total, h2d_seconds_total   weight copies host-to-device (GB/s = bytes / seconds)
  pass_issue_seconds_total      the scheduler's thread issuing passes (until the runner returns)
  pass_wait_seconds_total       ... then waiting for the pass's logits on the host (the device's rest)
  pass_host_seconds_total       ... and between passes (tokens to calls, the next pass's inputs)
  ttft_seconds_bucket:<le>, ttft_seconds_sum, ttft_seconds_count     time to first token
  itl_seconds_bucket:<le>, itl_seconds_sum, itl_seconds_count        time between tokens
Histogram buckets are cumulative (Prometheus' convention); `le` is the upper bound in
seconds, `+Inf` the last.
"""

from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = ("ok", "cancelled", "deadline", "rejected", "error")


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def export(self, name: str, out: dict[str, float]) -> None:
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out[f"{name}_bucket:{'+Inf' if bound == float('inf') else repr(bound)}"] = float(total)
        out[f"{name}_sum"] = self.sum
        out[f"{name}_count"] = float(total)


class Metrics:
    """Thread-safe: the scheduler writes, the Stats call reads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, float] = {f"requests_total:{o}": 0.0 for o in OUTCOMES}
        self._counters.update(prompt_tokens_total=0.0, generated_tokens_total=0.0, steps_total=0.0,
                              h2d_bytes_total=0.0, h2d_seconds_total=0.0, pass_issue_seconds_total=0.0,
                              pass_wait_seconds_total=0.0, pass_host_seconds_total=0.0)
        self._gauges: dict[str, float] = {"queue_depth": 0.0, "running_sequences": 0.0, "batch_slots": 0.0,
                                          "weight_bytes_per_pass": 0.0}
        self._occupancy = [0.0, 0]  # sum of running/slots over steps, steps
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def count(self, name: str, by: float = 1.0) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0.0) + by

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = float(value)

    def step(self, running: int, slots: int) -> None:
        """One engine pass over `running` of `slots` sequences."""
        with self._lock:
            self._counters["steps_total"] += 1
            if slots:
                self._occupancy[0] += running / slots
                self._occupancy[1] += 1

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            out = dict(self._counters)
            out.update(self._gauges)
            s, n = self._occupancy
            out["batch_occupancy"] = s / n if n else 0.0
            self.ttft.export("ttft_seconds", out)
            self.itl.export("itl_seconds", out)
        return out
