"""Fixtures of the integration tier."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.lifecycle_app import app_factory


@pytest.fixture
def make_app(tiny_model_dir: Path) -> Callable[..., Any]:
    """`async with make_app(models, **settings) as app`: see tests/integration/lifecycle_app.py."""
    return app_factory(tiny_model_dir)
