"""The synchronous engine: `add_request`, `step`, `abort`. One step = schedule, run, update, output."""

from __future__ import annotations

import torch

from deployments.engine.block_manager import BlockManager
from deployments.engine.config import EngineConfig
from deployments.engine.detokenizer import IncrementalDetokenizer
from deployments.engine.adapter_loader import AdapterError, LoRAWeights
from deployments.engine.lanes import LaneSet, lanes_apply
from deployments.engine.lora import AdapterSlots
from deployments.engine.request import FinishReason, InvalidRequestError, RequestOutput, SamplingParams, Sequence
from deployments.engine.runner import ModelRunner
from deployments.engine.sampler import Sampler
from deployments.engine.scheduler import Scheduler


class LLMEngine:
    """Continuous batching over one model. Drive it from one thread (`step()` runs every lane in turn), or
    with lanes (engine/lanes.py) call `step(lane)` from one thread per lane; `add_request` and `abort` may
    then come from lane 0's thread between its steps."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.tokenizer = self.runner.tokenizer
        limit = self.runner.max_position_embeddings
        self.max_model_len = min(config.max_model_len, limit) if limit else config.max_model_len
        self.eos_token_ids = self._find_eos_token_ids()
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size, config.enable_prefix_caching)
        schedulers = [
            Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, self.eos_token_ids)
            for _ in range(2 if lanes_apply(self.runner) else 1)
        ]
        self.lanes = LaneSet(schedulers, torch.get_num_threads())
        self.scheduler = schedulers[0]  # lane 0 admits every request
        self.sampler = Sampler(self.eos_token_ids)
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.adapters = AdapterSlots(config.max_loras)
        self.adapter_salts: dict[str, bytes] = {}
        self._adapter_loads = 0

    # --- requests in -------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids for a plain prompt or for chat messages rendered by the model's chat template."""
        if messages is not None:
            if not self.has_chat_template:
                raise InvalidRequestError(
                    "this model has no chat template; use a completion (prompt) request, "
                    "or give the model a chat_template in the config",
                    param="messages",
                )
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            token_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            token_ids = self.tokenizer(prompt or "")["input_ids"]
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", param="messages" if messages is not None else "prompt")
        return list(token_ids)

    def resolve_max_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        """The completion length: as asked, else the configured default capped by the context left."""
        if requested is not None:
            return requested
        return max(1, min(self.config.default_max_tokens, self.max_model_len - num_prompt_tokens))

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise `InvalidRequestError` (naming the numbers) if the request cannot fit the context."""
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{len(prompt_token_ids)} prompt tokens + {params.max_tokens} max_tokens = {total} were requested",
                param="max_tokens",
            )
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if total > capacity:
            raise InvalidRequestError(
                f"{len(prompt_token_ids)} prompt tokens + {params.max_tokens} max_tokens = {total} exceed the KV cache "
                f"of {capacity} tokens (kv_cache_bytes); ask for fewer tokens",
                param="max_tokens",
            )

    def stats(self) -> dict[str, int]:
        """KV-cache use and scheduling counters, for /models and the benchmarks."""
        bm, schedulers = self.block_manager, self.lanes.schedulers
        return {
            "block_size": bm.block_size, "num_blocks": bm.num_blocks, "num_used_blocks": bm.num_used_blocks,
            "num_free_blocks": bm.num_free_blocks, "kv_cache_bytes": self.runner.kv_cache_bytes,
            "prefix_cache_queries": bm.num_prefix_queries, "prefix_cache_hits": bm.num_prefix_hits,
            "num_preemptions": sum(s.num_preemptions for s in schedulers),
            "num_running": self.lanes.num_running(),
            "num_waiting": sum(len(s.waiting) for s in schedulers),
            "adapter_slots": self.adapters.num_slots, "num_adapters": len(self.adapters.slot_of),
            "num_lanes": self.lanes.num_lanes, "lane_steps": self.lanes.num_split_steps,  # engine/lanes.py
        }

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits [T, vocab] of one token sequence (quality gates); idle engine only."""
        if self.has_unfinished():
            raise RuntimeError("score() needs an idle engine")
        torch.set_num_threads(self.lanes.threads)  # a prompt's rows over every thread, whatever a lane left
        logits = self.runner.score(token_ids)
        self.block_manager.reset_prefix_cache()  # the blocks it wrote no longer hold what they hashed
        return logits

    def warm_up(self) -> None:
        """Run one tiny request: weights loaded from safetensors are memory-mapped and paged in on
        first use, so this makes them resident (and measurable) before real traffic arrives."""
        self.add_request("warm-up", self.encode("Hello"), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        while self.has_unfinished():
            self.step()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None = None) -> None:
        self.validate(prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params)
        detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop)
        with self.lanes.lock:  # the other lane may be releasing an adapter or taking sequences meanwhile
            if adapter is not None:
                seq.lora_slot = self.adapters.acquire(adapter)
                seq.adapter, seq.cache_salt = adapter, self.adapter_salts[adapter]
            self.detokenizers[request_id] = detokenizer
            self.sampler.add(seq)
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        with self.lanes.lock:
            seq = self.lanes.abort(request_id)
            if seq is None:
                return None
            self._free({request_id})
            self._release_adapter(seq)
        return RequestOutput(request_id, [], "", FinishReason.ABORT, seq.num_prompt_tokens, seq.num_output_tokens)

    # --- LoRA adapters -----------------------------------------------------------------------
    def add_adapter(self, weights: LoRAWeights) -> None:
        """Put an adapter in a free slot (a retiring one of the same name is kept instead)."""
        with self.lanes.lock:  # a slot no running sequence uses: the lanes' steps may run meanwhile
            self._add_adapter(weights)

    def _add_adapter(self, weights: LoRAWeights) -> None:
        if self.runner.lora is None:
            raise AdapterError(f"adapter {weights.name!r}: this engine has no adapter slots (max_loras: 0)")
        if weights.name in self.adapters.slot_of:
            self.adapters.retiring.discard(weights.name)
            return
        slot = self.adapters.free_slot()
        if slot is None:
            raise AdapterError(f"adapter {weights.name!r}: all {self.adapters.num_slots} adapter slots are in use")
        self.runner.lora.write(slot, weights)  # checks every shape before writing
        self.adapters.slot_of[weights.name] = slot
        self._adapter_loads += 1
        self.adapter_salts[weights.name] = f"adapter:{weights.name}#{self._adapter_loads}".encode()

    def remove_adapter(self, name: str) -> None:
        """Free its slot now, or (while sequences use it) retire it until the last one ends."""
        with self.lanes.lock:
            if name not in self.adapters.slot_of:
                return
            if self.adapters.in_use.get(name):
                self.adapters.retiring.add(name)
                return
            self._clear_adapter(name)

    def _clear_adapter(self, name: str) -> None:
        slot = self.adapters.slot_of.pop(name)
        self.adapters.retiring.discard(name)
        self.adapter_salts.pop(name, None)
        if self.runner.lora is not None:
            self.runner.lora.write(slot, None)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter is not None and self.adapters.release(seq.adapter):
            self._clear_adapter(seq.adapter)
        seq.adapter, seq.lora_slot = None, -1

    def has_unfinished(self) -> bool:
        return self.lanes.num_unfinished() > 0

    # --- one iteration -----------------------------------------------------------------------
    def step(self, lane: int | None = None) -> list[RequestOutput]:
        """One step of `lane`; without one, a step of every lane in turn on the calling thread."""
        if lane is None:
            return [output for k in range(self.lanes.num_lanes) if k == 0 or self.lanes.has_work(k) for output in self.step(k)]
        lanes = self.lanes
        with lanes.lock:  # the bookkeeping; the forward pass and sampling run outside it
            scheduler = lanes.begin(lane)
            scheduler_output = scheduler.schedule()
            lanes.scheduled(lane, scheduler_output)
        if scheduler_output.is_empty:
            return []
        logits = self.runner.execute(scheduler_output)
        sampling = [scheduler_output.seqs[i] for i in scheduler_output.sample_indices]
        sampled = self.sampler(logits, sampling) if sampling else []
        with lanes.lock:
            updated = scheduler.update_from_output(scheduler_output, sampled)
            outputs = self._process_outputs(updated, scheduler)
            lanes.end(lane)
        return outputs

    def _process_outputs(self, seqs: list[Sequence], scheduler: Scheduler) -> list[RequestOutput]:
        outputs, finished = [], set()
        for seq in seqs:
            token_id = seq.last_token_id
            detokenizer = self.detokenizers[seq.request_id]
            ended_by_eos = seq.finish_reason is FinishReason.STOP  # the scheduler only stops on EOS
            if not ended_by_eos and detokenizer.push(token_id):
                scheduler.finish(seq, FinishReason.STOP)
            text = detokenizer.pop_delta(finished=seq.is_finished)
            outputs.append(
                RequestOutput(
                    seq.request_id, [token_id], text, seq.finish_reason, seq.num_prompt_tokens, seq.num_output_tokens
                )
            )
            if seq.is_finished:
                finished.add(seq.request_id)
                self._release_adapter(seq)
        self._free(finished)
        return outputs

    def _free(self, request_ids: set[str]) -> None:
        if not request_ids:
            return
        for request_id in request_ids:
            self.sampler.free(request_id)
            self.detokenizers.pop(request_id, None)

    def _find_eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        generation_eos = getattr(self.runner.generation_config, "eos_token_id", None)
        for value in (generation_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(value)
        return ids

    def release(self) -> None:
        """Free the weights and caches; the engine is unusable afterwards."""
        self.runner.release()
        self.detokenizers.clear()
