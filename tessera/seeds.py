"""The seed-space layout: which world scene seeds each stage draws from, and how a run's seed is split.

The world is a function of its seed, so disjoint seed ranges mean disjoint scenes. Train-split scene seeds:
- [0, 5e8): pretraining (`PRETRAIN_SEED_OFFSET`),
- [5e8, 9e8): SFT, and the stages that reuse SFT's scenes (ViCO, the router stage) (`SFT_SEED_OFFSET`),
- [9e8, 9.5e8): RL's training queries (`RL_SEED_OFFSET`),
- [9.5e8, ...): the Best-of-N critic's training queries (`CRITIC_SEED_OFFSET`).
The world adds a split's offset to every scene seed (`SPLIT_OFFSETS`): the train split's scenes are the seeds
above, the eval and test splits sit 10⁹ and 2·10⁹ higher, so no training range reaches a held-out scene.

Within a run, the k-th batch / epoch / sample of a run seeded `seed` draws from `sub_seed(seed, k)`.
"""

from __future__ import annotations

SPLIT_OFFSETS = {"train": 0, "eval": 10**9, "test": 2 * 10**9}

PRETRAIN_SEED_OFFSET = 0
SFT_SEED_OFFSET = 500_000_000
RL_SEED_OFFSET = 900_000_000
CRITIC_SEED_OFFSET = 950_000_000

_STRIDE = 1_000_003  # a prime above any count of batches, epochs or samples a run uses


def sub_seed(seed: int, index: int) -> int:
    """The seed of item `index` (a batch, an epoch, a sample) of a run seeded `seed`."""
    return seed * _STRIDE + index
