"""Helper for test_train_ddp: `ddp OUT` (under torchrun) or `single OUT` (one process, accumulating the
batches both ranks would see). Writes OUT/result.json with the losses and a parameter checksum per rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_train import config, make_fake, save_weights, small_model

from tessera.train.stage import LanguageModelingStage
from tessera.train.trainer import Trainer


class BothRanks(LanguageModelingStage):
    """One process seeing, per step, rank 0's batch then rank 1's batch of a 2-process run."""

    def batches(self, position, rank, world):
        a = super().batches(position, 0, 2)
        b = super().batches(position, 1, 2)
        while True:
            yield next(a)
            yield next(b)


def main(mode: str, out: Path) -> None:
    cls = LanguageModelingStage if mode == "ddp" else BothRanks
    stage = cls("sft", make_fake, rows=2, row_tokens=80, pad_id=0, workers=0)
    cfg = config(steps=3, accum_steps=1 if mode == "ddp" else 2, grad_clip=0)
    model = small_model()
    result = Trainer(model, stage, cfg, out, save_model=save_weights).fit()
    checksum = torch.tensor(
        [float(sum(p.double().sum() for p in model.parameters()))], dtype=torch.float64
    )
    sums = (
        [checksum.clone() for _ in range(dist.get_world_size())]
        if dist.is_initialized()
        else [checksum]
    )
    if dist.is_initialized():
        dist.all_gather(sums, checksum)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / "result.json").write_text(
            json.dumps(
                {
                    "losses": [r["loss"] for r in result.history],
                    "rank_checksums": [float(s) for s in sums],
                }
            )
        )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
