"""`strata batch IN.jsonl OUT.jsonl --endpoint ADDR`: an OpenAI batch file through
the compute node's Generate API (gRPC, strata.api.client.AsyncClient).

Input lines are OpenAI's batch requests (`custom_id`, `method` POST, `url`
/v1/completions or /v1/chat/completions, `body`); output lines OpenAI's batch results
(`custom_id`, `response` with `status_code` and `body`, or `error` for a line that is
no request). Bodies are converted as the HTTP gateway converts them
(strata/api/openai_format.py); chat needs the model's chat template (`--model DIR`, the
served model's directory).

Enough calls stay in flight to fill the server's batch (`--concurrency`, default
twice its batch slots). Each result is written as it completes, by one writer, flushed
and fsync'd in small groups. Run again with the same OUT, the job resumes: it reads
the custom_ids (and the line numbers of refused lines) already in OUT, cuts a torn last
line, and answers only the rest, so each custom_id is written once. A bad line gets its
error in OUT and the job goes on; a server that stays unavailable stops the job
(exit 1, nothing written for the calls it refused: run again to resume)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time

import aiofiles

from strata.api import openai_format as oai
from strata.api.client import AsyncClient, CallError

FSYNC_LINES, FSYNC_SECONDS = 32, 1.0
BUSY_BACKOFF_S = (0.2, 5.0)  # a full server queue: wait and try again, from 0.2 s doubling to 5 s
BUSY_WAIT_S = 300.0  # ... for at most this long, then the request is answered 429


@dataclasses.dataclass
class Done:
    """What OUT already holds."""
    custom_ids: set = dataclasses.field(default_factory=set)
    lines: set = dataclasses.field(default_factory=set)  # input line numbers answered without a custom_id


@dataclasses.dataclass
class Progress:
    done: int = 0
    errors: int = 0
    tokens: int = 0


class Stopped(Exception):
    """The server is unavailable: stop, keep what was written."""


def read_done(path: str) -> Done:
    """The answered custom_ids and line numbers in OUT; a torn last line (no newline, or
    not JSON) is cut off the file."""
    done = Done()
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as f:
        data = f.read()
        good = 0  # bytes of whole, readable lines
        for raw in data.splitlines(keepends=True):
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("torn")
                row = json.loads(raw)
            except ValueError:
                break
            good += len(raw)
            if row.get("custom_id") is not None:
                done.custom_ids.add(row["custom_id"])
            elif isinstance(row.get("error"), dict) and isinstance(row["error"].get("line"), int):
                done.lines.add(row["error"]["line"])
        if good < len(data):
            f.truncate(good)
    return done


def parse_line(n: int, raw: str, template) -> tuple[str | None, oai.Job | dict]:
    """(custom_id, the Job) or (custom_id, an output line) for a line answered without a call."""
    try:
        req = json.loads(raw)
    except ValueError as e:
        return None, _line_error(n, None, "invalid_json", f"line {n} is not JSON: {e}")
    if not isinstance(req, dict) or not isinstance(req.get("custom_id"), str) or not req["custom_id"]:
        return None, _line_error(n, None, "missing_custom_id", f"line {n} has no custom_id (a non-empty string)")
    cid = req["custom_id"]
    if req.get("method", "POST") != "POST" or req.get("url") not in oai.BATCH_URLS:
        return cid, _line_error(n, cid, "invalid_url", f"line {n}: method must be POST and url one of "
                                                       f"{', '.join(oai.BATCH_URLS)}")
    try:
        job = (oai.chat_job(req.get("body"), template) if req["url"].endswith("/chat/completions")
               else oai.completion_job(req.get("body")))
    except oai.APIError as e:
        return cid, oai.batch_output(cid, e.status, e.body())
    if job.stream:
        e = oai.bad("stream", "is not supported in a batch")
        return cid, oai.batch_output(cid, e.status, e.body())
    return cid, job


def _line_error(n: int, cid, code: str, message: str) -> dict:
    return oai.batch_output(cid, None, None, {"code": code, "message": message, "line": n})


async def answer(client: AsyncClient, cid: str, job: oai.Job, timeout: float | None) -> tuple[dict, int]:
    """The output line for one request, and the tokens it generated."""
    wait, waited = BUSY_BACKOFF_S[0], 0.0
    while True:
        try:
            result = await client.generate(job.prompts, job.max_new_tokens, timeout=timeout, **job.sampling())
            return oai.batch_output(cid, 200, oai.response_body(job, result)), sum(len(t) for t in result.tokens)
        except CallError as e:
            if e.code == "UNAVAILABLE":
                raise Stopped(str(e)) from None
            # a full queue says "retry later"; a request too long for the server's slots does not
            if e.code == "RESOURCE_EXHAUSTED" and "retry" in e.message and waited < BUSY_WAIT_S:
                await asyncio.sleep(wait)
                waited += wait
                wait = min(wait * 2, BUSY_BACKOFF_S[1])
                continue
            err = oai.from_call_error(e.code, str(e))
            return oai.batch_output(cid, err.status, err.body()), 0


async def run_batch(src: str, dst: str, client: AsyncClient, *, template=None, concurrency: int = 0,
                    timeout: float | None = None, progress=None) -> Progress:
    """Answers every request of `src` not yet in `dst`; `progress(state, total)` after each."""
    done = read_done(dst)
    total = _requests_left(src, done)
    if concurrency <= 0:
        concurrency = await _default_concurrency(client)
    state = Progress()
    if progress is not None:
        progress(state, total)
    work: asyncio.Queue = asyncio.Queue(maxsize=2 * concurrency)  # (custom_id, Job), then one None a caller
    out: asyncio.Queue = asyncio.Queue()  # (output line, tokens), then None
    failed: list[BaseException] = []  # the Stopped of a caller: the others stop calling
    writer = asyncio.create_task(_write_results(dst, out, state, total, progress))
    await asyncio.gather(_read_requests(src, done, template, work, out, concurrency),
                         *(_call_server(client, work, out, failed, timeout) for _ in range(concurrency)))
    await out.put(None)
    await writer
    if failed:
        raise Stopped(str(failed[0]))
    return state


def _requests_left(src: str, done: Done) -> int:
    """The progress total: the non-blank lines of `src` less those OUT already answers."""
    with open(src, "rb") as f:
        return max(0, sum(1 for line in f if line.strip()) - len(done.custom_ids) - len(done.lines))


async def _default_concurrency(client: AsyncClient) -> int:
    """Twice the server's batch slots, or 32 when its Stats do not say."""
    slots = 0
    try:
        slots = int((await client.stats(timeout=10))[0].get("batch_slots", 0))
    except CallError:
        pass
    return 2 * slots if slots else 32


async def _read_requests(src: str, done: Done, template, work: asyncio.Queue, out: asyncio.Queue,
                         concurrency: int) -> None:
    """Parses the lines of `src` not answered in `done`: each Job onto `work`, each line
    answered without a call onto `out`; then one None onto `work` for each caller."""
    seen = set()  # custom_ids of earlier lines: a custom_id belongs to its first line
    n = 0
    async with aiofiles.open(src, encoding="utf-8", errors="replace") as f:
        async for raw in f:
            n += 1
            if not raw.strip() or n in done.lines:
                continue
            cid, item = parse_line(n, raw, template)
            if cid is not None and cid in seen:
                item = _line_error(n, None, "duplicate_custom_id", f"line {n}: custom_id {cid!r} was used before")
            elif cid is not None:
                seen.add(cid)
                if cid in done.custom_ids:
                    continue
            if isinstance(item, dict):
                await out.put((item, 0))
            else:
                await work.put((cid, item))
    for _ in range(concurrency):
        await work.put(None)


async def _call_server(client: AsyncClient, work: asyncio.Queue, out: asyncio.Queue,
                       failed: list[BaseException], timeout: float | None) -> None:
    """One caller: answers the Jobs from `work` onto `out` until its None; once any
    caller is Stopped (in `failed`), the rest of `work` is drained without calls."""
    while (item := await work.get()) is not None:
        if failed:
            continue
        try:
            await out.put(await answer(client, item[0], item[1], timeout))
        except Stopped as e:
            failed.append(e)


async def _write_results(dst: str, out: asyncio.Queue, state: Progress, total: int, progress) -> None:
    """The one writer: appends each output line from `out` to `dst` until None, counting
    it in `state`; flushed and fsync'd once FSYNC_LINES lines are pending or FSYNC_SECONDS
    have passed, and whenever `out` runs empty."""
    pending, last_sync = 0, time.monotonic()
    async with aiofiles.open(dst, "a", encoding="utf-8") as f:
        while (item := await out.get()) is not None:
            line, tokens = item
            await f.write(json.dumps(line, ensure_ascii=False) + "\n")
            state.done += 1
            state.tokens += tokens
            state.errors += (line["error"] is not None) or line["response"]["status_code"] != 200
            pending += 1
            if pending >= FSYNC_LINES or time.monotonic() - last_sync >= FSYNC_SECONDS or out.empty():
                await f.flush()
                await asyncio.to_thread(os.fsync, f.fileno())
                pending, last_sync = 0, time.monotonic()
            if progress is not None:
                progress(state, total)


def add_batch_parser(sub) -> None:
    b = sub.add_parser("batch", help="answer an OpenAI batch file (JSONL) through a running server; resumable")
    b.add_argument("input", metavar="IN.jsonl", help="OpenAI batch requests, one JSON object a line")
    b.add_argument("output", metavar="OUT.jsonl",
                   help="results, appended as they complete; run again with the same file to resume")
    b.add_argument("--endpoint", required=True, help="the compute node's gRPC address (host:port or unix:///path)")
    b.add_argument("--model", default="", metavar="DIR",
                   help="the served model's directory, for its chat template (needed by /v1/chat/completions lines)")
    b.add_argument("--concurrency", type=int, default=0,
                   help="calls in flight (default: twice the server's batch slots, or 32)")
    b.add_argument("--timeout", type=float, default=0.0, help="each call's deadline in seconds (0 = none)")
    b.add_argument("--api-key", default=os.environ.get("STRATA_API_KEY", ""),
                   help="sent as `authorization: Bearer KEY` (default: $STRATA_API_KEY)")
    b.add_argument("--tls-ca", default="", help="PEM root certificate of a TLS server")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(fn=main)


def main(a) -> int:
    return asyncio.run(_main(a))


async def _main(a) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

    template = None
    if a.model:
        from strata.api.chat_template import ChatTemplate

        template = ChatTemplate.load(a.model)
    start = time.monotonic()
    bar = Bar(TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} tokens/s"),
              TimeRemainingColumn(), disable=a.no_progress, transient=False)
    task = bar.add_task("batch", total=None, rate="-")

    def show(state: Progress, total: int) -> None:
        bar.update(task, completed=state.done, total=total,
                   rate=f"{state.tokens / max(time.monotonic() - start, 1e-9):.1f}")

    client = AsyncClient(a.endpoint, api_key=a.api_key or None, tls_ca=a.tls_ca or None, timeout=None)
    try:
        with bar:
            state = await run_batch(a.input, a.output, client, template=template, concurrency=a.concurrency,
                                    timeout=a.timeout or None, progress=show)
    except Stopped as e:
        print(f"strata batch: stopped, the server is unavailable ({e}); run again to resume", file=sys.stderr)
        return 1
    finally:
        await client.close()
    seconds = time.monotonic() - start
    print(f"strata batch: {state.done} answered ({state.errors} errors), {state.tokens} tokens in {seconds:.1f} s "
          f"({state.tokens / max(seconds, 1e-9):.1f} tokens/s) -> {a.output}", file=sys.stderr)
    return 0
