"""One small interface for auxiliary losses: SFT on any data is the paper's loss; a recipe plugs in
aids."""

from dataclasses import dataclass

import torch

from tessera.train.aux_losses import AuxiliaryLoss, ForwardView, world_aids
from tessera.train.sft import SFTData, build_stage
from tessera.train.stage import packed_lm_loss


@dataclass
class FeatureNorm:
    """A made-up aid: the mean squared norm of the projected visual features."""

    weight: float
    name: str = "feature_norm"

    def attach(self, model, batch) -> list:
        return []

    def __call__(self, model, batch, view: ForwardView):
        value = view.features.pow(2).sum(-1).mean()
        return value, {"feature_norm": float(value.detach())}


def test_a_stage_on_files_is_plain_sft_and_takes_a_plugged_in_aid(tiny, tmp_path, write_dataset):
    data = write_dataset(tmp_path / "ds", 6)
    stage = build_stage(
        tiny, SFTData(data=str(data), rows=2, row_tokens=256, workers=0, shuffle=False)
    )
    assert (
        stage.aux == () and stage.extra is None
    )  # next-token loss with square averaging, nothing else
    batch, _ = next(stage.batches(0, 0, 1))
    base, _ = stage.loss(tiny, batch, 2 * batch.weight_sum)
    aid = FeatureNorm(0.25)
    assert isinstance(aid, AuxiliaryLoss)
    stage.aux = (aid,)
    both, metrics = stage.loss(tiny, batch, 2 * batch.weight_sum)
    # weight × loss × the batch's share of the step (here half)
    assert torch.allclose(both, base + 0.25 * 0.5 * metrics["feature_norm"], rtol=1e-6)
    assert torch.allclose(packed_lm_loss(tiny, batch, 2 * batch.weight_sum, aux=(aid,))[0], both)


def test_the_world_recipe_builds_its_aids_in_order(tiny):
    data = SFTData(
        grounding=0.5,
        evidence_attention=0.3,
        question_attention=0.2,
        place=0.4,
        count=0.6,
        count_sink=True,
        workers=0,
    )
    stage = build_stage(tiny, data)
    assert [a.name for a in stage.aux] == [
        "evidence_attention",
        "question_attention",
        "place",
        "count",
        "grounding",
    ]
    assert [a.weight for a in stage.aux] == [0.3, 0.2, 0.4, 0.6, 0.5]
    assert stage.aux[2].module is stage.extra.place and stage.aux[4].module is stage.extra
    assert world_aids() == []
