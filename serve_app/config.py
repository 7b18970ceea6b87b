"""Validation of the application arguments in config/serve.yaml (`applications[].args`)."""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from serve_app.model_settings import AutoscalingSettings, ByteCount, MemoryDevice, ModelSettings
from serve_app.schemas import MODEL_ID_PATTERN
from serve_app.schemas.requests import Duration

__all__ = ["AdapterSettings", "AppSettings", "AutoscalingSettings", "ModelSettings", "PoolSettings", "parse_app_settings"]

MIN_API_KEY_LENGTH = 16
HOST_PATTERN = r"^(\*|(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*|\[?[0-9a-f:.]+\]?)$"
ORIGIN_PATTERN = r"^(\*|https?://[A-Za-z0-9.\-\[\]:]+)$"


class AdapterSettings(BaseModel):
    """A LoRA adapter (PEFT directory: adapter_config.json + adapter_model.safetensors) on a pool's model."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=MODEL_ID_PATTERN)
    base: str = Field(pattern=MODEL_ID_PATTERN, description="The id of a full model of the same pool.")
    path: str = Field(min_length=1)
    autoload: bool = True
    keep_alive: Duration = "5m"


class PoolSettings(BaseModel):
    """One multiplexed deployment: its replicas each hold at most `max_models_per_replica` of the
    catalogue (full `models` and `adapters` on them), loaded on demand, least recently used evicted."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=MODEL_ID_PATTERN)
    models: list[ModelSettings] = Field(min_length=1, description="Full models; their deployment fields are the pool's.")
    adapters: list[AdapterSettings] = Field(default_factory=list)
    adapter_dir: str | None = Field(None, description="Also serve every adapter found here whose base_model_name_or_path is a pool model.")
    max_models_per_replica: int = Field(4, ge=1)
    max_lora_rank: int = Field(16, ge=1, le=256)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSettings | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)

    def all_adapters(self) -> list[AdapterSettings]:
        found = list(self.adapters)
        if self.adapter_dir:
            bases, named = {m.id for m in self.models}, {a.id for a in found}
            root = Path(self.adapter_dir).expanduser()
            for config_file in sorted(root.glob("*/adapter_config.json")) if root.is_dir() else []:
                base = json.loads(config_file.read_text()).get("base_model_name_or_path")
                name = config_file.parent.name
                if base in bases and name not in named and re.fullmatch(MODEL_ID_PATTERN, name):
                    found.append(AdapterSettings(id=name, base=base, path=str(config_file.parent)))
        return found

    def members(self) -> list[ModelSettings]:
        """The catalogue as model settings (adapters: `source` is the directory, `base` is set)."""
        models = [m.model_copy(update={"pool": self.id, "load_on_start": False}) for m in self.models]
        adapters = [
            ModelSettings(id=a.id, source=a.path, base=a.base, pool=self.id, load_on_start=False, autoload=a.autoload, keep_alive=a.keep_alive)
            for a in self.all_adapters()
        ]
        return models + adapters

    def pool_members(self) -> list[Any]:
        """The catalogue as `deployments.pool.PoolMember`s, what a pool replica is built from."""
        from deployments.pool import PoolMember

        return [
            PoolMember(m.id, base=m.base, adapter_path=m.source) if m.base else PoolMember(m.id, config=m.engine_config())
            for m in self.members()
        ]

    @model_validator(mode="after")
    def _bases_in_pool(self) -> "PoolSettings":
        bases = {m.id for m in self.models}
        for adapter in self.adapters:
            if adapter.base not in bases:
                raise ValueError(f"adapter {adapter.id!r}: base {adapter.base!r} is not a model of pool {self.id!r}")
        return self


class AppSettings(BaseModel):
    """The whole application: its models and the router's limits."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelSettings] = Field(default_factory=list, description="Dedicated models: one deployment each.")
    pools: list[PoolSettings] = Field(default_factory=list, description="Multiplexed deployments of many models and adapters.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Bodies over this get 413.")
    status_timeout_s: float = Field(5.0, gt=0, description="How long GET /models waits for a replica.")
    memory_budget: dict[MemoryDevice, ByteCount] = Field(
        default_factory=dict,
        description="Bytes models may hold per device: 'cpu' (RAM) and 'cuda' (per GPU), e.g. '12GiB'. Unset: cpu = 80% of RAM, cuda = no check.",
    )
    idle_check_interval_s: float = Field(1.0, gt=0, description="How often idle models are looked for.")
    load_progress_interval_s: float = Field(2.0, gt=0, description="SSE comment interval while a request waits for a load.")
    load_timeout_s: float = Field(900.0, gt=0, description="How long /load waits for every replica.")
    request_timeout_s: float = Field(600.0, gt=0, description="Default deadline of a generation request (queued and running); a request's `timeout` overrides it.")
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Bearer keys (also $LLM_SERVE_API_KEY, comma-separated): when any key is set, every route "
        "but /healthz and the chat page's files needs `Authorization: Bearer <key>`.",
    )
    admin_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Keys that alone may POST /load and /unload (also $LLM_SERVE_ADMIN_API_KEY); valid everywhere.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header names answered besides localhost, 127.0.0.1 and [::1] (any port): a name, "
        "an IP, '*.example.com', or '*' for any (turns the DNS-rebinding guard off).",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins whose pages may call the API cross-origin (e.g. 'https://app.example.com', or '*'); "
        "none by default: the chat page is same-origin.",
    )

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _key_shape(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            check_api_key(key.get_secret_value())
        return keys

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        return [_checked(h.strip().lower(), HOST_PATTERN, "a host name, an IP, '*.domain' or '*'") for h in hosts]

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        return [_checked(o.strip().rstrip("/"), ORIGIN_PATTERN, "'*' or scheme://host[:port]") for o in origins]

    def budget_bytes(self, device: str) -> int | None:
        """The memory budget of a device kind, in bytes (None: not checked)."""
        if device in self.memory_budget:
            return int(self.memory_budget[device])  # type: ignore[index]
        if device == "cpu":
            import psutil

            return int(psutil.virtual_memory().total * 0.8)
        return None

    @cached_property
    def members(self) -> list[ModelSettings]:
        """Every servable model id: dedicated models, then each pool's catalogue."""
        return self.models + [m for pool in self.pools for m in pool.members()]

    @model_validator(mode="after")
    def _unique_ids(self) -> "AppSettings":
        if not self.models and not self.pools:
            raise ValueError("configure at least one model (models or pools)")
        if any(m.pool or m.base for m in self.models):
            raise ValueError("pool and base are set by `pools`, not on dedicated models")
        ids = [m.id for m in self.members] + [p.id for p in self.pools]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {duplicates}")
        return self


def check_api_key(key: str) -> None:
    """Refuse a guessable or unsendable key; the message never shows the key."""
    if len(key) < MIN_API_KEY_LENGTH or not (key.isascii() and key.isprintable()) or " " in key:
        raise ValueError(f"an API key must be at least {MIN_API_KEY_LENGTH} printable ASCII characters without spaces")


def _checked(value: str, pattern: str, what: str) -> str:
    if not re.fullmatch(pattern, value):
        raise ValueError(f"{value!r} is not {what}")
    return value


def parse_app_settings(args: dict[str, Any]) -> AppSettings:
    """Validate the app args; a bad config fails with a message naming each bad field."""
    try:
        return AppSettings.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise ValueError(f"invalid application config: {problems}") from None


def _problem(err: Any) -> str:
    """'loc: message', plus the value given where pydantic's message does not show it (never a key)."""
    where = ".".join(str(p) for p in err["loc"]) or "<root>"
    value = err.get("input")
    shown = err["type"] == "value_error" or "api_keys" in where or not isinstance(value, (str, int, float))
    return f"{where}: {err['msg']}" + ("" if shown else f" (got {repr(value)[:80]})")
