"""A small continuous-batching inference engine: plain Python + torch + transformers.

It imports neither ray nor fastapi nor serve_app, so it can be tested and benchmarked alone.
"""

from deployments.engine.async_engine import AsyncLLMEngine
from deployments.engine.config import EngineConfig
from deployments.engine.engine import LLMEngine
from deployments.engine.request import FinishReason, RequestOutput, SamplingParams

__all__ = ["AsyncLLMEngine", "EngineConfig", "FinishReason", "LLMEngine", "RequestOutput", "SamplingParams"]
