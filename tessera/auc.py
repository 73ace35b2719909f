"""Area under the ROC curve: how well scores rank positives above negatives (the critic's and the router's)."""

from __future__ import annotations

import torch


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties count ½; nan without both classes.

    scores [E]; labels [E], bool or 0/1 (> 0.5 is positive)."""
    positive = labels if labels.dtype == torch.bool else labels > 0.5
    pos, neg = scores[positive].float(), scores[~positive].float()
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]  # [P,N]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())
