"""The generation stack: slot KV cache, one sampler, batched `generate` and continuous-batching `Engine`."""

from tessera.engine.engine import Engine, EngineFull, EngineStats, GenerationRequest, TokenEvent
from tessera.engine.generate import Generation, generate
from tessera.engine.sampling import SamplingParams

__all__ = [
    "Engine",
    "EngineFull",
    "EngineStats",
    "Generation",
    "GenerationRequest",
    "SamplingParams",
    "TokenEvent",
    "generate",
]
