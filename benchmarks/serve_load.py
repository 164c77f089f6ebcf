"""Load test of `tunelab serve`: 64 chat requests at concurrency 1, 8 and 32 against a served run.

    .venv/bin/python benchmarks/serve_load.py [--model RUN_DIR] [--requests 64] [--max-tokens 32]
        [--concurrency 1,8,32] [--threads 1] [--max-batch N] [--json FILE]

Starts the real server (`python -m tunelab serve MODEL` on a free loopback port, torch threads = --threads), first
asks for the greedy answer of every prompt one request at a time (the sequential reference), then sends the same
requests at each concurrency with the official `AsyncOpenAI` client and prints requests/s, generated tokens/s,
p50/p95 latency, the share of answers equal to the sequential greedy answer and whether every response was
well-formed, plus the tokens/s ratio of concurrency 8 over 1. Prompts are the symptom descriptions of the
symptom_to_diagnosis test split, put into the run's prompt template when its recipe has one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from openai import AsyncOpenAI

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = "/work/runs-shared/smollm2-sft-lora"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_RUN, help="run folder (or model) to serve (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP threads of the server (default: 1)")
    parser.add_argument("--max-batch", type=int, help="the server's --max-batch (default: the server's own)")
    parser.add_argument("--dtype", default="float32", help="the server's --dtype (default: %(default)s)")
    parser.add_argument("--data", default=data_folder(), help="folder holding symptom_to_diagnosis/ (default: the "
                                                              "first on TUNELAB_DATA_PATH that has it)")
    parser.add_argument("--ignore-eos", action="store_true", help="every answer runs to --max-tokens (vLLM's "
                                                                  "ignore_eos): measures decoding, not prompt reading")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args()


def data_folder() -> str:
    """Where symptom_to_diagnosis is, searched as tunelab searches TUNELAB_DATA_PATH (default data:../shared/data)."""
    for entry in os.environ.get("TUNELAB_DATA_PATH", "data:../shared/data").split(":"):
        folder = Path(entry) if Path(entry).is_absolute() else ROOT / entry
        if (folder / "symptom_to_diagnosis").is_dir():
            return str(folder)
    return "../shared/data"


def prompts(args) -> list[str]:
    """The first N test-split symptom texts, in the run's prompt template when it has one."""
    rows = [json.loads(line) for line in (Path(args.data) / "symptom_to_diagnosis" / "test.jsonl").open()]
    recipe_file = Path(args.model) / "recipe.yaml"
    template = (yaml.safe_load(recipe_file.read_text()).get("data", {}).get("prompt_template")
                if recipe_file.is_file() else None) or "{input_text}"
    return [template.format(**row) for row in rows[:args.requests]]


def wait_for_finished_run(model: str) -> None:
    """A run folder still training has no metrics.json yet: wait for it (up to 30 minutes)."""
    path = Path(model)
    if not (path / "recipe.yaml").is_file():
        return
    deadline = time.monotonic() + 1800
    while not (path / "metrics.json").is_file():
        if time.monotonic() > deadline:
            sys.exit(f"error: {path} has no metrics.json after 30 minutes")
        print(f"waiting for {path}/metrics.json ...", file=sys.stderr)
        time.sleep(20)


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    env.pop("TUNELAB_API_KEY", None)
    command = [sys.executable, "-m", "tunelab", "serve", args.model, "--port", str(port), "--dtype", args.dtype]
    if args.max_batch:
        command += ["--max-batch", str(args.max_batch)]
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"error: the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.terminate()
    sys.exit("error: the server did not become healthy in 300 s")


def well_formed(answer, max_tokens: int) -> bool:
    """What a client relies on: one assistant choice with text, a finish reason, and consistent token counts."""
    if answer.object != "chat.completion" or len(answer.choices) != 1:
        return False
    choice, usage = answer.choices[0], answer.usage
    return (choice.message.role == "assistant" and isinstance(choice.message.content, str)
            and choice.finish_reason in ("stop", "length") and usage is not None
            and 0 < usage.completion_tokens <= max_tokens
            and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
            and (choice.finish_reason == "stop" or usage.completion_tokens == max_tokens))


async def send_all(url: str, model: str, texts: list[str], concurrency: int, max_tokens: int,
                   ignore_eos: bool) -> dict:
    """Every text once, at most `concurrency` in flight; latency, tokens, answers and well-formedness per request."""
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    results: list[dict] = [{}] * len(texts)

    async def one(i: int) -> None:
        async with gate:
            start = time.perf_counter()
            answer = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": texts[i]}], max_tokens=max_tokens, temperature=0,
                extra_body={"ignore_eos": True} if ignore_eos else None)
            results[i] = {"latency": time.perf_counter() - start, "text": answer.choices[0].message.content,
                          "tokens": answer.usage.completion_tokens, "ok": well_formed(answer, max_tokens)}

    before = httpx.get(f"{url}/health").json()
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(texts))))
    seconds = time.perf_counter() - start
    after = httpx.get(f"{url}/health").json()
    await client.close()
    batches = after["batches"] - before["batches"]
    return {"concurrency": concurrency, "seconds": seconds, "results": results,
            "mean_batch": (after["batched_requests"] - before["batched_requests"]) / max(batches, 1)}


def summarise(run: dict, reference: list[str]) -> dict:
    latencies = sorted(r["latency"] for r in run["results"])
    tokens = sum(r["tokens"] for r in run["results"])
    equal = [r["text"] == ref for r, ref in zip(run["results"], reference, strict=True)]
    return {"concurrency": run["concurrency"], "requests_per_s": len(latencies) / run["seconds"],
            "tokens_per_s": tokens / run["seconds"], "generated_tokens": tokens,
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1,
                                                                          round(0.95 * (len(latencies) - 1)))],
            "equal_to_sequential": sum(equal) / len(equal), "well_formed": all(r["ok"] for r in run["results"]),
            "mean_batch": run["mean_batch"], "seconds": run["seconds"],
            "different": [i for i, same in enumerate(equal) if not same]}


def main() -> int:
    args = arguments()
    wait_for_finished_run(args.model)
    texts = prompts(args)
    process, url = start_server(args)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        print(f"serving {args.model} as '{model}'; {len(texts)} prompts, max_tokens {args.max_tokens}, server "
              f"threads {args.threads}, {args.dtype}{', ignore_eos' if args.ignore_eos else ''}", file=sys.stderr)
        sequential = asyncio.run(send_all(url, model, texts, 1, args.max_tokens, args.ignore_eos))
        reference = [r["text"] for r in sequential["results"]]
        rows = []
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            run = asyncio.run(send_all(url, model, texts, concurrency, args.max_tokens, args.ignore_eos))
            rows.append(summarise(run, reference))
            for i in rows[-1]["different"]:
                print(f"  c{concurrency} prompt {i}: sequential {reference[i]!r} / now {run['results'][i]['text']!r}",
                      file=sys.stderr)
    finally:
        process.terminate()
        process.wait(timeout=30)
    print("| concurrency | requests/s | generated tokens/s | p50 latency s | p95 latency s | equal to sequential "
          "greedy | all well-formed | mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['concurrency']} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} | {row['p50_s']:.2f} "
              f"| {row['p95_s']:.2f} | {row['equal_to_sequential']:.1%} | {'yes' if row['well_formed'] else 'NO'} | "
              f"{row['mean_batch']:.1f} |")
    by_concurrency = {row["concurrency"]: row for row in rows}
    if 1 in by_concurrency and 8 in by_concurrency:
        print(f"generated tokens/s, concurrency 8 over 1: "
              f"{by_concurrency[8]['tokens_per_s'] / by_concurrency[1]['tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": args.threads, "dtype": args.dtype,
                                               "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
                                               "rows": rows,
                                               "sequential": reference}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
