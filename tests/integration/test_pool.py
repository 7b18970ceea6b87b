"""A pool replica's holding logic without Ray (deployments/pool.py): adapters and their base share
one engine and its steps, bad adapters fail alone with their reason, eviction frees slots and an
unused base."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from deployments.engine import EngineConfig
from deployments.engine.lora import LoRAManager
from deployments.errors import ModelNotLoadedError
from deployments.pool import PoolMember, PoolServer
from deployments.protocol import GenerateRequest
from tests.tiny_models import save_lora_adapter

GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def catalogue(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[PoolMember]:
    root = tmp_path_factory.mktemp("pool-adapters")
    good = {name: save_lora_adapter(tiny_model_dir, root / name, seed) for seed, name in enumerate(["a", "b", "c"], 1)}
    high_rank = save_lora_adapter(tiny_model_dir, root / "rank16", 9, rank=16)
    pickled = shutil.copytree(good["a"], root / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    paths = good | {"rank16": high_rank, "pickled": pickled, "missing": root / "nowhere"}
    base = PoolMember("base", config=EngineConfig(model=str(tiny_model_dir), weights="fp32", max_num_seqs=4, max_model_len=128))
    return [base] + [PoolMember(name, base="base", adapter_path=str(path)) for name, path in paths.items()]


async def generate(pool: PoolServer, model_id: str, prompt: str = "The quick brown fox") -> list[int]:
    tokens: list[int] = []
    async for chunk in pool.generate_for(model_id, GenerateRequest("", dict(GREEDY), prompt=prompt)):
        tokens.extend(chunk.token_ids)
    return tokens


async def test_adapters_and_their_base_share_engine_steps(catalogue: list[PoolMember], monkeypatch: pytest.MonkeyPatch) -> None:
    pool = PoolServer("p", catalogue, max_models_per_replica=4, max_lora_rank=8)
    alone = {m: await generate(pool, m) for m in ("base", "a", "b")}
    assert len({tuple(t) for t in alone.values()}) == 3  # each adapter changes the output
    mixed_steps = []
    original = LoRAManager.set_batch

    def record(self: LoRAManager, token_slots: list[int] | None) -> None:
        if token_slots is not None and len(set(token_slots)) > 1:
            mixed_steps.append(sorted(set(token_slots)))
        original(self, token_slots)

    monkeypatch.setattr(LoRAManager, "set_batch", record)
    together = await asyncio.gather(*(generate(pool, m) for m in ("base", "a", "b")))
    assert dict(zip(("base", "a", "b"), together)) == alone  # same tokens, batched together
    assert any(len(slots) == 3 for slots in mixed_steps)  # base (-1) and two adapter slots in one step
    assert len(pool.servers) == 1  # one base engine serves all three
    await pool.evict("base")
    await pool.evict("a")
    await pool.evict("b")


@pytest.mark.parametrize("bad, reason", [
    ("rank16", "rank 16 is over this server's max_lora_rank of 8"),
    ("pickled", "pickle"),
    ("missing", "no adapter_config.json"),
])
async def test_a_bad_adapter_fails_with_its_reason_and_touches_nothing_else(catalogue: list[PoolMember], bad: str, reason: str) -> None:
    pool = PoolServer("p", catalogue, max_models_per_replica=4, max_lora_rank=8)
    before = await generate(pool, "a")
    with pytest.raises(ModelNotLoadedError, match=reason) as failure:
        await generate(pool, bad)
    assert failure.value.code == "model_load_failed" and failure.value.status_code == 409
    assert reason in pool.status()["errors"][bad] and bad not in pool.resident
    assert await generate(pool, "a") == before and "a" in pool.resident  # the neighbour kept serving
    await pool.evict("a")
    assert pool.servers == {}


async def test_eviction_frees_the_slot_and_an_unused_base(catalogue: list[PoolMember]) -> None:
    pool = PoolServer("p", catalogue, max_models_per_replica=2, max_lora_rank=8)
    for name in ("a", "b"):
        await generate(pool, name)
    server = pool.servers["base"]
    core = server.engine.engine  # type: ignore[union-attr]
    assert core.stats()["num_adapters"] == 2 and core.adapters.num_slots == 3  # max_models_per_replica + 1
    slot = core.adapters.slot_of["a"]
    await pool.evict("a")
    assert core.stats()["num_adapters"] == 1
    lora = core.runner.lora
    assert lora is not None
    R = lora.max_rank
    assert all(float(layer.lora_b[slot * R : (slot + 1) * R].abs().sum()) == 0 for layer in lora.layers)  # the slot was cleared
    await generate(pool, "c")  # takes the freed slot
    assert core.adapters.slot_of["c"] == slot
    await pool.evict("b")
    await pool.evict("c")
    assert pool.servers == {} and server.engine is None  # the base went with its last adapter
    assert pool.status()["num_loads"] == 3 and pool.status()["num_evictions"] == 3
