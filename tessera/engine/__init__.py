"""The generation engine: slot KV cache, sampling, continuous batching over prompt embeddings."""

from tessera.engine.engine import Engine, EngineFull, EngineStats, GenerationRequest, TokenEvent
from tessera.engine.sampling import SamplingParams

__all__ = ["Engine", "EngineFull", "EngineStats", "GenerationRequest", "SamplingParams", "TokenEvent"]
