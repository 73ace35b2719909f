"""Dense grounding targets (tessera.world.grounding_targets) and their loss (tessera.train.grounding_losses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.config import preset
from tessera.image import ImageProcessor
from tessera.model.connector import pixel_shuffle
from tessera.train.grounding_losses import GroundingHead, grounding_loss, token_targets
from tessera.world import make_sample
from tessera.world.grounding_targets import FIELDS, IGNORE, cell_targets, tile_targets
from tessera.world.scenes import COLOURS, DOC_KEYS, SHAPES

GLYPH0, GLYPH1, OBJECT, ANCHOR, COLUMN, ROW = range(len(FIELDS))


def digits(cells: np.ndarray, y: int, x: int) -> str:
    return "".join(str(c - 1) for c in cells[y, x, :2] if 1 <= c <= 10)


@pytest.mark.parametrize("seed", range(6))
def test_cell_targets_name_every_label_entry_and_shape(seed):
    scene = make_sample(seed, "document", difficulty=1.0).scene
    cells = cell_targets(scene)
    assert cells.shape == (scene.rows * 8, scene.cols * 8, len(FIELDS))
    for s in scene.shapes:
        lx, ly = s.label_cell
        assert digits(cells, ly, lx) == s.label
        block = cells[s.y : s.y + s.size, s.x : s.x + s.size, OBJECT]
        assert (
            block == 1 + SHAPES.index(s.kind) * len(COLOURS) + list(COLOURS).index(s.colour)
        ).all()
    assert int(cells[..., ANCHOR].sum()) == len(scene.shapes)
    doc = scene.document
    for i, (key, code) in enumerate(zip(doc.keys, doc.codes)):
        cx, cy = doc.cell(i)
        assert cells[cy, cx, GLYPH0] == 11 + DOC_KEYS.index(
            key
        )  # the mark, then the code in the next 3 slots
        assert digits(cells, cy, cx) + digits(cells, cy, cx + 1) == code


def test_glyph_targets_sit_where_the_ink_is():
    """Every slot with a digit target has dark ink inside its 7×14 px box on the rendered image."""
    sample = make_sample(3, "document", difficulty=1.0)
    pixels = np.asarray(sample.image.convert("L")).astype(int)
    cells = cell_targets(sample.scene)
    ys, xs, ks = np.nonzero((cells[..., :2] >= 1) & (cells[..., :2] <= 10))
    assert len(ys) > 5
    for y, x, k in zip(ys, xs, ks):
        box = pixels[y * 14 : (y + 1) * 14, x * 14 + 7 * k : x * 14 + 7 * (k + 1)]
        assert box.min() < 100


def test_tile_targets_follow_the_processors_tiles_and_the_thumbnail_names_each_shape_once():
    processor = ImageProcessor.from_config(preset("tiny"))
    for seed in range(12):
        sample = make_sample(seed, "label", difficulty=1.0)
        scene = sample.scene
        tiles = tile_targets(scene, thumbnail=scene.cols * scene.rows > 1)
        assert tiles.shape[0] == processor([sample.image]).pixel_values.shape[0]
        cells = cell_targets(scene)
        for t in range(scene.cols * scene.rows):
            ty, tx = divmod(t, scene.cols)
            assert (
                tiles[t][..., :COLUMN]
                == cells[ty * 8 : (ty + 1) * 8, tx * 8 : (tx + 1) * 8, :COLUMN]
            ).all()
        # places: every cell of a whole-canvas view (the thumbnail, or the only tile) says where it is;
        # the tiles of a multi-tile image cannot know which tile they are, so they are not asked
        whole = tiles[-1]
        assert (whole[..., COLUMN] == 1 + np.arange(8)[None, :]).all() and (
            whole[..., ROW] == 1 + np.arange(8)[:, None]
        ).all()
        if scene.cols * scene.rows > 1:
            assert (tiles[:-1][..., COLUMN:] == IGNORE).all()
        if scene.cols * scene.rows > 1:
            thumb = tiles[-1]
            assert (thumb[..., :2] == IGNORE).all()  # glyphs are illegible in the thumbnail
            assert 1 <= int((thumb[..., ANCHOR] == 1).sum()) <= len(scene.shapes)
            w, h = scene.size
            for s in (
                scene.shapes
            ):  # each shape's centre cell names it (unless two centres share the cell)
                tx, ty = int(s.centre[0] * 8 / w), int(s.centre[1] * 8 / h)
                assert thumb[ty, tx, OBJECT] in (
                    IGNORE,
                    1 + SHAPES.index(s.kind) * len(COLOURS) + list(COLOURS).index(s.colour),
                )


def test_token_targets_group_cells_as_pixel_shuffle_groups_patches():
    """Token t's targets are exactly the cells whose patches pixel_shuffle put into token t."""
    cells = torch.arange(2 * 8 * 8 * len(FIELDS)).reshape(2, 8, 8, len(FIELDS))  # every slot unique
    per_token = token_targets(cells, 0.5)  # [2, 16, 4·F]
    assert per_token.shape == (2, 16, 4 * len(FIELDS))
    patch_ids = torch.arange(2 * 64).reshape(2, 8, 8, 1).float()
    grouped = pixel_shuffle(patch_ids, 0.5).reshape(
        2, 16, 4
    )  # [2, 16, 4]: which patches each token holds
    for n in range(2):
        for t in range(16):
            expected = {int(p) % 64 for p in grouped[n, t]}
            got = {int(v) // len(FIELDS) % 64 for v in per_token[n, t]}
            assert got == expected


def test_grounding_head_learns_a_fixed_batch():
    torch.manual_seed(0)
    cells = torch.randint(0, 5, (3, 8, 8, len(FIELDS)))
    cells[2] = IGNORE  # a thumbnail
    features = torch.randn(3 * 16, 32)
    head = GroundingHead(32, 4)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = None
    for _ in range(40):
        loss, metrics = grounding_loss(head, features, cells, 0.5)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first
    assert metrics["ground/glyph0"] > 0.9
    with pytest.raises(ValueError, match="visual tokens"):
        grounding_loss(head, features[:-1], cells, 0.5)


def test_grounding_stage_trains_saves_the_head_and_resumes_exactly(tmp_path, make_world_model):
    from tessera.train import build_stage
    from tessera.train.trainer import TrainConfig, Trainer

    data = {"rows": 2, "row_tokens": 384, "workers": 0, "grounding": 1.0, "curriculum": [[0, 1.0]]}
    cfg = TrainConfig(
        steps=4,
        lr=1e-3,
        warmup_steps=1,
        log_every=1,
        save_every=2,
        progress=False,
        threads=1,
        precision="fp32",
    )

    def run(out, **kw):
        model = make_world_model()
        return Trainer(model, build_stage("pretrain", model, data), cfg, out).fit(**kw)

    full = run(tmp_path / "a")
    assert {"ground/loss", "ground_patch/loss", "ground/object", "ground_patch/object"} <= set(
        full.history[0]
    )
    run(tmp_path / "b", stop_after=2)
    resumed = run(tmp_path / "b")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history[2:]]
    # the head lives in the trainer state, never in the model's checkpoint
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "final" / "model.safetensors"), "pt") as f:
        assert all(k.split(".")[0] in {"vision_model", "mlp1", "language_model"} for k in f.keys())
    assert "extra" in torch.load(
        tmp_path / "b" / "checkpoints" / "step-000004" / "trainer.pt", weights_only=False
    )


def test_evidence_points_at_the_visual_token_that_shows_the_answer(make_world_model):
    """For document and label answers, the evidence key is the 1/4 token whose cells hold the answer's digits."""
    from tessera.train.data import Curriculum, WorldStream, collate

    model = make_world_model()
    tok = model.tokenizer
    for family in ("document", "label"):
        stream = WorldStream(
            tok,
            model.config,
            families={family: 1.0},
            curriculum=Curriculum(((0, 1.0),)),
            grounding=True,
        )
        for i in range(8):
            e = stream(i)
            (entry,) = e.evidence  # one answered turn, one group, one token of evidence
            queries, (keys,) = entry.queries, entry.keys
            answer = [tok.decode([e.input_ids[q + 1]]) for q in queries]
            assert "".join(answer).isdigit()
            batch = collate([[e]], tok.pad_id)
            slots = token_targets(batch.grounding, 0.5).reshape(-1, 4 * len(FIELDS))  # [ΣT, 4·F]
            ordinal = [p for p, t in enumerate(e.input_ids) if t == tok.img_context_id].index(
                keys[0]
            )
            shown = [
                int(c) - 1
                for f, c in enumerate(slots[ordinal])
                if f % len(FIELDS) < 2 and 1 <= c <= 10
            ]
            assert "".join(answer) in "".join(
                map(str, shown)
            )  # the token holds the answer digits in order


def fit_one_batch(model, stage, batch, metric: str, steps: int, lr: float) -> list[float]:
    """Adam on the model and the stage's heads, `steps` times on one batch; the metric before each step."""
    params = list(model.parameters()) + (
        list(stage.extra.parameters()) if stage.extra is not None else []
    )
    opt = torch.optim.Adam(params, lr=lr)
    values = []
    for _ in range(steps):
        loss, metrics = stage.loss(model, batch, stage.weight(batch))
        values.append(metrics[metric])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return values


def test_evidence_attention_loss_pulls_the_head_onto_the_evidence(make_world_model):
    from tessera.train import build_stage

    torch.manual_seed(0)
    model = make_world_model()
    stage = build_stage(
        "sft",
        model,
        {
            "rows": 1,
            "row_tokens": 512,
            "workers": 0,
            "evidence_attention": 1.0,
            "families": {"document": 1.0},
            "curriculum": [[0, 1.0]],
        },
    )
    batch, _ = next(stage.batches(0, 0, 1))
    assert batch.evidence and batch.grounding is not None
    masses = fit_one_batch(model, stage, batch, "evidence_attention", steps=5, lr=1e-3)
    assert masses[-1] > 3 * masses[0]


def test_spatial_evidence_is_two_groups_read_from_the_whole_canvas_view(make_world_model):
    """A spatial answer compares two objects' places: one evidence group per object, its tokens on the view that
    shows the whole canvas — the thumbnail's tokens at its cells in a multi-tile image (tile tokens cannot know
    which tile they are in), the only tile's tokens in a one-tile image."""
    from tessera.train.data import Curriculum, WorldStream
    from tessera.world.grounding_targets import (
        place_of_cells,
        thumbnail_token_of_cell,
        token_of_cell,
    )

    model = make_world_model()
    tok, per_tile = model.tokenizer, model.config.tokens_per_tile
    stream = WorldStream(
        tok,
        model.config,
        families={"spatial": 1.0},
        curriculum=Curriculum(((0, 1.0),)),
        grounding=True,
    )
    seen = {"one tile": 0, "thumbnail": 0}
    for i in range(16):
        s, _ = stream.sample(i)
        (entry,) = stream(i).evidence
        queries, groups, places = entry.queries, entry.keys, entry.places
        assert len(groups) == 2 and len(queries) == 1  # one answer word, one group per object
        # the place probe's targets: each object's cell on the whole-canvas view, ordered as the answer says
        assert places == [place_of_cells(s.scene, cells) for cells in s.meta["lookup"]["cells"]]
        axis = 0 if "left" in s.question else 1
        first, second = places[0][axis], places[1][axis]
        assert first <= second if s.answer in ("left", "above") else first >= second
        positions = [p for p, t in enumerate(stream(i).input_ids) if t == tok.img_context_id]
        tiles = s.scene.cols * s.scene.rows
        for cells, keys in zip(s.meta["lookup"]["cells"], groups):
            ordinals = {positions.index(k) for k in keys}
            if tiles == 1:
                assert ordinals == {token_of_cell(s.scene, x, y, per_tile) for x, y in cells}
                seen["one tile"] += 1
            else:
                assert ordinals == {
                    thumbnail_token_of_cell(s.scene, x, y, per_tile) for x, y in cells
                }
                assert all(o >= tiles * per_tile for o in ordinals)
                seen["thumbnail"] += 1
    assert all(seen.values()), seen


def test_each_supervised_head_is_pulled_onto_its_own_group():
    """Head i of the evidence heads looks up group i (mod the groups): the loss of a head on the wrong group is
    what the gradient lowers, and swapping the groups changes it."""
    from tessera.model.llm import Qwen3Attention
    from tessera.train.data import Evidence
    from tessera.train.grounding_losses import evidence_attention_loss

    torch.manual_seed(0)
    attn = Qwen3Attention(preset("tiny").language, 0)
    T, D = 12, preset("tiny").language.hidden_size
    x = torch.randn(1, T, D)
    cos, sin = torch.ones(1, T, attn.head_dim), torch.zeros(1, T, attn.head_dim)
    a, b = [2, 3], [6]
    both, _ = evidence_attention_loss(
        attn, x, cos, sin, None, [Evidence([10, 11], [a, b])], heads=(0, 2)
    )
    head0_a, _ = evidence_attention_loss(
        attn, x, cos, sin, None, [Evidence([10, 11], [a])], heads=(0,)
    )
    head2_b, _ = evidence_attention_loss(
        attn, x, cos, sin, None, [Evidence([10, 11], [b])], heads=(2,)
    )
    assert torch.allclose(both, (head0_a + head2_b) / 2)
    swapped, _ = evidence_attention_loss(
        attn, x, cos, sin, None, [Evidence([10, 11], [b, a])], heads=(0, 2)
    )
    assert not torch.allclose(both, swapped)
    with pytest.raises(ValueError, match="evidence heads"):
        evidence_attention_loss(attn, x, cos, sin, None, [Evidence([10], [a])], heads=(7,))


def test_question_words_name_each_evidence_group_in_order(make_world_model):
    """Each group's naming words are found in its own turn's question, in the order the question names them
    (a spatial question naming two yellow shapes still gets each its own 'yellow')."""
    from tessera.train.data import Curriculum, WorldStream

    model = make_world_model()
    tok = model.tokenizer
    families = {
        "colour": 1.0,
        "shape": 1.0,
        "label": 1.0,
        "document": 1.0,
        "spatial": 1.0,
        "count": 1.0,
    }
    stream = WorldStream(
        tok,
        model.config,
        families=families,
        curriculum=Curriculum(((0, 1.0),)),
        grounding=True,
        turns=4,
    )
    seen = 0
    for i in range(6):
        _, turns, _, _, lookups = stream.conversation(i)
        e = stream(i)
        answered = [
            (q, lookup.names)
            for (q, _, _), lookup in zip(turns, lookups)
            if any(lookup.cells) or lookup.counted
        ]
        assert len(e.evidence) == len(answered)
        for entry, (question, names) in zip(e.evidence, answered):
            queries, words = entry.queries, entry.words
            spelled = [
                " ".join(tok.decode([e.input_ids[p]]).strip() for p in group) for group in words
            ]
            assert spelled == [" ".join(n) for n in names]
            for group in (
                words
            ):  # inside this turn's question: after the last image token, before the answer
                assert all(p < queries[0] for p in group)
            assert all(" ".join(n) in question for n in names)
            seen += 1
    assert seen >= 12


def test_question_attention_is_a_second_loss_one_layer_below(make_world_model):
    from tessera.train.data import Curriculum, WorldStream, collate
    from tessera.train.stage import packed_lm_loss

    torch.manual_seed(0)
    model = make_world_model()
    stream = WorldStream(
        model.tokenizer,
        model.config,
        families={"colour": 1.0, "spatial": 1.0},
        curriculum=Curriculum(((0, 1.0),)),
        grounding=True,
        turns=2,
    )
    batch = collate([[stream(0)], [stream(1)]], model.tokenizer.pad_id)
    base, metrics = packed_lm_loss(model, batch, evidence_attention=1.0)
    assert "question_attention" not in metrics
    both, metrics = packed_lm_loss(
        model, batch, evidence_attention=1.0, question_attention=1.0, evidence_heads=(0, 2)
    )
    assert 0 < metrics["question_attention"] < 1 and both > base
    model.zero_grad()  # the question loss alone (the two forwards are the same computation, so CE cancels)
    (
        packed_lm_loss(model, batch, question_attention=1.0)[0] - packed_lm_loss(model, batch)[0]
    ).backward()
    layers = model.language_model.model.layers
    middle = len(layers) // 2
    assert layers[middle - 1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[middle].self_attn.q_proj.weight.grad.abs().sum() == 0


def test_chain_evidence_grounds_each_number_a_thinking_chain_reads(make_world_model):
    """With `chain_evidence`, a thinking turn gives one entry per number its chain reads off the image: the
    positions that write that number, pointed at its own group's tokens (the label's cell, the counted shapes).
    Without it, thinking turns give nothing."""
    from tessera.train.data import Curriculum, WorldStream
    from tessera.world.grounding_targets import token_of_cell

    model = make_world_model()
    tok, per_tile = model.tokenizer, model.config.tokens_per_tile
    stream = WorldStream(
        tok,
        model.config,
        families={"reasoning": 1.0},
        curriculum=Curriculum(((0, 1.0),)),
        grounding=True,
        thinking_prob=1.0,
        chain_evidence=True,
    )
    for i in range(6):
        s, thinking = stream.sample(i)
        assert thinking
        e = stream(i)
        reads = s.meta["lookup"]["chain"]
        assert len(e.evidence) == len(reads) == 2
        positions = [p for p, t in enumerate(e.input_ids) if t == tok.img_context_id]
        label_x, label_y = s.meta["lookup"]["cells"][0][0]
        for entry, (text, group) in zip(e.evidence, reads):
            queries, (keys,) = entry.queries, entry.keys
            assert "".join(tok.decode([e.input_ids[q + 1]]) for q in queries).strip() == text
            if group == 0:  # the first number is always the named shape's label
                assert keys == [positions[token_of_cell(s.scene, label_x, label_y, per_tile)]]
    stream.chain_evidence = False
    assert stream(0).evidence == []


def test_place_loss_is_the_cross_entropy_of_each_objects_column_and_row():
    """One spatial entry (two objects) and one entry without places: the loss is the mean cross-entropy over the
    four (object, axis) slots of the spatial answer's position; the other entry adds nothing."""
    from tessera.train.data import Evidence
    from tessera.train.grounding_losses import PlaceHead, place_loss

    torch.manual_seed(0)
    head = PlaceHead(16)
    hidden = torch.randn(1, 6, 16)
    places = [(1, 6), (5, 0)]
    loss, metrics = place_loss(
        head, hidden, [Evidence([4], [[1], [2]], [[]], places), Evidence([3], [[1]])]
    )
    logits = head(hidden[0, [4]])[0]  # [2 objects, 2 axes, 8]
    targets = torch.tensor(places)  # [2 objects, 2 axes]
    assert torch.allclose(
        loss, torch.nn.functional.cross_entropy(logits.reshape(4, 8), targets.reshape(4))
    )
    assert metrics["place/acc"] == float((logits.argmax(-1) == targets).float().mean())
    zero, none = place_loss(head, hidden, [Evidence([3], [[1]])])
    assert float(zero) == 0.0 and none == {}
    with pytest.raises(ValueError, match="compares 3"):
        place_loss(head, hidden, [Evidence([4], [[1], [2], [3]], [[]], [(0, 0)] * 3)])


@pytest.mark.parametrize("probe, family", [("place", "spatial"), ("count", "count")])
def test_probes_train_what_the_middle_heads_fetch(probe, family, make_world_model):
    """With a place (count) weight the sft stage carries the probe; its loss reaches the middle layer's value
    projection (the probe reads the heads' outputs before o_proj) and a few steps on one batch lower it."""
    from tessera.train import build_stage

    torch.manual_seed(0)
    model = make_world_model()
    stage = build_stage(
        "sft",
        model,
        {
            "rows": 1,
            "row_tokens": 512,
            "workers": 0,
            probe: 1.0,
            "turns": 3,
            "count_sink": probe == "count",
            "repeat": [family],
            "families": {family: 1.0},
            "curriculum": [[0, 1.0]],
        },
    )
    assert getattr(stage.extra, probe) is not None
    batch, _ = next(stage.batches(0, 0, 1))
    loss, _ = stage.loss(model, batch, stage.weight(batch))
    loss.backward()
    value = model.language_model.model.layers[
        len(model.language_model.model.layers) // 2
    ].self_attn.v_proj
    assert value.weight.grad is not None and float(value.weight.grad.abs().sum()) > 0
    losses = fit_one_batch(model, stage, batch, f"{probe}/loss", steps=6, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0]


def test_count_loss_is_the_cross_entropy_of_how_many_things_were_counted():
    """Entries with a sink are read as counts (the number of counted keys, 0 included); others add nothing."""
    from tessera.train.data import Evidence
    from tessera.train.grounding_losses import CountHead, count_loss

    torch.manual_seed(0)
    head = CountHead(16)
    hidden = torch.randn(2, 6, 16)
    entries = [
        Evidence([4, 5], [[1, 2, 3]], sink=0),
        Evidence([3], [[]], sink=0, row=1),
        Evidence([2], [[1]]),
    ]
    loss, metrics = count_loss(head, hidden, entries)
    logits = head(torch.stack([hidden[0, 4], hidden[0, 5], hidden[1, 3]]))  # [3, MAX_COUNT + 1]
    targets = torch.tensor([3, 3, 0])
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, targets))
    assert metrics["count/acc"] == float((logits.argmax(-1) == targets).float().mean())
    zero, none = count_loss(head, hidden, [Evidence([2], [[1]])])
    assert float(zero) == 0.0 and none == {}
    with pytest.raises(ValueError, match="counts 7"):
        count_loss(head, hidden, [Evidence([5], [list(range(7))], sink=0)])


def test_count_evidence_is_one_token_per_counted_shape_and_the_sink(make_world_model):
    """A count answer's evidence: the 1/4 token holding each counted shape's top-left cell (distinct tokens, one
    per shape, whatever its size), and the sample's first token as the sink; an answer of 0 has the sink alone."""
    from tessera.train.data import Curriculum, WorldStream
    from tessera.world.grounding_targets import token_of_cell

    model = make_world_model()
    tok, per_tile = model.tokenizer, model.config.tokens_per_tile
    stream = WorldStream(
        tok,
        model.config,
        families={"count": 1.0},
        curriculum=Curriculum(((0, 1.0),)),
        grounding=True,
        count_sink=True,
    )
    answers = set()
    for i in range(40):
        s, _ = stream.sample(i)
        e = stream(i)
        (entry,) = e.evidence
        (keys,) = entry.keys
        assert entry.sink == 0 and len(keys) == len(set(keys)) == int(s.answer)
        positions = [p for p, t in enumerate(e.input_ids) if t == tok.img_context_id]
        ((group, anchors),) = s.meta["lookup"]["counted"]
        assert group == 0
        assert sorted(keys) == sorted(
            positions[token_of_cell(s.scene, x, y, per_tile)] for x, y in anchors
        )
        answers.add(int(s.answer))
        stream.count_sink = (
            False  # without it, counts are looked up as before: every token of every thing
        )
        if int(s.answer) == 0:
            assert stream(i).evidence == []
        else:
            (plain,) = stream(i).evidence
            assert plain.sink is None and set(keys) <= set(plain.keys[0])
        stream.count_sink = True
    assert 0 in answers and max(answers) >= 3, answers


def test_counting_loss_is_the_kl_to_an_even_share_for_the_sink_and_each_thing():
    """With a sink, every supervised head is scored by KL(uniform over the sink and the counted tokens ‖ its
    attention), computed here by hand from the same scores; without things, all the mass belongs on the sink."""
    import math

    from tessera.model.llm import Qwen3Attention
    from tessera.train.data import Evidence
    from tessera.train.grounding_losses import evidence_attention_loss

    torch.manual_seed(0)
    attn = Qwen3Attention(preset("tiny").language, 0)
    T, D = 12, preset("tiny").language.hidden_size
    x = torch.randn(1, T, D)
    cos, sin = torch.ones(1, T, attn.head_dim), torch.zeros(1, T, attn.head_dim)
    things, queries, heads = [3, 5, 8], [10, 11], (0, 2)
    loss, metrics = evidence_attention_loss(
        attn, x, cos, sin, None, [Evidence(queries, [things], sink=0)], heads=heads
    )
    with torch.no_grad():
        group = attn.num_heads // attn.num_kv_heads
        expected, mass = 0.0, 0.0
        for h in heads:
            q = attn.q_norm(
                attn.q_proj(x[0]).view(T, attn.num_heads, attn.head_dim)[:, h]
            )  # [T, hd]
            k = attn.k_norm(
                attn.k_proj(x[0]).view(T, attn.num_kv_heads, attn.head_dim)[:, h // group]
            )  # [T, hd]
            for p in queries:
                logp = torch.log_softmax(q[p] @ k[: p + 1].T / attn.head_dim**0.5, -1)  # [p + 1]
                targets = [0] + things
                expected += float(-logp[targets].mean() - math.log(len(targets)))
                mass += float(logp[targets].exp().sum())
    assert loss.item() == pytest.approx(expected / len(heads) / len(queries), rel=1e-5)
    assert metrics["evidence_attention"] == pytest.approx(
        mass / len(heads) / len(queries), rel=1e-5
    )
    nothing, _ = evidence_attention_loss(
        attn, x, cos, sin, None, [Evidence(queries, [[]], sink=0)], heads=heads
    )
    assert nothing > 0 and torch.isfinite(nothing)


def test_the_count_probe_needs_counting_answers(make_world_model):
    from tessera.train import build_stage

    model = make_world_model()
    with pytest.raises(ValueError, match="count_sink"):
        build_stage("sft", model, {"rows": 1, "row_tokens": 512, "workers": 0, "count": 1.0})
