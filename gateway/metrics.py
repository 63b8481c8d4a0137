"""`GET /metrics`: the compute node's scheduler and engine values, read from
`Generator.Stats` at each scrape (compute_node/metrics.py lists the names), exposed as
Prometheus metric families, beside the gateway's own HTTP request counters.

`families(values)` is the mapping, plain and testable alone; `ComputeNodeCollector`
calls Stats when scraped (a failed call shows as `strata_compute_node_up 0`)."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

log = logging.getLogger("strata.gateway.metrics")

P = "strata_"
# compute node name -> (family, kind, help, label of the part after ':')
KNOWN = {
    "requests_total": ("requests", "counter", "Generate calls ended, by outcome", "outcome"),
    "queue_depth": ("queue_depth", "gauge", "sequences waiting for a batch slot", None),
    "running_sequences": ("running_sequences", "gauge", "sequences holding a batch slot", None),
    "batch_slots": ("batch_slots", "gauge", "slots in the running batch", None),
    "batch_occupancy": ("batch_occupancy_ratio", "gauge", "running sequences / slots, averaged over the steps", None),
    "prompt_tokens_total": ("prompt_tokens", "counter", "prompt tokens admitted", None),
    "generated_tokens_total": ("generated_tokens", "counter", "tokens generated", None),
    "steps_total": ("steps", "counter", "engine passes (decode steps, with any prefill joined)", None),
    "kv_bytes_used": ("kv_used_bytes", "gauge", "KV cache bytes in use, by home (gpu or kv_store)", "home"),
    "kv_bytes_capacity": ("kv_capacity_bytes", "gauge", "KV cache capacity in bytes, by home", "home"),
    "weight_bytes_per_pass": ("weight_bytes_per_pass", "gauge", "weight bytes copied host-to-device each pass", None),
    "h2d_bytes_total": ("h2d_bytes", "counter", "weight bytes copied host-to-device", None),
    "h2d_seconds_total": ("h2d_seconds", "counter", "seconds spent copying weights host-to-device", None),
    "oom_shrinks_total": ("oom_shrinks", "counter", "passes retried with smaller prefill chunks (device out of memory)",
                          None),
    "oom_preemptions_total": ("oom_preemptions", "counter",
                              "requests sent back to the queue from a decode step out of device memory", None),
    "admit_cap": ("admit_cap", "gauge", "sequences that may run at once (lowered after running out of memory)", None),
    "pass_issue_seconds_total": ("pass_issue_seconds", "counter", "scheduler thread: seconds issuing passes", None),
    "pass_wait_seconds_total": ("pass_wait_seconds", "counter", "scheduler thread: seconds waiting for the device",
                                None),
    "pass_host_seconds_total": ("pass_host_seconds", "counter", "scheduler thread: seconds on the host between passes",
                                None),
}
HISTOGRAMS = {
    "ttft_seconds": ("time_to_first_token_seconds", "time from a request's arrival to its first token"),
    "itl_seconds": ("inter_token_latency_seconds", "time between a sequence's tokens"),
}


def families(values: dict[str, float]) -> list[Metric]:
    """The compute node's flat name[:label] -> value map as metric families."""
    out: dict[str, Metric] = {}
    hist: dict[str, dict] = {}
    for key, value in sorted(values.items()):
        name, _, label = key.partition(":")
        h = next((h for h in HISTOGRAMS if name.startswith(h + "_")), None)
        if h is not None:
            part = hist.setdefault(h, {"buckets": [], "sum": 0.0})
            if name.endswith("_bucket"):
                part["buckets"].append((label, value))
            elif name.endswith("_sum"):
                part["sum"] = value
            continue
        family, kind, doc, label_name = KNOWN.get(name) or _unknown(name, label)
        metric = out.get(family)
        if metric is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            metric = out[family] = cls(P + family, doc, labels=[label_name] if label_name else None)
        metric.add_metric([label] if label_name else [], value)
    seconds = values.get("h2d_seconds_total", 0.0)
    out["h2d_gbps"] = GaugeMetricFamily(P + "h2d_gigabytes_per_second", "weight copies host-to-device, GB/s so far",
                                        value=values.get("h2d_bytes_total", 0.0) / seconds / 1e9 if seconds else 0.0)
    for h, part in hist.items():
        family, doc = HISTOGRAMS[h]
        buckets = sorted(part["buckets"], key=lambda b: float(b[0]))
        out[family] = HistogramMetricFamily(P + family, doc, buckets=buckets, sum_value=part["sum"])
    return list(out.values())


def _unknown(name: str, label: str):
    """A name this gateway does not know yet (a newer compute node): a counter if it ends in _total."""
    if name.endswith("_total"):
        return name[: -len("_total")], "counter", name, "kind" if label else None
    return name, "gauge", name, "kind" if label else None


class ComputeNodeCollector:
    def __init__(self, stats: Callable[[], dict[str, float]]):
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        return []  # no Stats call when registered

    def collect(self) -> Iterable[Metric]:
        try:
            values = self.stats()
        except Exception as e:  # noqa: BLE001 - a scrape reports the compute node down, never fails
            log.warning("Stats from the compute node failed: %s", e)
            yield GaugeMetricFamily(P + "compute_node_up", "whether the compute node answered Stats", value=0)
            return
        yield GaugeMetricFamily(P + "compute_node_up", "whether the compute node answered Stats", value=1)
        yield from families(values)


class HttpMetrics:
    """The gateway's own requests, by route and status."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(P + "http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=registry)
        self.seconds = Histogram(P + "http_request_duration_seconds", "HTTP request time to the response's start",
                                 ["route"], registry=registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.seconds.labels(route=route).observe(seconds)
