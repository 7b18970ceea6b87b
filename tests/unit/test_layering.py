"""The engine (and the model server class) stay free of Ray, FastAPI and the router."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("ray", "fastapi", "starlette", "serve_app")


def imported_forbidden(module: str) -> list[str]:
    code = (
        f"import sys, {module}; "
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_engine_imports_no_ray_fastapi_or_serve_app() -> None:
    assert imported_forbidden("deployments.engine") == []


def test_model_server_class_imports_no_ray_or_fastapi() -> None:
    assert imported_forbidden("deployments.server") == []


def test_the_check_itself_sees_an_import() -> None:
    assert "fastapi" in imported_forbidden("fastapi")
