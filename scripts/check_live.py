"""Check a running service (make serve) end to end and print what it saw.

Every endpoint on every model, chat on models with a template, N concurrent streams per model
(each must receive tokens while the others run), and an unload/load cycle with memory figures.
Usage: python scripts/check_live.py [--url http://127.0.0.1:8000] [--streams 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests


def models(url: str) -> dict[str, dict]:
    return {m["id"]: m for m in requests.get(f"{url}/models", timeout=30).json()["data"]}


def sse_texts(response: requests.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True) if line.startswith("data: {")]


def check_endpoints(url: str, model: dict) -> None:
    mid, prompt = model["id"], "The capital of France is"
    body = {"model": mid, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    whole = requests.post(f"{url}/infer", json=body, timeout=120).json()
    with requests.post(f"{url}/infer?stream=true", json=body, stream=True, timeout=120) as r:
        streamed = "".join(e["text"] for e in sse_texts(r))
    assert streamed == whole["text"], (streamed, whole["text"])
    comp = requests.post(f"{url}/v1/completions", json=body, timeout=120).json()
    print(f"  {mid}: /infer {whole['text']!r} (stream identical), /v1/completions {comp['choices'][0]['text']!r}")
    chat = {"model": mid, "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24, "temperature": 0}
    r = requests.post(f"{url}/v1/chat/completions", json=chat, timeout=120)
    if models(url)[mid]["has_chat_template"]:  # known once loaded (the /infer above loads a lazy model)
        print(f"  {mid}: /v1/chat/completions {r.json()['choices'][0]['message']['content']!r}")
    else:
        print(f"  {mid}: /v1/chat/completions -> {r.status_code} {r.json()['error']['message']!r}")


def check_concurrent_streams(url: str, mid: str, n: int) -> None:
    barrier = threading.Barrier(n)
    body = {"model": mid, "prompt": "Write a story about a lighthouse keeper.", "max_tokens": 32, "ignore_eos": True}

    def one(_: int) -> tuple[float, float, int]:
        barrier.wait()
        first = last = 0.0
        count = 0
        with requests.post(f"{url}/infer?stream=true", json=body, stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: {"):
                    now = time.monotonic()
                    first, last, count = first or now, now, count + 1
        return first, last, count

    started = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    overlap = max(f for f, _, _ in results) < min(last for _, last, _ in results)
    print(f"  {mid}: {n} streams done in {time.monotonic() - started:.1f}s, events per stream "
          f"{[c for _, _, c in results]}, all received a token before any finished: {overlap}")
    assert overlap


def check_unload_load(url: str, mid: str) -> None:
    before = models(url)[mid]
    after = requests.post(f"{url}/unload", json={"model": mid}, timeout=300).json()
    kv = before.get("kv_cache") or {}
    print(f"  {mid}: loaded resident={before['resident_memory_bytes'] / 2**20:.0f} MiB "
          f"(weights {before['weights_bytes'] / 2**20:.0f} MiB, {before.get('quantization')}; KV cache "
          f"{kv.get('kv_cache_bytes', 0) / 2**20:.0f} MiB in {kv.get('num_blocks')} blocks of {kv.get('block_size')}), "
          f"replica RSS {before['process_rss_bytes'] / 2**20:.0f} MiB")
    print(f"  {mid}: after unload status={after['status']} resident={after['resident_memory_bytes']} "
          f"replica RSS {after['process_rss_bytes'] / 2**20:.0f} MiB")
    t = time.monotonic()
    again = requests.post(f"{url}/load", json={"model": mid}, timeout=600).json()
    answer = requests.post(f"{url}/infer", json={"model": mid, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}, timeout=120).json()
    print(f"  {mid}: reloaded in {time.monotonic() - t:.1f}s status={again['status']} resident={again['resident_memory_bytes'] / 2**20:.0f} MiB, answers {answer['text']!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--streams", type=int, default=10)
    args = parser.parse_args()
    listed = models(args.url)
    print("models:", {k: (m["status"], m["resident_memory_bytes"]) for k, m in listed.items()})
    for mid, m in listed.items():
        print(f"  {mid}: weights {m.get('weights')} ({m.get('weights_reason')}), {m.get('quantization')}, "
              f"{m.get('implementation')}")
    for model in listed.values():
        check_endpoints(args.url, model)
    for mid in listed:
        check_concurrent_streams(args.url, mid, args.streams)
    for mid in listed:
        check_unload_load(args.url, mid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
