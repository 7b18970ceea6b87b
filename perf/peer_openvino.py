"""OpenVINO GenAI side of perf/bench_peer.py; runs in OpenVINO's own venv (perf/.venv-openvino), not ours.

Reads {"gguf", "prompts_1", "prompts_10", "concurrency", "output_len"} as JSON on stdin and prints one JSON
object on stdout: per point, one record per request (perf_counter seconds of start, end and of every token
batch, token counts). In process, no HTTP: 1 stream through `LLMPipeline(gguf, "CPU")` with a token streamer,
N streams through `ContinuousBatchingPipeline` (add_request / step / GenerationHandle.read), closed loop.
Prompts are tokenized by the pipeline's own tokenizer with no chat template (as /v1/completions does).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import openvino_genai as og


def generation_config(output_len: int) -> og.GenerationConfig:
    """Greedy, exactly output_len new tokens (EOS ignored)."""
    config = og.GenerationConfig()
    config.max_new_tokens = output_len
    config.min_new_tokens = output_len
    config.ignore_eos = True
    config.do_sample = False
    config.apply_chat_template = False
    return config


def new_record() -> dict[str, Any]:
    return {"start": time.perf_counter(), "end": 0.0, "chunk_times": [], "chunk_tokens": [], "completion_tokens": 0}


def add_chunk(record: dict[str, Any], num_tokens: int) -> None:
    record["chunk_times"].append(time.perf_counter())
    record["chunk_tokens"].append(num_tokens)
    record["completion_tokens"] += num_tokens


class TokenTimer(og.StreamerBase):
    """Times every write (one token, or a list of them) of a single-stream generate()."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__()
        self.record = record

    def write(self, token: int | list[int]) -> og.StreamingStatus:
        add_chunk(self.record, len(token) if isinstance(token, list) else 1)
        return og.StreamingStatus.RUNNING

    def end(self) -> None:
        pass


def single_stream(gguf: str, prompts: list[str], output_len: int) -> tuple[list[dict[str, Any]], float]:
    """Requests one after another through LLMPipeline; returns the records and the load time."""
    t0 = time.perf_counter()
    pipe = og.LLMPipeline(gguf, "CPU")
    load_s = time.perf_counter() - t0
    tokenizer = pipe.get_tokenizer()
    pipe.generate(tokenizer.encode(prompts[0]), generation_config(4))  # warm-up
    records = []
    for prompt in prompts:
        record = new_record()
        pipe.generate(tokenizer.encode(prompt), generation_config(output_len), TokenTimer(record))
        record["end"] = time.perf_counter()
        records.append(record)
    return records, load_s


def drain(handle: og.GenerationHandle, record: dict[str, Any]) -> bool:
    """Read what a handle produced since the last read; True once the request is over."""
    if handle.can_read():
        num_tokens = sum(len(out.generated_ids) for out in handle.read().values())
        if num_tokens:
            add_chunk(record, num_tokens)
    return handle.get_status() != og.GenerationStatus.RUNNING and not handle.can_read()


def batched_pipeline(gguf: str, concurrency: int) -> og.ContinuousBatchingPipeline:
    scheduler = og.SchedulerConfig()
    scheduler.max_num_seqs = concurrency
    scheduler.cache_size = 1  # GB of KV cache: plenty for 10 x (prompt + 128)
    return og.ContinuousBatchingPipeline(gguf, scheduler, "CPU")


def batched(gguf: str, prompts: list[str], concurrency: int, output_len: int,
            pipe: og.ContinuousBatchingPipeline | None = None) -> list[dict[str, Any]]:
    """Closed loop through ContinuousBatchingPipeline: at most `concurrency` requests in flight."""
    pipe = pipe or batched_pipeline(gguf, concurrency)
    tokenizer, config = pipe.get_tokenizer(), generation_config(output_len)
    warm = pipe.add_request(10**6, tokenizer.encode(prompts[0]).input_ids, generation_config(4))
    while pipe.has_non_finished_requests():
        pipe.step()
    warm.read_all()
    queue, records, live = list(enumerate(prompts)), [], {}
    while queue or live:
        while queue and len(live) < concurrency:
            i, prompt = queue.pop(0)
            record = new_record()
            live[i] = (pipe.add_request(i, tokenizer.encode(prompt).input_ids, config), record)
            records.append(record)
        pipe.step()
        for i, (handle, record) in list(live.items()):
            if drain(handle, record):
                record["end"] = time.perf_counter()
                del live[i]
    return records


def serve_turns(gguf: str, concurrency: int) -> None:
    """perf/bench_interleave.py's worker: one pipeline kept loaded; per stdin line {"prompts", "output_len"},
    one closed-loop point, its records as one JSON line on stdout."""
    pipe = batched_pipeline(gguf, concurrency)
    print(json.dumps({"ready": og.get_version()}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps(batched(gguf, job["prompts"], concurrency, job["output_len"], pipe)), flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:  # python peer_openvino.py --serve GGUF CONCURRENCY
        serve_turns(sys.argv[2], int(sys.argv[3]))
        return
    job = json.load(sys.stdin)
    gguf, output_len = job["gguf"], job["output_len"]
    result: dict[str, Any] = {"openvino_genai": og.get_version(), "points": {}}
    try:
        if job["prompts_1"]:
            result["points"]["1"], result["load_s"] = single_stream(gguf, job["prompts_1"], output_len)
        if job["prompts_10"]:
            result["points"][str(job["concurrency"])] = batched(gguf, job["prompts_10"], job["concurrency"], output_len)
    except RuntimeError as exc:  # the GGUF reader's own errors are long C++ traces: keep their last line
        sys.exit(f"OpenVINO GenAI {og.get_version()} failed on {gguf}: {str(exc).strip().splitlines()[-1]} "
                 "(its GGUF reader documents the llama, qwen2 and qwen3 architectures, Q4_0/Q4_1/Q8_0 weights best)")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
