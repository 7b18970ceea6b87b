"""Test tiers by folder (auto-marked) and the shared tiny-model fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from serve_app import ray_env
from tests import prepare

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Read by Ray at import (loopback, Serve's throughput mode): serve_app/ray_env.py.
ray_env.apply()

TIERS = ("unit", "integration", "browser", "e2e")


def tier_of(item: pytest.Item) -> int:
    parts = Path(str(item.fspath)).parts
    return next((i for i, tier in enumerate(TIERS) if tier in parts), len(TIERS))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier, and run the tiers fastest first with e2e last: the e2e tier's
    Ray instance lives until the session ends, and nothing after it may see a connected Ray."""
    for item in items:
        index = tier_of(item)
        if index < len(TIERS):
            item.add_marker(getattr(pytest.mark, TIERS[index]))
    items.sort(key=tier_of)  # stable: file and test order kept within a tier


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start making the heavy artefacts the collected tests need, on idle CPU (tests/prepare.py)."""
    if session.config.option.collectonly:
        return
    files = {Path(str(item.fspath)).name for item in session.items}
    jobs = set()
    if "test_gptq.py" in files and importlib.util.find_spec("gptqmodel") is not None:
        jobs.add("gptq")  # it converts SmolLM2 first (perf.make_gptq.fp32_checkpoint)
    if "test_quality.py" in files:
        jobs |= {"smollm2", "gemma"}
    prepare.start(sorted(jobs, key=prepare.JOBS.index))


def pytest_sessionfinish(session: pytest.Session) -> None:
    prepare.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What passing tests recorded with `record_property("summary", text)` (e.g. how many inputs
    schemathesis tried), in the run's summary: pytest captures their output."""
    lines = [str(value) for report in terminalreporter.getreports("passed") for name, value in report.user_properties if name == "summary"]
    if lines:
        terminalreporter.write_sep("-", "recorded by tests")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model without a chat template (like a base model)."""
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-base"), "llama", with_chat_template=False)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny architecture with no native model code (the generic adapter serves it)."""
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")
