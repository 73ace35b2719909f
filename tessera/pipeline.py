"""`Pipeline`: image + question in, answer out, for scripts and the `chat` command.

It strings together the seams in order — image → tiles → (routing) → features → prompt → generate — and does no
arithmetic of its own: token counts come from the model's encoder, the template from `tessera.chat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tessera.engine import SamplingParams, generate
from tessera.image import ImageProcessor, load_image
from tessera.routing import RoutingPolicy, encode_routed, route_tiles


@dataclass
class Answer:
    text: str  # the whole generated text (think block included)
    final: str  # the answer after the think block
    visual_tokens: int
    tiles: int
    compressed_tiles: int = 0
    token_ids: list[int] = field(default_factory=list)


class Pipeline:
    def __init__(self, model, max_pixels: int | None = None):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(
                "the model has no tokenizer; load it with tessera.load(checkpoint_dir)"
            )
        self.model = model.eval()
        self.processor = ImageProcessor.from_config(
            model.config, **({"max_pixels": max_pixels} if max_pixels else {})
        )

    @torch.inference_mode()
    def chat(
        self,
        image,
        question: str,
        thinking: bool = False,
        routing: str = "full",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Answer:
        tok = self.model.tokenizer
        features, image_tokens, tiles, compressed = None, [], 0, 0
        if image is not None:
            batch = self.processor([load_image(image)])
            # ViT once, router only when the policy needs it, then only the chosen branch per tile
            features, decision = encode_routed(
                self.model,
                batch.pixel_values,
                batch.tiles_per_image,
                RoutingPolicy.parse(routing, **({"seed": seed} if seed is not None else {})),
                questions=[question],
            )
            image_tokens = decision.image_tokens
            tiles = len(decision.tokens_per_tile)
            compressed = decision.compressed_tiles
        ids = tok.build_prompt(question, image_tokens, thinking=thinking)
        sampling = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_ids=frozenset([tok.im_end_id]),
        )
        [out] = generate(self.model, [ids], features, sampling).tokens
        text = tok.decode(out)
        return Answer(
            text=text,
            final=tok.final_answer(text),
            visual_tokens=sum(image_tokens),
            tiles=tiles,
            compressed_tiles=compressed,
            token_ids=list(out),
        )

    def route(self, pixel_values: torch.Tensor, tiles_per_image: list[int], routing: str):
        """Per-tile compress flags for a routing policy (None = every tile at full resolution)."""
        if routing == "full":
            return None
        return route_tiles(self.model, pixel_values, tiles_per_image, routing)
