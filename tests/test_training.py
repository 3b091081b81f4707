"""Training of the bundled tiny models: labels, conversations, a few optimisation steps, save and reload."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tokenzip.loading import load_vlm
from tokenzip.synthetic import CATEGORIES, sample
from tokenzip.synthetic.conversations import extra_questions, messages
from tokenzip.synthetic.questions import NUMBER_WORDS
from training.train import ASSISTANT_MARKER, TrainConfig, answer_mask, train, training_batch

FAMILIES = ("llava", "qwen2_5_vl", "llava_onevision")


def test_answer_mask_marks_answer_and_end_token():
    ids = torch.tensor([[5, 9, 1, 2, 7, 9, 3, 2, 0]])  # 9 = marker, 2 = end of turn
    mask = answer_mask(ids, marker_id=9)
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 6, 7]


@pytest.mark.parametrize("index", range(0, 120, 7))
def test_extra_questions_are_answered_by_the_unchanged_scene(index):
    scene = sample("train", index).scene
    for q in extra_questions(random.Random(index), scene):
        objs = scene.objects
        if q.category == "color":
            shape = q.text.split()[-2]
            assert [o.color for o in objs if o.shape == shape] == [q.answer]
        elif q.category == "shape":
            color = q.text.split()[-3]
            assert [o.shape for o in objs if o.color == color] == [q.answer]
        elif q.category == "count":
            shape = q.text.split()[2][:-1]
            assert NUMBER_WORDS[sum(o.shape == shape for o in objs)] == q.answer
        elif q.category == "exists":
            color, shape = q.text.split()[3:5]
            assert any(o.color == color and o.shape == shape for o in objs) == (q.answer == "yes")
        elif q.category == "position":
            words = q.text.split()
            a = next(o for o in objs if o.color == words[2] and o.shape == words[3])
            b = next(o for o in objs if o.color == words[-3] and o.shape == words[-2])
            assert ("left" if a.x < b.x else "right") == q.answer
        else:
            assert q.category == "ocr" and q.answer == scene.glyph.char.lower()


@pytest.mark.parametrize("family", FAMILIES)
def test_training_batch_labels_exactly_the_answers(family):
    from training.architectures import build

    torch.manual_seed(0)
    _, processor = build(family)
    cfg = TrainConfig(family=family, extra_turns=3)
    batch = training_batch(processor, family, [0, 1], cfg)
    tok = processor.tokenizer
    end = "</s>" if family == "llava" else "<|im_end|>"
    for b, i in enumerate([0, 1]):
        labels = batch["labels"][b]
        words = tok.convert_ids_to_tokens(labels[labels != -100].tolist())
        own = sample("train", i, version=cfg.data_version).question
        assert words[:2] == [own.answer, end]  # the sample's own question comes first
        assert words[1::2] == [end] * (len(words) // 2)
        assert len(words) // 2 >= 2
    assert ASSISTANT_MARKER[family] in tok.get_vocab()
    # the first turn is the evaluation prompt, verbatim
    first = sample("train", 0, version=cfg.data_version).question
    prompt = processor.apply_chat_template(messages([first])[:1], add_generation_prompt=True)
    ids = tok(prompt)["input_ids"]
    full = batch["input_ids"][0][batch["input_ids"][0] != processor.tokenizer.pad_token_id].tolist()
    image_id = tok.convert_tokens_to_ids("<image>" if family != "qwen2_5_vl" else "<|image_pad|>")
    collapsed = [t for k, t in enumerate(full) if t != image_id or (k > 0 and full[k - 1] != image_id)]
    assert collapsed[: len(ids)] == ids


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_train_save_and_reload(tmp_path, family):
    cfg = TrainConfig(
        family=family, max_steps=3, vision_max_steps=2, batch_size=2, extra_turns=2, warmup=1, eval_samples=0, lr=1e-3
    )
    model, processor, report = train(cfg, out=tmp_path, verbose=False, test_samples=6)
    assert report["steps"] == 3 and len(report["losses"]) == 3
    assert report["vision_steps"] == 2 and set(report["vision_phase"][-1]) >= {"shape", "glyph", "column"}
    assert all(torch.isfinite(torch.tensor(report["losses"])))
    saved = json.loads((tmp_path / "training.json").read_text())
    assert set(saved["test_accuracy"]) == {*CATEGORIES, "all"}
    assert (tmp_path / "model.safetensors").stat().st_size < 8e6  # float16 on disk
    loaded, loaded_processor = load_vlm(tmp_path, dtype="float32")
    assert loaded.dtype == torch.float32
    saved_params = dict(loaded.named_parameters())
    for name, param in model.named_parameters():  # weights are the trained ones rounded to float16
        assert torch.equal(saved_params[name], param.detach().to(torch.float16).to(torch.float32)), name
    probe = sample("test", 3)
    text = loaded_processor.apply_chat_template(messages([probe.question])[:1], add_generation_prompt=True)
    reference = processor.apply_chat_template(messages([probe.question])[:1], add_generation_prompt=True)
    assert text == reference
    new = loaded_processor(images=[probe.image()], text=[text], return_tensors="pt")
    old = processor(images=[probe.image()], text=[text], return_tensors="pt")
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


def test_missing_bundled_model_says_how_to_train_it():
    from tokenzip import assets

    with pytest.raises(ValueError, match="synth-llava"):
        assets.path("llava-7b")
    for name, family in assets.FAMILY_OF.items():
        if name not in assets.names():
            with pytest.raises(FileNotFoundError, match=f"--family {family}"):
                assets.path(name)
        else:
            assert (assets.path(name) / "config.json").is_file()


@pytest.mark.parametrize(("family", "trainable"), [("llava", {"encoder.layers.3."}), ("qwen2_5_vl", {"blocks.3."})])
def test_the_qa_phase_freezes_the_tower_but_its_last_feeding_layer(family, trainable):
    """LLaVA takes features from layer -2 of 5: layer 3 (0-based) is the last one feeding them; layer 4 is unused."""
    from training.architectures import build
    from training.vision_phase import tower_parameters

    model, _ = build(family)
    tower = model.model.vision_tower if family == "llava" else model.model.visual
    frozen = {id(p) for p in tower_parameters(model, 1)}
    names = {n for n, p in tower.named_parameters() if id(p) not in frozen}
    prefixes = {
        ".".join(n.split(".")[:3]) + "." if n.startswith("encoder") else ".".join(n.split(".")[:2]) + "." for n in names
    }
    expected = trainable | ({"merger.ln_q.", "merger.mlp."} if family == "qwen2_5_vl" else set())
    assert prefixes == expected
    assert len(tower_parameters(model, 0)) == len(frozen) + len([n for n in names if not n.startswith("merger.")])


@pytest.mark.parametrize("index", range(0, 60, 7))
def test_centre_labels_mark_one_cell_per_object(index):
    from training.dense import _SHAPE_INDEX, cell_labels, centre_cells

    scene = sample("train", index).scene
    labels = cell_labels(scene, 12, 12)
    assert labels.shape == (5, 144)
    centre = labels[4]
    assert int((centre > 0).sum()) == len(scene.objects)  # objects never share a centre cell (they do not overlap)
    assert torch.equal(centre > 0, centre_cells(list(scene.objects), 12, 12))
    for obj in scene.objects:
        cell = int(obj.y * 12) * 12 + int(obj.x * 12)
        assert centre[cell] == _SHAPE_INDEX[obj.shape]


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_targets_point_at_the_named_objects(family):
    from training.architectures import build
    from training.train import attention_targets, attribute_word_ids, named_objects, visual_grids

    model, processor = build(family)
    cfg = TrainConfig(family=family)
    batch = training_batch(processor, family, list(range(6)), cfg)
    marker = processor.tokenizer.convert_tokens_to_ids(ASSISTANT_MARKER[family])
    [(nq, nk)], (aq, ak), (pq, pk) = attention_targets(
        model, family, batch, marker, attribute_word_ids(processor.tokenizer)
    )
    ids = batch["input_ids"]
    image = ids == model.config.image_token_id
    grids = [visual_grids(model, family, ids[b]) for b in range(ids.shape[0])]
    per_grid = sum(rows * cols for _, rows, cols in grids[0])
    assert sum(positions.numel() for positions, _, _ in grids[0]) == per_grid <= int(image[0].sum())
    turns = [(b, q) for b, qs in enumerate(batch["questions"]) for q in qs]
    # supervised: every question naming something visible, and every count question (zero objects included)
    taught = [(b, q) for b, q in turns if q.category == "count" or any(named_objects(batch["scenes"][b], q))]
    positional = [(b, q) for b, q in taught if q.category == "position"]
    assert len(aq) == len(taught) and len(pq) == len(positional) > 0
    assert (ak.sum(1) == 1).all() and (pk.sum(1) == 1).all()  # one word each
    assert (
        pk.float().argmax(1) > ak[[i for i, (_, q) in enumerate(taught) if q.category == "position"]].float().argmax(1)
    ).all()
    rows = [
        (b, q, things)
        for b, q in taught
        for things in named_objects(batch["scenes"][b], q)
        if things or q.category == "count"
    ]
    assert len(rows) == len(nq)
    sink = torch.zeros_like(nk)
    sink[:, 0] = True  # right-padded training batches: every sample starts at position 0
    for keys, sinks, (b, q, things) in zip(nk, sink, rows):
        if q.category == "count":  # one centre cell per counted object, per grid, and the sink
            assert keys[0] and not (keys & ~image[b] & ~sinks).any()
            assert int(keys[1:].sum()) <= len(things) * len(grids[b]) and (int(keys[1:].sum()) > 0) == bool(things)
        else:
            assert not (keys & ~image[b]).any()  # nouns look at visual tokens only
            assert int(keys.sum()) >= len(grids[b])


def test_grid_heads_split_the_noun_targets_by_grid():
    """With `per_grid`, OneVision's noun hop becomes one target per grid (base, packed): same queries, keys inside
    that grid (plus the count sink), and together exactly the all-grid keys."""
    from training.architectures import build
    from training.train import GRID_COUNT, attention_targets, attribute_word_ids, visual_grids

    family = "llava_onevision"
    model, processor = build(family)
    batch = training_batch(processor, family, list(range(6)), TrainConfig(family=family))
    marker = processor.tokenizer.convert_tokens_to_ids(ASSISTANT_MARKER[family])
    nouns = attribute_word_ids(processor.tokenizer)
    [(q, joint)], *answers = attention_targets(model, family, batch, marker, nouns)
    split, *split_answers = attention_targets(model, family, batch, marker, nouns, per_grid=True)
    assert len(split) == GRID_COUNT[family] == len(visual_grids(model, family, batch["input_ids"][0])) == 2
    for (a, ak), (b, bk) in zip(answers, split_answers, strict=True):
        assert torch.equal(a, b) and torch.equal(ak, bk)
    sinks = torch.zeros_like(joint)
    sinks[:, 0] = True
    for g, (queries, keys) in enumerate(split):
        assert torch.equal(queries, q)
        inside = torch.zeros_like(keys)
        for row, (b, _) in enumerate(q.tolist()):
            inside[row, visual_grids(model, family, batch["input_ids"][b])[g][0]] = True
        assert not (keys & ~inside & ~sinks).any()
        assert (keys & inside).any(1).float().mean() > 0.5  # most phrases have cells in every grid
    assert torch.equal(split[0][1] | split[1][1], joint)


@pytest.mark.parametrize("family", FAMILIES)
def test_grid_count_matches_the_grids_of_a_training_image(family):
    from training.architectures import build
    from training.train import GRID_COUNT, visual_grids

    model, processor = build(family)
    batch = training_batch(processor, family, [0], TrainConfig(family=family))
    assert len(visual_grids(model, family, batch["input_ids"][0])) == GRID_COUNT[family]


def test_band_x_is_the_scaled_centre_of_each_grid_column():
    from training.dense import COLUMN_BANDS, band_x, cell_labels

    bands = cell_labels(sample("train", 3).scene, 12, 12)[3].view(12, 12)
    centres = 2 * (torch.arange(12, dtype=torch.float32) + 0.5) / 12 - 1
    assert COLUMN_BANDS == 12
    assert torch.allclose(band_x(bands), centres.expand(12, 12))
    assert band_x(torch.tensor([1, COLUMN_BANDS])).tolist() == pytest.approx([-11 / 12, 11 / 12])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_position_probe_targets_follow_the_question(family):
    """Noun rows are naming words of one-object phrases with that object's centre; answer rows are the tokens that
    predict a position answer, the sign of x1 - x2 being the answer."""
    from training.architectures import build
    from training.probes import probe_targets
    from training.train import attribute_word_ids, named_turns

    _, processor = build(family)
    batch = training_batch(processor, family, list(range(8)), TrainConfig(family=family))
    marker = processor.tokenizer.convert_tokens_to_ids(ASSISTANT_MARKER[family])
    nouns = attribute_word_ids(processor.tokenizer)
    turns = list(named_turns(batch, marker, nouns))
    targets = probe_targets(turns)
    ids = batch["input_ids"]
    assert ids[targets.answer_rows[:, 0], targets.answer_rows[:, 1]].eq(marker).all()
    assert ids[targets.noun_rows[:, 0], targets.noun_rows[:, 1]].apply_(lambda t: t in nouns).bool().all()
    counts = {(b, pos): (ends[0], len(phrases[0])) for b, pos, q, ends, phrases in turns if q.category == "count"}
    assert len(counts) > 0 and targets.count_answer_rows.tolist() == [list(k) for k in counts]
    assert targets.count_noun_rows.tolist() == [[b, noun] for (b, _), (noun, _) in counts.items()]
    assert targets.count.tolist() == [n / 2 - 1 for _, n in counts.values()]
    answers = {(b, pos): q.answer for b, pos, q, _, _ in turns if q.category == "position"}
    assert len(targets.answer_rows) == len(answers) > 0
    for (b, pos), dx in zip(targets.answer_rows.tolist(), targets.answer_dx.tolist()):
        assert answers[(b, pos)] == ("left" if dx < 0 else "right")
    singles = {
        (b, noun): 2 * things[0].x - 1
        for b, _, _, ends, phrases in turns
        for noun, things in zip(ends, phrases)
        if len(things) == 1 and hasattr(things[0], "shape")
    }
    assert dict(zip(map(tuple, targets.noun_rows.tolist()), targets.noun_x.tolist())) == pytest.approx(singles)


def _llava_and_two_training_samples():
    """A fresh tiny LLaVA in eval mode and the model inputs of training samples 0 and 1."""
    from training.architectures import build

    model, processor = build("llava")
    model.eval()
    batch = training_batch(processor, "llava", [0, 1], TrainConfig())
    return model, {k: v for k, v in batch.items() if k not in ("scenes", "questions", "labels")}


def test_position_probes_read_the_named_decoder_layers():
    from training.probes import ProbeTargets, ReadoutProbes

    model, inputs = _llava_and_two_training_samples()
    probes = ReadoutProbes(model, noun_layer=1, answer_layer=3)
    rows = torch.tensor([[0, 5], [1, 9]])
    none = torch.zeros(0, 2, dtype=torch.long)
    targets = ProbeTargets(
        rows, torch.tensor([0.5, -0.25]), rows.flip(0), torch.tensor([1.0, -1.0]), none, none, torch.zeros(0)
    )
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # [k + 1] = output of decoder layer k
        got = probes.loss(targets)
        noun = probes.noun(hidden[2][rows[:, 0], rows[:, 1]]).squeeze(-1)
        flipped = rows.flip(0)
        answer = probes.answer(hidden[4][flipped[:, 0], flipped[:, 1]]).squeeze(-1)
    expected = ((noun - targets.noun_x) ** 2).mean() + ((answer - targets.answer_dx) ** 2).mean()
    assert torch.allclose(got, expected, atol=1e-6)
    probes.remove()
    layers = model.model.language_model.layers
    assert not any(tap.handle.id in layer._forward_hooks for tap in probes._taps for layer in layers)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_answer_word_targets_cover_every_turn_and_one_phrase_naming_words(family):
    """Every assistant turn is an answer-word row with its answer's token id; the naming word of a one-phrase
    question (not a position question) is a noun row with the same id."""
    from training.architectures import build
    from training.probes import probe_targets
    from training.train import attribute_word_ids, named_turns

    _, processor = build(family)
    batch = training_batch(processor, family, list(range(8)), TrainConfig(family=family))
    marker = processor.tokenizer.convert_tokens_to_ids(ASSISTANT_MARKER[family])
    turns = list(named_turns(batch, marker, attribute_word_ids(processor.tokenizer)))
    targets = probe_targets(turns, processor.tokenizer.convert_tokens_to_ids)
    ids = batch["input_ids"]
    assert targets.word_answer_rows.tolist() == (ids == marker).nonzero().tolist()
    labels = batch["labels"]  # the answer word is the labelled token right after the marker
    answer_ids = labels[targets.word_answer_rows[:, 0], targets.word_answer_rows[:, 1] + 1]
    assert targets.word_answer_ids.tolist() == answer_ids.tolist()
    categories = [q.category for _, _, q, _, _ in turns]
    expected = [(b, ends[0]) for b, _, q, ends, _ in turns if q.category != "position" and ends]
    assert len(expected) > 0 and {"color", "shape", "ocr"} <= set(categories)
    assert targets.word_noun_rows.tolist() == [list(r) for r in expected]
    by_row = dict(zip(map(tuple, targets.word_answer_rows.tolist()), targets.word_answer_ids.tolist()))
    nouns = [by_row[(b, pos)] for b, pos, q, ends, _ in turns if q.category != "position" and ends]
    assert targets.word_noun_ids.tolist() == nouns
    assert probe_targets(turns).word_answer_rows.shape == (0, 2)  # without answer ids, no word targets


def test_answer_word_probes_classify_the_named_decoder_layers():
    from training.probes import ProbeTargets, ReadoutProbes

    model, inputs = _llava_and_two_training_samples()
    vocab = model.config.get_text_config().vocab_size
    probes = ReadoutProbes(model, noun_layer=1, answer_layer=3, answer_words=vocab)
    rows, other = torch.tensor([[0, 5], [1, 9]]), torch.tensor([[1, 7]])
    none = torch.zeros(0, 2, dtype=torch.long)
    nothing = torch.zeros(0)
    targets = ProbeTargets(
        none, nothing, none, nothing, none, none, nothing, rows, torch.tensor([3, 8]), other, torch.tensor([11])
    )
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # [k + 1] = output of decoder layer k
        got = probes.word_loss(targets)
        regressions = probes.loss(targets)
        noun = probes.noun_word(hidden[2][rows[:, 0], rows[:, 1]])
        answer = probes.answer_word(hidden[4][other[:, 0], other[:, 1]])
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(got, ce(noun, targets.word_noun_ids) + ce(answer, targets.word_answer_ids), atol=1e-5)
    assert regressions.item() == 0.0  # no regression rows: the word rows feed only the classifiers
    plain = ReadoutProbes(model, noun_layer=1, answer_layer=3)
    with pytest.raises(ValueError, match="answer_words=0"):
        plain.word_loss(targets)
    probes.remove()
    plain.remove()


@pytest.mark.parametrize("weight", ["answer_probe_weight", "phrase_probe_weight"])
def test_negative_probe_weight_is_refused(weight):
    with pytest.raises(ValueError, match="probe weights must be >= 0"):
        train(TrainConfig(family="llava", **{weight: -1.0}), verbose=False)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_phrase_targets_are_the_first_and_last_naming_words_of_each_phrase(family):
    """Per naming phrase of every turn, in order: its last word's position, and the ids of its first and last
    attribute words as written in the question text (a position question has two phrases of two words)."""
    from training.architectures import build
    from training.phrase_probes import phrase_targets
    from training.train import attribute_word_ids, named_turns

    _, processor = build(family)
    batch = training_batch(processor, family, list(range(8)), TrainConfig(family=family))
    marker = processor.tokenizer.convert_tokens_to_ids(ASSISTANT_MARKER[family])
    nouns = attribute_word_ids(processor.tokenizer)
    turns = list(named_turns(batch, marker, nouns))
    rows, first, last = phrase_targets(turns, batch["input_ids"], nouns)
    to_id = processor.tokenizer.convert_tokens_to_ids
    expected = []
    for b, _, question, ends, _ in turns:
        words = [w for w in question.text.split() if to_id(w) in nouns]
        groups = [words[:2], words[2:]] if question.category == "position" else [words]
        expected += [(b, end, to_id(g[0]), to_id(g[-1])) for end, g in zip(ends, groups, strict=True)]
    got = [(*r, f, t) for r, f, t in zip(rows.tolist(), first.tolist(), last.tolist())]
    assert got == expected
    assert any(f != t for *_, f, t in got) and any(f == t for *_, f, t in got)  # two-word and one-word phrases
    empty = phrase_targets([], batch["input_ids"], nouns)
    assert [t.shape for t in empty] == [(0, 2), (0,), (0,)]


def test_phrase_probes_classify_the_noun_layer_attention_input():
    """The loss is the two cross-entropies of linear read-outs of layer k's input after its input norm."""
    from training.phrase_probes import PhraseProbes

    model, inputs = _llava_and_two_training_samples()
    vocab = model.config.get_text_config().vocab_size
    probes = PhraseProbes(model, layer=1, words=vocab)
    rows, first, last = torch.tensor([[0, 5], [1, 9]]), torch.tensor([3, 8]), torch.tensor([4, 8])
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # [1] = input of decoder layer 1
        got = probes.loss(rows, first, last)
        normed = model.model.language_model.layers[1].input_layernorm(hidden[1])[rows[:, 0], rows[:, 1]]
    ce = torch.nn.functional.cross_entropy
    expected = ce(probes.first(normed), first) + ce(probes.last(normed), last)
    assert torch.allclose(got, expected, atol=1e-5)
    assert probes.loss(torch.zeros(0, 2, dtype=torch.long), first[:0], last[:0]).item() == 0.0
    probes.remove()
    assert not model.model.language_model.layers[1].self_attn._forward_pre_hooks


def test_onevision_options_train_every_probe_and_leave_no_hooks():
    """Grid heads, answer-word and phrase-word probes together: the probe terms are in the logged loss, and no
    training hook (visual tap, attention teachers, probes) stays on the returned model."""
    cfg = TrainConfig(
        family="llava_onevision", max_steps=2, vision_share=0, batch_size=2, extra_turns=2, warmup=1, eval_samples=0,
        grid_heads=True, answer_probe_weight=1.0, phrase_probe_weight=1.0,
    )  # fmt: skip
    model, _, report = train(cfg, verbose=False)
    assert report["steps"] == 2 and all(p > 0 for p in report["probe_losses"])
    layers = model.model.language_model.layers
    hooked = [model.model.multi_modal_projector, *layers, *(layer.self_attn for layer in layers)]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hooked)  # (transformers adds its own elsewhere)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_video_steps_alternate_with_image_steps_and_are_measured(tmp_path, family):
    cfg = TrainConfig(
        family=family, max_steps=4, vision_share=0, batch_size=2, extra_turns=1, warmup=1, eval_samples=0,
        video_share=0.5,
    )  # fmt: skip
    _, _, report = train(cfg, out=tmp_path, verbose=False, test_samples=4)
    assert report["steps"] == 4 and report["video_steps"] == 2 and len(report["losses"]) == 2
    assert all(torch.isfinite(torch.tensor(report["video_losses"])))
    assert set(report["video_test_accuracy"]) == {"video_color", "video_move", "video_appear", "all"}
    from tokenzip.synthetic import VIDEO_FRAMES, video_sample
    from tokenzip.synthetic.evaluate import evaluate_video

    answers = report["video_test_answers"]
    hits = [a == video_sample("test", i, frames=(VIDEO_FRAMES,) * 2).question.answer for i, a in enumerate(answers)]
    assert len(answers) == 4 and report["video_test_accuracy"]["all"] == pytest.approx(sum(hits) / 4)
    loaded, loaded_processor = load_vlm(tmp_path, dtype="float32")
    got: list[str] = []
    evaluate_video(loaded, loaded_processor, family, "test", 4, record=got)
    assert got == answers  # the recorded answers are what the saved model gives


def test_video_batch_labels_the_clip_answer():
    from tokenzip.synthetic import VIDEO_FRAMES, video_sample
    from training.architectures import build
    from training.video_batches import is_video_step, video_batch

    model, processor = build("llava_onevision")
    batch = video_batch(processor, model.config, "llava_onevision", [5, 6])
    for b, i in enumerate([5, 6]):
        labels = batch["labels"][b]
        words = processor.tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist())
        assert words == [video_sample("train", i, frames=(VIDEO_FRAMES, VIDEO_FRAMES)).question.answer, "<|im_end|>"]
    assert batch["pixel_values_videos"].shape[:2] == (2, VIDEO_FRAMES)
    assert [is_video_step(s, 0.25) for s in range(8)] == [False, False, False, True] * 2
    with pytest.raises(ValueError, match="video_share"):
        train(TrainConfig(family="llava", video_share=0.2), verbose=False)


def test_glyph_weight_scales_the_glyph_heads_share_of_the_dense_gradient():
    """With glyph weight w the glyph head's gradient is w * 6 / (5 + w) times that of the unweighted loss, every
    other head's 6 / (5 + w) times: the weight moves gradient towards the glyph, the loss stays a weighted mean."""
    from training.dense import DenseHeads, cell_labels

    labels = torch.cat([cell_labels(sample("train", i).scene, 12, 12) for i in range(4)], dim=1)
    tokens = torch.randn(labels.shape[1], 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = DenseHeads(16)
    weighted = DenseHeads(16, glyph_weight=3.0)
    weighted.load_state_dict(plain.state_dict())
    plain.loss(tokens, labels).backward()
    weighted.loss(tokens, labels).backward()
    for name, head in zip(DenseHeads.NAMES, weighted.heads()):
        scale = 3.0 * 6 / 8 if name == "glyph" else 6 / 8
        assert torch.allclose(head.weight.grad, scale * getattr(plain, name).weight.grad, atol=1e-6), name
    assert torch.allclose(weighted.x.weight.grad, 6 / 8 * plain.x.weight.grad, atol=1e-6)
    with pytest.raises(ValueError, match="glyph_weight must be > 0"):
        DenseHeads(16, glyph_weight=0)


def test_negative_vision_batch_size_is_refused():
    with pytest.raises(ValueError, match="vision_batch_size must be >= 0"):
        train(TrainConfig(family="llava", vision_batch_size=-1), verbose=False)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_visual_grids_hold_the_cells_the_dense_labels_describe(family):
    """Each cell's colour label, written into the projector output in `dense_labels` order, comes back out of the
    LLM input at the position `visual_grids` gives that cell (OneVision: base grid first, then the packed 2x2
    tiles with a newline after every row)."""
    from training.architectures import build
    from training.dense import cell_labels
    from training.train import dense_labels, visual_grids

    model, processor = build(family)
    batch = training_batch(processor, family, list(range(3)), TrainConfig(family=family))
    colour = dense_labels(model, family, batch["scenes"])[0].float()

    def write_labels(module, args, out):
        flat = torch.zeros_like(out.reshape(-1, out.shape[-1]))
        flat[:, 0] = colour
        return flat.view_as(out)

    seen = {}
    hooks = [
        model.model.multi_modal_projector.register_forward_hook(write_labels),
        model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
        ),
    ]
    inputs = {k: v for k, v in batch.items() if k not in ("scenes", "questions", "labels")}
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    for b, scene in enumerate(batch["scenes"]):
        grids = visual_grids(model, family, batch["input_ids"][b])
        assert len(grids) == (2 if family == "llava_onevision" else 1)
        for positions, rows, cols in grids:
            got = seen["embeds"][b, positions, 0].round().long()
            assert torch.equal(got, cell_labels(scene, rows, cols)[0])
            assert got.unique().numel() > 1  # the scene's objects are there, not only background


def test_onevision_tiles_are_labelled_with_bands_inside_the_tile():
    """SigLIP encodes each tile alone, so a tile token's column band is measured across its tile (the same bands
    as a whole-image grid of that size); the base grid keeps whole-image bands. Object labels stay where they are."""
    from training.architectures import build
    from training.dense import cell_labels
    from training.train import dense_labels

    model, _ = build("llava_onevision")
    scene = sample("train", 5).scene
    labels = dense_labels(model, "llava_onevision", [scene]).view(5, 5, 36)  # base + 4 tiles of 6x6
    whole = cell_labels(scene, 6, 6)
    assert torch.equal(labels[3, 0], whole[3])
    for tile in range(1, 5):
        assert torch.equal(labels[3, tile], whole[3])  # bands 1..12 across the tile, as across a 6x6 image
    right_top = cell_labels(scene, 6, 6, (0.5, 0, 1, 0.5))
    assert torch.equal(labels[[0, 1, 2, 4], 2], right_top[[0, 1, 2, 4]])
    assert (right_top[3] > 6).all()  # whole-image bands of the right half, which its tokens cannot know


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision"])
def test_vision_width_sets_the_towers_width_and_rejects_bad_values(family):
    """`--vision-width` widens the tower (MLPs 4x) and leaves the LLM alone; 0 keeps the family's default."""
    from training.architectures import build

    default, _ = build(family, version="v1")
    wide, _ = build(family, version="v1", vision_width=96)
    vision = wide.config.vision_config
    assert vision.hidden_size == 96 and vision.intermediate_size == 384
    assert default.config.vision_config.hidden_size != 96
    assert wide.config.get_text_config().to_dict() == default.config.get_text_config().to_dict()
    with pytest.raises(ValueError, match="vision_width must be"):
        build(family, version="v1", vision_width=100)
