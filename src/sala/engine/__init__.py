"""Serving: engine (scheduler, preallocated caches, runner with CUDA-graph decode, sampling), memory planner,
demo assets, OpenAI-compatible server (``sala.engine.server``) and the end-to-end benchmark."""

from sala.engine.engine import Completion, Engine
from sala.engine.loader import load_model
from sala.engine.planner import MemoryPlan, parse_tokens, plan_memory
from sala.engine.types import (
    EngineConfig,
    EngineError,
    FinishReason,
    MemoryPlanError,
    RequestError,
    RequestOutput,
    SamplingParams,
)

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineError",
    "FinishReason",
    "MemoryPlan",
    "MemoryPlanError",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "load_model",
    "parse_tokens",
    "plan_memory",
]
