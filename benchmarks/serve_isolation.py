"""Isolation of `tunelab serve`: do well-behaved clients keep their latency and answers while others misbehave?

    .venv/bin/python benchmarks/serve_isolation.py [--model smollm2-135m] [--clients 28] [--requests 4]
        [--max-tokens 16] [--threads 1] [--phase-timeout 240] [--json benchmarks/results/serve_isolation.json]

Starts the real server (`python -m tunelab serve MODEL` on a free loopback port, torch threads = --threads) and
runs two phases against it, one after the other, with the same requests:

- A: --clients well-behaved clients alone, each sending --requests greedy chat completions (--max-tokens new tokens,
  fixed prompts) one after another;
- B: the same clients while four misbehaving ones run beside them: `hang-up` sends a 1000-token (ignore_eos)
  non-streaming request and closes the connection after a second, again and again; `poison` sends values that have
  broken the server before (temperature 1e-300, lone UTF-16 surrogates, wrong types); `slow-body` holds connections
  whose body is shorter than their Content-Length; `stream-drop` reads a few chunks of a stream and disconnects, and
  sends bodies over the size limit.

Prints per phase the requests, errors, answers different from phase A's greedy answer, p50 and p95 latency, and the
p95 ratio B/A (target: at most 1.5), plus what the misbehaving clients got back. Traffic goes to 127.0.0.1 only;
every request has a timeout and phase B a deadline, so a server that stalls ends the run as a row of errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Name a primary colour.", "What is two plus two?",
           "Say hello in Spanish.", "What do bees make?", "Name a planet.", "What colour is the sky?",
           "How many legs does a spider have?", "What is the opposite of hot?", "Name a fruit that is yellow.",
           "What do cows drink?", "Which animal barks?", "What is frozen water called?", "Name a day of the week.",
           "What is the largest ocean?", "What gas do plants breathe in?", "How many days are in a week?",
           "What shape has three sides?", "Name a musical instrument.", "What is the boiling point of water?",
           "Which month comes after May?", "What do you use to write on paper?", "Name a vegetable.",
           "What is the first letter of the alphabet?", "Where do fish live?", "What is the colour of grass?",
           "What do we call a baby cat?", "Name something that flies."]
LONG_TOKENS = 1000
HANG_UP_AFTER_S = 1.0
SLOW_BODY_CONNECTIONS = 8
SLOW_BODY_HOLD_S = 10.0
POISON = [  # (what, raw JSON body): each has ended in a 5xx or a failed batch at some point
    ("temperature 1e-300", '{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}], '
                           '"max_tokens": 8, "temperature": 1e-300}}'),
    ("lone surrogate", '{{"model": "{model}", "messages": [{{"role": "user", "content": "a\\ud800b"}}], '
                       '"max_tokens": 8}}'),
    ("string max_tokens", '{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}], '
                          '"max_tokens": "8"}}'),
    ("messages as a string", '{{"model": "{model}", "messages": "hi", "max_tokens": 8}}'),
    ("boolean n", '{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}], "n": true}}'),
    ("float temperature string", '{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}], '
                                 '"temperature": "0.5", "max_tokens": 8}}'),
    ("surrogate in stop", '{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}], '
                          '"stop": ["\\udfff"], "max_tokens": 8}}'),
    ("not JSON", '{{"model": "{model}", "messages": ['),
]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model to serve (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=28, help="well-behaved clients (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=4, help="requests per well-behaved client (default: "
                                                                "%(default)s)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of the well-behaved requests")
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP threads of the server (default: 1)")
    parser.add_argument("--max-batch", type=int, help="the server's --max-batch (default: the server's own)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds one well-behaved request may take")
    parser.add_argument("--phase-timeout", type=float, default=240, help="seconds a phase may take in all")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "serve_isolation.json"),
                        help="write the results here (default: %(default)s)")
    return parser.parse_args()


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    env.pop("TUNELAB_API_KEY", None)
    command = [sys.executable, "-m", "tunelab", "serve", args.model, "--host", "127.0.0.1", "--port", str(port)]
    if args.max_batch:
        command += ["--max-batch", str(args.max_batch)]
    log = Path(tempfile.gettempdir()) / f"serve_isolation_{port}.log"
    print(f"server output (the tracebacks of its 5xx): {log}", file=sys.stderr)
    with open(log, "wb") as output:  # the child keeps its own copy of the file handle
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"error: the server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.terminate()
    sys.exit("error: the server did not become healthy in 300 s")


def chat_body(model: str, prompt: str, max_tokens: int, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


async def well_behaved(client: httpx.AsyncClient, model: str, index: int, args, deadline: float) -> list[dict]:
    """One client's requests, one after another: prompt, latency, status and answer of each."""
    results = []
    for k in range(args.requests):
        prompt = PROMPTS[(index + k) % len(PROMPTS)]
        start = time.perf_counter()
        row = {"client": index, "prompt": prompt, "status": None, "answer": None, "error": None}
        if time.monotonic() > deadline:
            results.append({**row, "error": "phase deadline passed", "latency": None})
            continue
        try:
            response = await client.post("/v1/chat/completions", json=chat_body(model, prompt, args.max_tokens),
                                         timeout=min(args.timeout, max(deadline - time.monotonic(), 1)))
            row["status"] = response.status_code
            if response.status_code == 200:
                row["answer"] = response.json()["choices"][0]["message"]["content"]
            else:
                row["error"] = response.text  # an error object: short
        except httpx.HTTPError as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        results.append({**row, "latency": time.perf_counter() - start})
    return results


async def hang_up(url: str, model: str, stop: asyncio.Event, tally: Counter) -> None:
    """A long non-streaming request, abandoned after a second (the connection closes), over and over."""
    body = chat_body(model, "Write a very long story about a dragon.", LONG_TOKENS, ignore_eos=True)
    while not stop.is_set():
        async with httpx.AsyncClient(base_url=url) as client:
            try:
                response = await client.post("/v1/chat/completions", json=body, timeout=HANG_UP_AFTER_S)
                tally[f"answered {response.status_code}"] += 1
            except httpx.TimeoutException:
                tally["hung up"] += 1
            except httpx.HTTPError as exc:
                tally[type(exc).__name__] += 1
        await asyncio.sleep(0.2)


async def poison(url: str, model: str, stop: asyncio.Event, tally: Counter) -> None:
    """Bodies that have broken the server before, in turn; the status each got is counted."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while not stop.is_set():
            for what, template in POISON:
                try:
                    response = await client.post("/v1/chat/completions", content=template.format(model=model),
                                                 headers={"Content-Type": "application/json"})
                    tally[f"{what}: {response.status_code}"] += 1
                except httpx.HTTPError as exc:
                    tally[f"{what}: {type(exc).__name__}"] += 1
                if stop.is_set():
                    return
                await asyncio.sleep(0.1)


async def slow_body_connection(port: int, model: str, stop: asyncio.Event, tally: Counter) -> None:
    """One connection whose body stops short of its Content-Length, held open, then dropped."""
    body = json.dumps(chat_body(model, "hello", 8)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) + 100}\r\n\r\n").encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        tally[f"connect failed: {type(exc).__name__}"] += 1
        await asyncio.sleep(0.5)
        return
    try:
        writer.write(head + body[: len(body) // 2])
        await writer.drain()
        tally["opened"] += 1
        try:
            answer = await asyncio.wait_for(reader.read(200), timeout=SLOW_BODY_HOLD_S)
            tally[f"server answered: {answer.split(b' ')[1].decode() if answer.count(b' ') else 'closed'}"] += 1
        except TimeoutError:
            tally["held for the whole hold time"] += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def slow_body(port: int, model: str, stop: asyncio.Event, tally: Counter) -> None:
    async def keep_one() -> None:
        while not stop.is_set():
            await slow_body_connection(port, model, stop, tally)

    await asyncio.gather(*(keep_one() for _ in range(SLOW_BODY_CONNECTIONS)))


async def stream_drop(url: str, model: str, stop: asyncio.Event, tally: Counter) -> None:
    """A stream read for three chunks and dropped; every other time a body over the 1 MiB limit instead."""
    body = chat_body(model, "Tell me about the sea.", 200, ignore_eos=True, stream=True)
    oversized = json.dumps(chat_body(model, "x" * (1 << 20), 8)).encode()
    turn = 0
    while not stop.is_set():
        turn += 1
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            try:
                if turn % 2:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        chunks = 0
                        async for _ in response.aiter_lines():
                            chunks += 1
                            if chunks >= 3:
                                break
                        tally[f"stream {response.status_code}, dropped"] += 1
                else:
                    response = await client.post("/v1/chat/completions", content=oversized,
                                                 headers={"Content-Type": "application/json"})
                    tally[f"oversized: {response.status_code}"] += 1
            except httpx.HTTPError as exc:
                tally[f"{'stream' if turn % 2 else 'oversized'}: {type(exc).__name__}"] += 1
        await asyncio.sleep(0.2)


async def phase(url: str, port: int, model: str, args, misbehave: bool) -> dict:
    """The well-behaved clients (and, with `misbehave`, the four others until the well-behaved ones are done)."""
    stop = asyncio.Event()
    tallies = {name: Counter() for name in ("hang-up", "poison", "slow-body", "stream-drop")}
    others = []
    if misbehave:
        others = [asyncio.create_task(hang_up(url, model, stop, tallies["hang-up"])),
                  asyncio.create_task(poison(url, model, stop, tallies["poison"])),
                  asyncio.create_task(slow_body(port, model, stop, tallies["slow-body"])),
                  asyncio.create_task(stream_drop(url, model, stop, tallies["stream-drop"]))]
        await asyncio.sleep(2.0)  # let the misbehaving clients get going first
    deadline = time.monotonic() + args.phase_timeout
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        per_client = await asyncio.gather(*(well_behaved(client, model, i, args, deadline)
                                            for i in range(args.clients)))
    seconds = time.perf_counter() - start
    stop.set()
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    return {"seconds": seconds, "results": [row for rows in per_client for row in rows],
            "misbehaving": {name: dict(tally) for name, tally in tallies.items()} if misbehave else {}}


def summarise(results: list[dict], reference: dict[str, str]) -> dict:
    done = [row for row in results if row["answer"] is not None]
    latencies = sorted(row["latency"] for row in done)
    wrong = [row for row in done if row["answer"] != reference.get(row["prompt"])]
    return {"requests": len(results), "errors": len(results) - len(done), "different_answers": len(wrong),
            "p50_s": statistics.median(latencies) if latencies else None,
            "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))] if latencies else None,
            "errors_by_kind": dict(Counter(error_kind(row["error"]) for row in results if row["error"])),
            "error_samples": sorted({row["error"] for row in results if row["error"]})[:5]}


def error_kind(error: str) -> str:
    """An error's kind: the exception name, or the OpenAI error code of a non-200."""
    try:
        return json.loads(error)["error"]["code"] or "error"
    except (ValueError, KeyError, TypeError):
        return error.split(":", 1)[0][:60]


def main() -> int:
    args = arguments()
    process, url = start_server(args)
    port = int(url.rsplit(":", 1)[1])
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        print(f"serving {args.model} as '{model}'; {args.clients} clients x {args.requests} requests, max_tokens "
              f"{args.max_tokens}, server threads {args.threads}", file=sys.stderr)
        alone = asyncio.run(phase(url, port, model, args, misbehave=False))
        reference: dict[str, str] = {}
        for row in alone["results"]:
            if row["answer"] is not None:
                reference.setdefault(row["prompt"], row["answer"])
        crowded = asyncio.run(phase(url, port, model, args, misbehave=True))
        alive = process.poll() is None
        try:
            healthy = httpx.get(f"{url}/health", timeout=30).status_code == 200
        except httpx.HTTPError:
            healthy = False
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    rows = {"A (alone)": summarise(alone["results"], reference),
            "B (with 4 misbehaving)": summarise(crowded["results"], reference)}
    rows["A (alone)"]["seconds"], rows["B (with 4 misbehaving)"]["seconds"] = alone["seconds"], crowded["seconds"]
    print("| phase | requests | errors | answers unlike A's greedy | p50 latency s | p95 latency s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        p50 = f"{row['p50_s']:.2f}" if row["p50_s"] is not None else "-"
        p95 = f"{row['p95_s']:.2f}" if row["p95_s"] is not None else "-"
        print(f"| {name} | {row['requests']} | {row['errors']} | {row['different_answers']} | {p50} | {p95} | "
              f"{row['seconds']:.1f} |")
    a, b = rows["A (alone)"]["p95_s"], rows["B (with 4 misbehaving)"]["p95_s"]
    ratio = b / a if a and b else None
    print(f"p95 latency B/A: {f'{ratio:.2f}x' if ratio else 'n/a'} (target <= 1.5); server alive after B: "
          f"{'yes' if alive else 'NO'}, healthy: {'yes' if healthy else 'NO'}")
    for name, tally in crowded["misbehaving"].items():
        print(f"  {name}: " + ", ".join(f"{what} x{count}" for what, count in sorted(tally.items())))
    for name, row in rows.items():
        for sample in row["error_samples"]:
            print(f"  {name} error: {sample}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": args.model, "clients": args.clients, "requests_per_client": args.requests,
             "max_tokens": args.max_tokens, "threads": args.threads, "phases": rows, "p95_ratio_b_over_a": ratio,
             "target_ratio": 1.5, "server_alive_after": alive, "server_healthy_after": healthy,
             "misbehaving": crowded["misbehaving"], "reference_answers": reference}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
