"""The scheduler as clients meet it: many concurrent Generate calls through `strata serve`
(three real OS processes) are batched together, and each call gets exactly what it gets
alone; cancellation, a full queue, health under load and requests too large for the
budget."""

import random
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tiny_models
from deploy.client import generate, request_for
from serving import Server, device_flags
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport.wire import generate_pb2, generate_pb2_grpc

CLIENTS = 16


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    return tiny_models.converted("opt", tmp_path_factory)


def _workload(seed: int = 7) -> list[dict]:
    """Prompts of different lengths, max tokens and sampling, one per client."""
    rng = random.Random(seed)
    out = []
    for i in range(CLIENTS):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(2, 40))]
        sampled = i % 4 == 3
        out.append(dict(prompt=prompt, new=rng.randrange(3, 14), greedy=not sampled, seed=100 + i,
                        temperature=0.8 if sampled else 1.0, top_k=20 if sampled else 0))
    return out


def _run(address: str, w: dict) -> list[int]:
    request = request_for([w["prompt"]], w["new"], greedy=w["greedy"], temperature=w["temperature"],
                          top_k=w["top_k"], seed=w["seed"], stop_at_eos=False)
    return generate(address, request, timeout=120).tokens[0]


def _concurrently(fn, items) -> list:
    results: list = [None] * len(items)
    start = threading.Barrier(len(items))

    def one(i):
        start.wait()
        try:
            results[i] = fn(items[i])
        except Exception as e:  # noqa: BLE001 - checked by the caller
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def _stats(address: str) -> dict[str, float]:
    with grpc.insecure_channel(address) as ch:
        return dict(generate_pb2_grpc.GeneratorStub(ch).Stats(generate_pb2.StatsRequest(), timeout=5).values)


@pytest.mark.parametrize("kv_flags", [[], ["--kv-offload"], ["--device", "mock-cuda"],
                                      ["--kv-offload", "--prefill-tokens-per-pass", "16"]],
                         ids=["kv-local", "kv-offload", "mock-cuda-graph-buckets", "kv-offload-prefill-budget"])
def test_concurrent_clients_are_batched_and_each_gets_its_tokens_alone(opt, kv_flags):
    hf, shards = opt
    work = _workload()
    greedy = [w for w in work if w["greedy"]]
    expected = tiny_models.greedy_reference(hf, [w["prompt"] for w in greedy], 13)
    server = Server(shards, "--max-batch", "8", "--micro-batches", "2", "--max-seq-len", "64", *kv_flags)
    try:
        alone = [_run(server.address, w) for w in work]
        steps_alone = _stats(server.address)["steps_total"]
        together = _concurrently(lambda w: _run(server.address, w), work)
        stats = _stats(server.address)
    finally:
        server.stop()
    assert together == alone
    for w, ref in zip(greedy, expected):  # and greedy ones are transformers' tokens
        assert alone[work.index(w)] == ref[: w["new"]]
    # one call at a time would take as many passes again; batched, far fewer
    assert stats["steps_total"] - steps_alone < steps_alone / 2
    assert stats["requests_total:ok"] == 2 * CLIENTS
    on_cuda = "--device" in device_flags() and not kv_flags  # the test device's own graphs
    assert stats["decode_graphs"] == (1.0 if "mock-cuda" in kv_flags or on_cuda else 0.0)
    # with a budget, the clients' prompts (2-39 tokens) join over passes that decode the others
    assert stats["plan_prefill_tokens_per_pass"] == (16 if "--prefill-tokens-per-pass" in kv_flags else 0)


def test_a_cancelled_call_frees_its_slot_and_disturbs_no_other(opt):
    _, shards = opt
    work = _workload(seed=3)[:4]
    server = Server(shards, "--max-batch", "2", "--max-seq-len", "64")
    try:
        alone = [_run(server.address, w) for w in work]
        long_request = request_for([[5, 6, 7]], 60, stop_at_eos=False)
        cut = _concurrently(
            lambda x: generate(server.address, long_request, timeout=120, stop_after=3) if x is None
            else _run(server.address, x), [None, *work])
        # the server sees the cancellation at its next pass, which may come after the
        # other calls have returned
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = _stats(server.address)
            if stats["requests_total:cancelled"] >= 1 and stats["running_sequences"] == 0:
                break
            time.sleep(0.1)
    finally:
        server.stop()
    assert cut[0] is None and cut[1:] == alone
    assert stats["requests_total:cancelled"] == 1 and stats["running_sequences"] == 0


def test_a_full_queue_answers_resource_exhausted_and_the_rest_complete(opt):
    _, shards = opt
    server = Server(shards, "--max-batch", "1", "--max-queue", "2", "--max-seq-len", "128")
    request = request_for([[5, 6, 7]], 100, stop_at_eos=False)
    try:
        results = _concurrently(lambda _: generate(server.address, request, timeout=120), list(range(8)))
    finally:
        server.stop()
    refused = [r for r in results if isinstance(r, StrataError)]
    done = [r for r in results if not isinstance(r, Exception)]
    assert refused and all(r.kind is ErrorKind.RESOURCE_EXHAUSTED for r in refused)
    assert len(done) >= 3 and len(done) + len(refused) == 8
    assert all(len(r.tokens[0]) == 100 for r in done)


def test_health_is_answered_at_once_while_64_requests_wait(opt):
    _, shards = opt
    server = Server(shards, "--max-batch", "1", "--max-queue", "80", "--max-seq-len", "128")
    request = request_for([[5, 6, 7]], 100, stop_at_eos=False)
    stop = threading.Event()
    waiting = []

    def client():
        with grpc.insecure_channel(server.address) as ch:
            call = generate_pb2_grpc.GeneratorStub(ch).Generate(request, timeout=300)
            waiting.append(call)
            stop.wait()
            call.cancel()

    threads = [threading.Thread(target=client) for _ in range(64)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while _stats(server.address)["queue_depth"] < 60 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _stats(server.address)["queue_depth"] >= 60
        with grpc.insecure_channel(server.address) as ch:
            t0 = time.monotonic()
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - t0 < 1.0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        server.stop()


def test_a_request_larger_than_the_budget_is_refused_at_once(opt):
    _, shards = opt
    server = Server(shards, "--max-batch", "2", "--max-seq-len", "32")
    try:
        for prompts, new in (([[5] * 30], 8), ([[5, 6]] * 3, 2)):
            t0 = time.monotonic()
            with pytest.raises(StrataError) as e:
                generate(server.address, request_for(prompts, new), timeout=30)
            assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 5
        ok = generate(server.address, request_for([[5] * 20], 8, stop_at_eos=False), timeout=30)
        assert len(ok.tokens[0]) == 8  # the server still serves
    finally:
        server.stop()


@pytest.mark.parametrize("kv_flags", [[], ["--kv-offload", "--kv-bits", "8"]], ids=["kv-local", "kv-offload-int8"])
def test_prompts_of_one_length_prefilled_together_give_transformers_tokens(opt, kv_flags):
    """Equal-length prompts of a pass are prefilled as one batch (slot_kv.packed_attention)."""
    hf, shards = opt
    prompts = [[7, 8, 9, 10, 11], [300, 2, 45, 6, 7], [9, 9, 9, 9, 9], [1, 2, 3]]
    expected = tiny_models.greedy_reference(hf, prompts, 6)
    server = Server(shards, "--max-batch", "4", "--max-seq-len", "32", *kv_flags)
    try:
        got = generate(server.address, request_for(prompts, 6, stop_at_eos=False), timeout=60).tokens
    finally:
        server.stop()
    if "8" in kv_flags:  # a lossy cache: the first token comes from the unquantized prompt
        assert [g[0] for g in got] == [e[0] for e in expected]
    else:
        assert got == expected


def test_a_waiting_request_past_its_deadline_leaves_the_queue(opt):
    _, shards = opt
    server = Server(shards, "--max-batch", "1", "--max-seq-len", "128")
    long_request = request_for([[5, 6, 7]], 120, stop_at_eos=False)
    ahead = [threading.Thread(target=lambda: generate(server.address, long_request, timeout=120)) for _ in range(6)]
    try:
        for t in ahead:
            t.start()
        deadline = time.monotonic() + 30
        while _stats(server.address)["queue_depth"] < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        with pytest.raises(StrataError) as e:  # waits behind 4+ requests of 120 steps
            generate(server.address, request_for([[8, 9]], 4), timeout=0.3)
        assert e.value.kind is ErrorKind.DEADLINE_EXCEEDED and time.monotonic() - t0 < 5
        for t in ahead:
            t.join(timeout=120)
        stats = _stats(server.address)
        assert stats["requests_total:ok"] == 6  # the others all ran
        assert stats["requests_total:deadline"] + stats["requests_total:cancelled"] == 1
        assert stats["queue_depth"] == 0 and stats["running_sequences"] == 0
    finally:
        server.stop()


@pytest.mark.parametrize("kv_bits", ["16", "8"])
def test_a_long_prompt_goes_in_chunks_while_another_sequence_decodes(opt, kv_bits):
    """--prefill-chunk-tokens 8: a 60-token prompt is prefilled 8 tokens a pass (each
    piece attending over the earlier ones in the cache); its tokens are transformers'
    (the first of them with an 8-bit cache), and a short request beside it runs on."""
    hf, shards = opt
    long_prompt = [(7 * i + 3) % 500 + 3 for i in range(60)]
    short = [11, 12, 13]
    expected = tiny_models.greedy_reference(hf, [long_prompt, short], 6)
    server = Server(shards, "--max-batch", "2", "--max-seq-len", "80", "--prefill-chunk-tokens", "8",
                    "--kv-bits", kv_bits)
    try:
        both = _concurrently(lambda p: generate(server.address, request_for([p], 6, stop_at_eos=False),
                                                timeout=60).tokens[0], [long_prompt, short])
        stats = _stats(server.address)
    finally:
        server.stop()
    if kv_bits == "16":
        assert both == expected
    else:
        assert [b[0] for b in both] == [e[0] for e in expected]
    assert stats["steps_total"] >= 8 + 5  # 8 pieces of the prompt, a pass each, then 5 decode passes
