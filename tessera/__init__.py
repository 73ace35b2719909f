"""Tessera: InternVL3.5 end to end."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device="cpu", dtype=None):
    """Load a checkpoint folder (tessera, official InternVL or transformers layout) as a VisionLanguageModel."""
    # imported on call: `import tessera` (and so every tessera.* import) stays free of torch
    from tessera.model.checkpoint import load_checkpoint

    return load_checkpoint(path, device=device, dtype=dtype)


def __getattr__(name):
    if name == "Pipeline":
        from tessera.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
