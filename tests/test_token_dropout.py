"""Context dropout of the v2 training recipe (`training.token_dropout`): it only ever hides tokens the
asked questions do not need, and a masked forward is exactly the forward of the pruned sequence (compact positions
for LLaVA, original M-RoPE ids for Qwen2.5-VL)."""

from __future__ import annotations

import random

import pytest
import torch

from tokenzip.synthetic import sample
from tokenzip.synthetic.conversations import extra_questions
from tokenzip.synthetic.questions import Question
from tokenzip.synthetic.scenes import Obj, Scene
from tokenzip.synthetic.truth import needed, raster
from training.token_dropout import MAX_TURNS, context_plan, dropout_mask, unneeded_cells


@pytest.mark.parametrize("index", range(0, 30, 4))
@pytest.mark.parametrize("side", [6, 12, 24])
def test_unneeded_cells_hold_no_pixel_of_what_the_questions_need(index, side):
    s = sample("train", index, version="v2")
    questions = [s.question, *extra_questions(random.Random(index), s.scene)][:3]
    things = [t for q in questions for t in needed(s.scene, q)]
    free = unneeded_cells(s.scene, questions, side, side).view(side, side)
    step = 240 // side
    for thing in things:
        drawn = raster([thing]).view(side, step, side, step).any(3).any(1)  # cells holding a pixel of it
        assert drawn.any() and not (free & drawn).any()
    assert torch.equal(free, ~raster(things).view(side, step, side, step).any(3).any(1))  # all others are free


def test_a_question_that_needs_nothing_frees_every_cell():
    scene = Scene(objects=(Obj("circle", "red", "large", 0.5, 0.5),), style="v2")
    absent = Question("exists", "Is there a blue square ?", "no")
    assert unneeded_cells(scene, [absent], 12, 12).all()
    assert not unneeded_cells(scene, [Question("color", "What color is the circle ?", "red")], 12, 12).all()


def test_plan_is_seeded_and_bounded():
    plan = context_plan(200, 0.5, torch.Generator().manual_seed(1))
    assert plan == context_plan(200, 0.5, torch.Generator().manual_seed(1))
    chosen = [p for p in plan if p is not None]
    assert 60 < len(chosen) < 140
    assert {k for k, _ in chosen} == set(range(1, MAX_TURNS + 1)) and all(0 <= f <= 1 for _, f in chosen)
    everything = sum(f == 1 for _, f in chosen)
    assert 0.3 * len(chosen) < everything < 0.7 * len(chosen)  # half leave only what is needed
    assert context_plan(5, 0.0, torch.Generator()) == [None] * 5
    with pytest.raises(ValueError, match=r"share must be in \[0, 1\], got 1.5"):
        context_plan(1, 1.5, torch.Generator())


def test_dropout_hides_only_unneeded_visual_tokens():
    items = [sample("train", i, version="v2") for i in range(16)]
    questions = [[s.question] for s in items]
    plan = [None, *((1, f / 15) for f in range(1, 16))]
    mask = torch.ones(16, 160, dtype=torch.long)
    mask[3, 150:] = 0  # right padding stays as it is
    grids = [[(torch.arange(5, 149), 12, 12)] for _ in items]
    out = dropout_mask(mask, grids, [s.scene for s in items], questions, plan, torch.Generator().manual_seed(0))
    dropped = (mask == 1) & (out == 0)
    assert not (out > mask).any() and not dropped[0].any()  # the unplanned sample keeps everything
    assert not dropped[:, :5].any() and not dropped[:, 149:].any()  # text tokens are never hidden
    for b, s in enumerate(items):
        free = unneeded_cells(s.scene, questions[b], 12, 12)
        assert not dropped[b, 5:149][~free].any()
        if b:
            assert int(dropped[b].sum()) == round(plan[b][1] * int(free.sum()))


def test_a_planned_conversation_asks_only_its_first_questions():
    from tokenzip.synthetic.conversations import ASSISTANT_MARKER
    from training.architectures import build
    from training.train import TrainConfig, training_batch

    _, processor = build("llava", 0, "v2")
    cfg = TrainConfig(data_version="v2", extra_turns=6)
    batch = training_batch(processor, "llava", [0, 1, 2], cfg, plan=[(2, 0.5), None, (1, 0.0)])
    assert [len(q) for q in batch["questions"]] == [2, 7, 1]
    marker = processor.tokenizer.convert_tokens_to_ids(ASSISTANT_MARKER["llava"])
    assert (batch["input_ids"] == marker).sum(1).tolist() == [2, 7, 1]


def test_masked_forward_with_compact_positions_is_the_pruned_forward():
    """What the training step computes for a dropped-out sample equals what the LLM computes on the sequence with
    those tokens removed and renumbered, as the compact pre-LLM runtime feeds it (LLaVA)."""
    from training.architectures import build
    from training.token_dropout import position_ids

    torch.manual_seed(0)
    model, _ = build("llava", 0, "v2")
    model.eval()
    lm = model.model.language_model
    embeds = torch.randn(1, 40, lm.config.hidden_size)
    mask = torch.ones(1, 40, dtype=torch.long)
    mask[0, torch.tensor([3, 4, 9, 17, 18, 19, 30])] = 0
    positions = position_ids(model, {}, mask)
    with torch.no_grad():
        masked = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        kept = mask[0].bool()
        pruned = lm(inputs_embeds=embeds[:, kept]).last_hidden_state
    torch.testing.assert_close(masked[:, kept], pruned, rtol=1e-5, atol=1e-5)


def test_teacher_ignores_masked_keys():
    """The attention teacher scores the attention the forward really computes: masked keys get no mass."""
    from training.architectures import build
    from training.attention_teacher import AttentionTeacher

    torch.manual_seed(0)
    model, _ = build("llava", 0, "v2")
    teacher = AttentionTeacher(model, 1)
    lm = model.model.language_model
    lm(inputs_embeds=torch.randn(1, 12, lm.config.hidden_size))
    query = torch.tensor([[0, 11]])
    targets = torch.zeros(1, 12, dtype=torch.bool)
    targets[0, 4] = True
    everything = torch.ones(1, 12, dtype=torch.bool)
    assert torch.equal(teacher.loss(query, targets, everything), teacher.loss(query, targets))
    hidden = everything.clone()
    hidden[0, 4] = False
    assert torch.isinf(teacher.loss(query, targets, hidden))  # the only target is masked: no mass can reach it
    others = everything.clone()
    others[0, :4] = False
    assert teacher.loss(query, targets, others) < teacher.loss(query, targets)  # fewer keys compete
    teacher.remove()


def test_qwen_masked_forward_keeps_the_mrope_ids_of_the_pruned_forward():
    """Qwen2.5-VL: the ids `position_ids` gives are the model's own, and a masked forward with them equals the
    LLM's forward on the kept tokens with their original M-RoPE ids gathered, as the runtime feeds them."""
    from training.architectures import build
    from training.token_dropout import position_ids
    from training.train import TrainConfig, training_batch, visual_grids

    torch.manual_seed(0)
    model, processor = build("qwen2_5_vl", 0, "v2")
    model.eval()
    batch = training_batch(processor, "qwen2_5_vl", [0], TrainConfig(family="qwen2_5_vl", data_version="v2"))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "scenes", "questions")}
    captured = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        own = model(**inputs).logits
        ids = position_ids(model, batch, batch["attention_mask"])
        torch.testing.assert_close(model(**inputs, position_ids=ids).logits, own, rtol=0, atol=0)
        hook.remove()
        embeds = captured["inputs_embeds"]
        mask = batch["attention_mask"].clone()
        positions = visual_grids(model, "qwen2_5_vl", batch["input_ids"][0])[0][0]
        mask[0, positions[::3]] = 0
        masked = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=ids).last_hidden_state
        kept = mask[0].bool()
        pruned = lm(inputs_embeds=embeds[:, kept], position_ids=ids[..., kept]).last_hidden_state
    torch.testing.assert_close(masked[:, kept], pruned, rtol=1e-5, atol=1e-5)
