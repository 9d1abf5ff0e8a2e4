"""The client side of `benchmarks/serve_load.py`: N concurrent clients of the official `openai` client (asyncio,
streaming), spread over several processes.

One Python process serialises its clients' requests: with 32 clients each sending a ~200 KB JSON body (the image
as a data URL), the last request of a burst leaves ~100 ms after the first, and that wait would be counted in its
time to first token although the server never saw it. So the clients are split over `processes` processes (this
module run as `python -m benchmarks.serve_load_clients`: it imports neither torch nor the package, so they start in
a second), which start together once all are ready; each runs its share on one asyncio loop.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time


async def _clients(base_url: str, clients: int, per_client: int, messages: list, new_tokens: int) -> dict:
    """`clients` concurrent clients on this loop, each streaming `per_client` requests back to back."""
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8)))
    ttfts, tokens, errors = [], [0], [0]

    async def one_client() -> None:
        for _ in range(per_client):
            start = time.monotonic()
            try:
                stream = await client.chat.completions.create(
                    model="bench", messages=messages, max_tokens=new_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True})
                first = None
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.monotonic() - start
                    if chunk.usage is not None:
                        tokens[0] += chunk.usage.completion_tokens
                ttfts.append(first if first is not None else time.monotonic() - start)
            except Exception as err:  # counted, reported; the row goes on
                errors[0] += 1
                print(f"  request failed: {type(err).__name__}: {str(err)[:120]}", file=sys.stderr)

    start = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    end = time.monotonic()
    await client.close()
    return {"ttfts": ttfts, "tokens": tokens[0], "errors": errors[0], "start": start, "end": end}


def summarize(ttfts: list[float], tokens: int, errors: int, wall: float, requests: int) -> dict:
    """A row's figures: aggregate tokens/s over `wall` seconds, time to first text p50 / p95 in ms, errors and the
    number of requests."""
    ttfts = sorted(ttfts)
    return {"tokens_per_s": tokens / wall,
            "ttft_p50": statistics.median(ttfts) * 1000 if ttfts else float("nan"),
            "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] * 1000 if ttfts else float("nan"),
            "errors": errors, "requests": requests}


def run_clients(base_url: str, clients: int, per_client: int, messages: list, new_tokens: int,
                processes: int = 8) -> dict:
    """Runs the load; returns aggregate tokens/s (every generated token over the wall time from the common start
    to the last reply), TTFT p50 / p95 in ms, errors, the number of requests, and when it started and ended
    (`time.monotonic`, one clock for all processes of the machine)."""
    processes = max(1, min(processes, clients))
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    job = [base_url, 0, per_client, messages, new_tokens]
    if processes == 1:
        parts = [asyncio.run(_clients(base_url, clients, per_client, messages, new_tokens))]
    else:
        workers = [subprocess.Popen([sys.executable, "-m", "benchmarks.serve_load_clients"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True) for _ in shares]
        try:
            for worker, share in zip(workers, shares, strict=True):
                job[1] = share
                worker.stdin.write(json.dumps(job) + "\n")
                worker.stdin.flush()
            for worker in workers:
                if worker.stdout.readline().strip() != "ready":
                    raise RuntimeError("a client process failed to start (its error is above)")
            for worker in workers:  # all at once
                worker.stdin.write("go\n")
                worker.stdin.flush()
            outputs = [worker.communicate(timeout=900)[0] for worker in workers]
            if bad := [w.returncode for w in workers if w.returncode]:
                raise RuntimeError(f"client processes failed with exit codes {bad} (their errors are above)")
            parts = [json.loads(output) for output in outputs]
        finally:
            for worker in workers:
                worker.kill()
    start, end = min(p["start"] for p in parts), max(p["end"] for p in parts)
    row = summarize([t for part in parts for t in part["ttfts"]], sum(p["tokens"] for p in parts),
                    sum(p["errors"] for p in parts), end - start, clients * per_client)
    return {**row, "start": start, "end": end}

def _worker() -> None:
    """One client process: reads its job, says "ready", waits for "go", runs, prints its result (JSON)."""
    base_url, clients, per_client, messages, new_tokens = json.loads(sys.stdin.readline())
    import httpx  # noqa: F401  (imported before "ready": the first request must not pay for it)
    import openai  # noqa: F401

    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":  # the driver has gone
        raise SystemExit(1)
    print(json.dumps(asyncio.run(_clients(base_url, clients, per_client, messages, new_tokens))), flush=True)


if __name__ == "__main__":
    _worker()
