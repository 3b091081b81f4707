"""Train a bundled tiny VLM from scratch on the synthetic QA data, on CPU.

    python -m training.train --family llava --minutes 40 --out tokenzip/assets/synth-llava

Two phases share the time budget. First the vision side alone learns the per-cell scene labels (`vision_phase`)
and, on its global vector, the image-level scene attributes (`global_heads`); then the whole model learns to answer.
`--data-version` picks the data (and the LLM size, `architectures.TEXT`): v1 (the shipped bundles) or v2.
Each step of the second phase renders a fresh batch of training samples
(`sample("train", i)` for a stream of indices, wrapping around the split), builds multi-turn conversations (the
sample's own question first, then extra questions about the same scene, see `conversations`) and minimises the
cross-entropy of the answer word and the end-of-turn token of every assistant turn. Evaluation is greedy
generation on the validation split; the run writes the weights (safetensors), the processor files and
`training.json` (settings, loss curves, per-category accuracy, time).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tokenzip.synthetic.conversations import ASSISTANT_MARKER, answer_mask, extra_questions, messages
from tokenzip.synthetic.dataset import RENDER_SIDE, SPLITS, VIDEO_TEST, Sample, sample
from tokenzip.synthetic.evaluate import evaluate, evaluate_video
from tokenzip.synthetic.questions import ASK, CATEGORIES
from tokenzip.synthetic.scenes import random_scene

from .architectures import FAMILIES, IMAGE_SIDE, build
from .attention_teacher import AttentionTeacher
from .budget import StepBudget, cosine_lr
from .dense import DenseHeads
from .global_heads import GlobalHeads, GlobalTap
from .phrase_probes import PhraseProbes, phrase_targets
from .probes import ReadoutProbes, probe_targets
from .token_dropout import context_plan, dropout_mask, position_ids
from .video_batches import VIDEO_FAMILIES, is_video_step, video_batch
from .vision_phase import pretrain_vision, tower_parameters


@dataclass
class TrainConfig:
    family: str = "llava"
    data_version: str = "v1"  # dataset version (scene style) and LLM size (architectures.TEXT): "v1" or "v2" (all
    # shipped bundles; their recorded commands pass --data-version v2). v1 stays the default: its 8-layer LLM keeps
    # the training tests fast
    vision_width: int = 0  # tower width (architectures.build); 0 = the family's default
    arch: str = ""  # LLM size of another version (architectures.TEXT) for experiments; "" = data_version's
    global_weight: float | None = None  # image-level objective on the tower's global vector (global_heads.py);
    # 0 = off; None = RECIPE's (1 for v2 data, 0 for v1: the shipped bundles were trained without it)
    minutes: float = 40.0  # wall-clock budget for the optimisation steps of both phases
    vision_share: float = 0.5  # share of the budget for the vision-only phase (see vision_phase.py); 0 = skip it
    vision_max_steps: int = 100_000
    vision_lr: float = 2e-3
    vision_batch_size: int = 0  # images per vision-phase step; 0 = `batch_size` (a smaller batch buys more steps,
    # which is what the slow-to-start glyph head needs)
    glyph_weight: float = 1.0  # weight of the glyph head in the dense loss (each other head weighs 1; dense.py)
    max_steps: int = 100_000  # question-answering phase
    batch_size: int = 32
    extra_turns: int = 10  # extra questions per image after the sample's own (at most)
    question_rounds: int = 2  # draws of `extra_questions` per image (each asks up to one question per category)
    freeze_tower: bool = True  # after the vision phase, freeze the tower but its last `tower_trainable_layers`
    # feeding layers (the tower's backward pass is most of a question-answering step, and its features are already
    # decodable; the last layer stays trainable for what the vision phase has not finished, e.g. glyphs)
    tower_trainable_layers: int = 1
    lr: float = 2e-3
    warmup: int | None = None  # linear warm-up steps of the question-answering phase; None = RECIPE's
    zero_residual: bool | None = None  # start every decoder layer as the identity (attention and MLP output
    # projections zero, `zero_residual_projections`); None = RECIPE's
    weight_decay: float = 0.05
    curriculum: float = 0.15  # share of the QA phase trained on easy scenes (2-3 objects) first
    dense_weight: float = 1.0  # auxiliary per-cell colour / shape / glyph loss on the visual tokens (see dense.py)
    attention_weight: float = 1.0  # attention supervision of two heads (see attention_teacher.py); 0 = off
    noun_layer: int = 1  # 0-based decoder layer whose head 0 learns noun -> object
    grid_heads: bool = False  # noun -> object in one head per grid (head g: grid g; OneVision: base, packed)
    answer_layer: int = 3  # 0-based decoder layer whose head 0 learns answer position -> noun
    probe_weight: float = 1.0  # position and count probes after those two layers (see probes.py); 0 = off
    answer_probe_weight: float | None = None  # answer-word classifiers on the naming word and the answer token
    # (probes.py); None = RECIPE's
    phrase_probe_weight: float | None = None  # first / last phrase-word classifiers on the noun layer's query
    # input (phrase_probes.py); None = RECIPE's
    context_dropout: float | None = None  # share of question-answering images asked 1-4 questions that lose a random
    # part of the visual tokens those questions do not need (token_dropout.py); 0 = off; None = RECIPE's
    init: str = ""  # experiments: start from the weights of this saved model (then usually --vision-share 0)
    video_share: float = 0.0  # share of question-answering steps on video clips (video_batches.py; not for llava)
    seed: int = 0
    eval_every: int = 250
    eval_samples: int = 300  # validation samples per periodic evaluation
    threads: int = 2
    log: list = field(default_factory=list)


RECIPE: dict[str, dict] = {  # per data version, what the None fields of TrainConfig become
    # how the shipped v1 bundles were trained
    "v1": {
        "global_weight": 0.0,
        "warmup": 150,
        "zero_residual": False,
        "answer_probe_weight": 0.0,
        "phrase_probe_weight": 0.0,
        "context_dropout": 0.0,
    },
    # v2: without the answer-word probes the noun heads of the 20-layer LLaVA attended to the right cells but
    # carried no colour (every colour answer "yellow" or "purple"), as the OneVision v1 model did (probes.py)
    "v2": {
        "global_weight": 1.0,
        "warmup": 60,
        "zero_residual": True,
        "answer_probe_weight": 1.0,
        "phrase_probe_weight": 1.0,
        # without it the 20-layer LLaVA kept 74 % of its accuracy under the oracle selection at keep 0.111
        "context_dropout": 0.5,
    },
}


def resolve_recipe(cfg: TrainConfig) -> TrainConfig:
    """Fill the None fields of `cfg` from `RECIPE[cfg.data_version]` (in place; returns `cfg`)."""
    if cfg.data_version not in RECIPE:
        raise ValueError(f"unknown data version {cfg.data_version!r}; versions: {list(RECIPE)}")
    for name, value in RECIPE[cfg.data_version].items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    return cfg


def zero_residual_projections(model) -> None:
    """Zero the output projection of every decoder layer's attention and MLP, so that each layer starts as the
    identity on the residual stream (as in Fixup / T-Fixup and many current LM recipes). A 20-layer LLM then
    starts where a shallow one does: the layers the supervised hops (`noun_layer`, `answer_layer`) do not use add
    no noise to what they pass on, and each joins in as its output projection learns. Gradients still reach the
    query / key / value weights after the first update of the projection."""
    for layer in model.model.language_model.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)


def easy_sample(index: int, seed: int = 0, version: str = "v1") -> Sample:
    """A curriculum sample: the same question categories on scenes of only 2-3 objects (fewer distractors)."""
    rng = random.Random(f"easy/{seed}/{index}" if version == "v1" else f"{version}/easy/{seed}/{index}")
    category = CATEGORIES[index % len(CATEGORIES)]
    scene, question = ASK[category](rng, random_scene(rng, n_objects=(2, 3), style=version))
    return Sample("train", index, scene, question)


def turns(s: Sample, index: int, cfg: TrainConfig) -> list:
    """The extra questions asked about sample `s` after its own: `cfg.question_rounds` draws of `extra_questions`
    (the first skips the sample's own category), without repeating a question, at most `cfg.extra_turns`."""
    rng = random.Random(f"turns/{cfg.seed}/{index}")
    seen, out = {s.question.text}, []
    for round_ in range(cfg.question_rounds):
        for q in extra_questions(rng, s.scene):
            if q.text not in seen and not (round_ == 0 and q.category == s.question.category):
                seen.add(q.text)
                out.append(q)
    return out[: cfg.extra_turns]


def training_batch(
    processor, family: str, indices: list[int], cfg: TrainConfig, easy: bool = False, plan: list | None = None
) -> dict:
    """Processor inputs for the conversations of train samples `indices`, plus `labels` (-100 = ignored) and the
    `scenes` (for the dense auxiliary targets). `plan` (`token_dropout.context_plan`) cuts the conversations it
    drops out to their first k questions (the caller then masks the tokens they do not need)."""
    texts, images, scenes, asked = [], [], [], []
    for n, i in enumerate(indices):
        v = cfg.data_version
        s = easy_sample(i, cfg.seed, v) if easy else sample("train", i % SPLITS["train"], cfg.seed, v)
        questions = [s.question, *turns(s, i, cfg)]
        if plan is not None and plan[n] is not None:
            questions = questions[: plan[n][0]]
        texts.append(processor.apply_chat_template(messages(questions), add_generation_prompt=False))
        images.append(s.image(RENDER_SIDE))
        scenes.append(s.scene)
        asked.append(questions)
    processor.tokenizer.padding_side = "right"
    batch = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    marker = processor.tokenizer.convert_tokens_to_ids(ASSISTANT_MARKER[family])
    labels = batch["input_ids"].masked_fill(~answer_mask(batch["input_ids"], marker), -100)
    batch["labels"] = labels
    batch["scenes"] = scenes
    batch["questions"] = asked
    return batch


def loss_on_answers(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens (next-token prediction)."""
    batch = {k: v for k, v in batch.items() if k not in ("scenes", "questions")}
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1]
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


class VisualTap:
    """Captures the visual tokens the LLM receives, in the order of `dense_labels` (a forward hook)."""

    def __init__(self, model, family: str) -> None:
        self.family = family
        self.tokens: torch.Tensor | None = None
        inner = model.model
        module = inner.visual if family == "qwen2_5_vl" else inner.multi_modal_projector
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        out = output.pooler_output if self.family == "qwen2_5_vl" else output
        self.tokens = out.reshape(-1, out.shape[-1])

    def remove(self) -> None:
        self.handle.remove()


def attribute_word_ids(tokenizer) -> set[int]:
    """Ids of the words that name what a question is about: colours, shapes (singular and plural), 'box'."""
    from tokenzip.synthetic.scenes import COLORS, SHAPES

    words = [*COLORS, *SHAPES, *(f"{shape}s" for shape in SHAPES), "box"]
    return set(tokenizer.convert_tokens_to_ids(words))


def named_objects(scene, question) -> list[list]:
    """What each naming phrase of a question refers to, in question order: one list of objects (or the glyph) per
    phrase. A position question names two objects; every other category names one set (possibly empty)."""
    from tokenzip.synthetic.geometry import asked_objects

    if question.category != "position":
        return [asked_objects(scene, question)]
    words = question.text.split()
    first, second = (words[2], words[3]), (words[-3], words[-2])  # "Is the c1 s1 left or right of the c2 s2 ?"
    return [[o for o in scene.objects if (o.color, o.shape) == pair] for pair in (first, second)]


GRID_COUNT = {"llava": 1, "qwen2_5_vl": 1, "llava_onevision": 2}  # grids per training image (`visual_grids`)


def visual_grids(model, family: str, row_ids: torch.Tensor) -> list[tuple[torch.Tensor, int, int]]:
    """The grids of one sample's image as they sit in its LLM input: (sequence positions [rows * cols] in raster
    order, rows, cols) per grid. LLaVA: one patch grid; Qwen2.5-VL: one merged grid; OneVision: the base grid,
    then the packed high-resolution grid (2x2 tiles of a square image, a newline token after every row).
    Training images are square and rendered at RENDER_SIDE, so the layout is fixed per family."""
    positions = (row_ids == model.config.image_token_id).nonzero().flatten()
    cfg = model.config.vision_config
    if family == "qwen2_5_vl":
        side = IMAGE_SIDE[family] // (cfg.patch_size * cfg.spatial_merge_size)
    else:
        side = cfg.image_size // cfg.patch_size
    hi = 2 * side  # OneVision's packed grid
    expected = side * side + (hi * (hi + 1) if family == "llava_onevision" else 0)
    if positions.numel() != expected:
        raise ValueError(f"{family}: {positions.numel()} image tokens in a training sample, expected {expected}")
    if family != "llava_onevision":
        return [(positions, side, side)]
    packed = positions[side * side :].view(hi, hi + 1)[:, :hi].flatten()  # without the newline column
    return [(positions[: side * side], side, side), (packed, hi, hi)]


def named_turns(batch: dict, marker_id: int, noun_ids: set[int]):
    """Per assistant turn of every sample: (sample, position of the token that predicts the answer, question,
    positions of the last naming word of each phrase, the objects each phrase names), phrases in question order
    (`named_objects`). A phrase is "colour shape" or one word, so a position question has four naming words."""
    ids = batch["input_ids"]
    for b, (scene, questions) in enumerate(zip(batch["scenes"], batch["questions"])):
        row_ids = ids[b].tolist()
        markers = [p for p, t in enumerate(row_ids) if t == marker_id]
        previous = 0
        for pos, question in zip(markers, questions):
            naming = [p for p in range(previous, pos) if row_ids[p] in noun_ids]
            previous = pos + 2  # after this turn's answer word and end token
            phrases = named_objects(scene, question)
            ends = naming[-1:] if len(phrases) == 1 else [naming[1], naming[3]] if len(naming) == 4 else []
            yield b, pos, question, ends, phrases


def attention_targets(
    model, family: str, batch: dict, marker_id: int, noun_ids: set[int], per_grid: bool = False
) -> tuple[list, tuple, tuple]:
    """Targets of the supervised hops, per assistant turn whose question names something visible:

    * noun -> object: the last naming word of each phrase (the shape in "What color is the square ?", "box" for
      the glyph, both shapes of a position question) should attend to the visual tokens covering the object(s)
      that phrase names, in every grid of the image at once, or with `per_grid` one target per grid (one head
      each);
    * answer -> first noun: the token that predicts the answer should attend to that word (the only one, or the
      first object of a position question);
    * answer -> second noun (position questions), in another head: the two objects reach the answer side by side
      instead of averaged into one vector, so that left / right stays comparable.

    A count question's noun attends to the centre cell of each counted object (one token per object) or to the
    first token of the sequence, a sink: the share of the mass left on the sink says how many (with no object to
    count, the sink alone is the target).

    Returns (noun hops, answer -> first noun, answer -> second noun): (queries [M, 2], keys [M, S]) pairs, queries
    being (sample, position) rows; the noun hops are a list of one pair, or of one pair per grid with `per_grid`
    (same queries, keys of grid g only, plus the sink for counting).
    """
    from .dense import LABEL_COVER, centre_cells, object_cells

    ids = batch["input_ids"]
    width = ids.shape[1]
    grids = [visual_grids(model, family, row) for row in ids]
    heads = len(grids[0]) if per_grid else 1
    hops: list[list] = [[] for _ in range(heads + 2)]  # per hop: (query row, key mask) pairs; nouns first
    mask = batch.get("attention_mask", torch.ones_like(ids))
    sinks = mask.long().argmax(1)  # first attended position of each sample
    for b, pos, question, ends, phrases in named_turns(batch, marker_id, noun_ids):
        counting = question.category == "count"
        for k, (noun, things) in enumerate(zip(ends, phrases)):
            if not things and not counting:
                continue
            cover = LABEL_COVER[batch["scenes"][b].style]
            keys = torch.zeros(heads, width, dtype=torch.bool)
            for g, (positions, rows, cols) in enumerate(grids[b]):
                cells = centre_cells(things, rows, cols) if counting else object_cells(things, rows, cols, cover)
                keys[g if per_grid else 0, positions[cells]] = True
            if counting:
                keys[:, sinks[b]] = True
            for head in range(heads):
                hops[head].append(((b, noun), keys[head]))
            word = torch.zeros(width, dtype=torch.bool)
            word[noun] = True
            hops[heads + k].append(((b, pos), word))
    out = []
    for pairs in hops:
        queries = torch.tensor([q for q, _ in pairs], dtype=torch.long).reshape(-1, 2)
        keys = torch.stack([k for _, k in pairs]) if pairs else torch.zeros(0, width, dtype=torch.bool)
        out.append((queries, keys))
    return out[:heads], out[heads], out[heads + 1]


def dense_labels(model, family: str, scenes: list) -> torch.Tensor:
    """[5, N] cell labels (`dense.cell_labels`) matching `VisualTap.tokens`, square images rendered at RENDER_SIDE."""
    from .dense import cell_labels

    if family == "llava_onevision":
        cfg = model.config.vision_config
        grid = cfg.image_size // cfg.patch_size
        halves = [(0, 0, 0.5, 0.5), (0.5, 0, 1, 0.5), (0, 0.5, 0.5, 1), (0.5, 0.5, 1, 1)]  # 2x2 tiles, raster order
        boxes = [(0, 0, 1, 1), *halves]  # the base image first; tiles get bands within the tile (`cell_labels`)
        return torch.cat(
            [cell_labels(sc, grid, grid, box, local_bands=k > 0) for sc in scenes for k, box in enumerate(boxes)],
            dim=1,
        )
    if family == "qwen2_5_vl":
        cfg = model.config.vision_config
        grid = IMAGE_SIDE[family] // (cfg.patch_size * cfg.spatial_merge_size)
    else:
        cfg = model.config.vision_config
        grid = cfg.image_size // cfg.patch_size
    return torch.cat([cell_labels(sc, grid, grid) for sc in scenes], dim=1)


def train(cfg: TrainConfig, out: Path | None = None, verbose: bool = True, test_samples: int = SPLITS["test"]):
    """Train one family; returns `(model, processor, report)`. With `out`, saves there and measures the first
    `test_samples` of the test split on the saved copy."""
    if cfg.family not in FAMILIES:
        raise ValueError(f"unknown family {cfg.family!r}; choose one of {list(FAMILIES)}")
    if not 0 <= cfg.video_share < 1 or (cfg.video_share and cfg.family not in VIDEO_FAMILIES):
        raise ValueError(
            f"video_share must be in [0, 1) and 0 for {cfg.family!r} (video families: {list(VIDEO_FAMILIES)}), "
            f"got {cfg.video_share}"
        )
    if cfg.vision_batch_size < 0:
        raise ValueError(f"vision_batch_size must be >= 0 (0 = batch_size), got {cfg.vision_batch_size}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    resolve_recipe(cfg)
    model, processor = build(cfg.family, cfg.seed, cfg.arch or cfg.data_version, cfg.vision_width)
    if cfg.init:
        model.load_state_dict(type(model).from_pretrained(cfg.init, dtype=torch.float32).state_dict())
    elif cfg.zero_residual:
        zero_residual_projections(model)
    model.train()
    dropout_rng = torch.Generator().manual_seed(cfg.seed + 7919)
    heads = DenseHeads(model.config.get_text_config().hidden_size, cfg.glyph_weight)
    tap = VisualTap(model, cfg.family)
    global_tap = GlobalTap(model, cfg.family) if cfg.global_weight else None
    global_heads = GlobalHeads(global_tap.dim) if global_tap is not None else None
    supervise = bool(cfg.attention_weight)
    noun_heads = GRID_COUNT[cfg.family] if cfg.grid_heads else 1
    teachers = (
        (
            *(AttentionTeacher(model, cfg.noun_layer, head=h) for h in range(noun_heads)),
            AttentionTeacher(model, cfg.answer_layer),
            AttentionTeacher(model, cfg.answer_layer, head=1),
        )
        if supervise
        else ()
    )
    if min(cfg.answer_probe_weight, cfg.probe_weight, cfg.phrase_probe_weight) < 0:
        raise ValueError(
            "probe weights must be >= 0, got "
            f"{cfg.probe_weight}, {cfg.answer_probe_weight} and {cfg.phrase_probe_weight} (phrase)"
        )
    words = model.config.get_text_config().vocab_size if cfg.answer_probe_weight else 0
    probed = cfg.probe_weight or cfg.answer_probe_weight
    probes = ReadoutProbes(model, cfg.noun_layer, cfg.answer_layer, answer_words=words) if probed else None
    answer_id = processor.tokenizer.convert_tokens_to_ids if words else None
    vocab = model.config.get_text_config().vocab_size
    phrases = PhraseProbes(model, cfg.noun_layer, vocab) if cfg.phrase_probe_weight else None
    noun_ids = attribute_word_ids(processor.tokenizer)
    marker_id = processor.tokenizer.convert_tokens_to_ids(ASSISTANT_MARKER[cfg.family])
    params = [*model.named_parameters(), *(("dense." + n, p) for n, p in heads.named_parameters())]
    if global_heads is not None:
        params += [("global." + n, p) for n, p in global_heads.named_parameters()]
    if probes is not None:
        params += [("probe." + n, p) for n, p in probes.named_parameters()]
    if phrases is not None:
        params += [("phrase." + n, p) for n, p in phrases.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    start = time.perf_counter()
    budget = cfg.minutes * 60
    vision_log = []
    if cfg.vision_share > 0:
        vision_log = pretrain_vision(
            model,
            processor,
            heads,
            lambda: tap.tokens,
            lambda scenes: dense_labels(model, cfg.family, scenes),
            cfg.vision_share * budget,
            max_steps=cfg.vision_max_steps,
            batch_size=cfg.vision_batch_size or cfg.batch_size,
            lr=cfg.vision_lr,
            weight_decay=cfg.weight_decay,
            seed=cfg.seed,
            verbose=verbose,
            version=cfg.data_version,
            global_heads=global_heads,
            global_tap=global_tap,
            global_weight=cfg.global_weight,
        )
    if cfg.freeze_tower and (cfg.vision_share > 0 or cfg.init):
        for p in tower_parameters(model, cfg.tower_trainable_layers):
            p.requires_grad_(False)  # AdamW skips parameters without gradients
    steps = StepBudget(budget - (time.perf_counter() - start), cfg.max_steps)
    step, seen, losses, dense_losses, attention_losses, probe_losses = 0, 0, [], [], [], []
    clips_seen, video_losses = 0, []
    while step < steps.total:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps.total, cfg.lr, cfg.warmup)
        if is_video_step(step, cfg.video_share):
            clip_indices = list(range(clips_seen, clips_seen + cfg.batch_size))
            clips_seen += cfg.batch_size
            clips = video_batch(processor, model.config, cfg.family, clip_indices, cfg.seed, cfg.data_version)
            total_loss = loss_on_answers(model, clips)
            video_losses.append(total_loss.item())
        else:
            indices = list(range(seen, seen + cfg.batch_size))
            seen += cfg.batch_size
            easy = steps.elapsed < cfg.curriculum * steps.seconds
            plan = context_plan(len(indices), cfg.context_dropout, dropout_rng) if cfg.context_dropout else None
            batch = training_batch(processor, cfg.family, indices, cfg, easy=easy, plan=plan)
            if plan is not None:
                grids = [visual_grids(model, cfg.family, row) for row in batch["input_ids"]]
                mask = dropout_mask(
                    batch["attention_mask"], grids, batch["scenes"], batch["questions"], plan, dropout_rng
                )
                batch["position_ids"] = position_ids(model, batch, mask)
                batch["attention_mask"] = mask
            if global_tap is not None:
                global_tap.images = len(indices)
            loss = loss_on_answers(model, batch)
            cells = dense_labels(model, cfg.family, batch["scenes"])
            dense = heads.loss(tap.tokens, cells)
            total_loss = loss + cfg.dense_weight * dense
            if global_heads is not None:
                total_loss = total_loss + cfg.global_weight * global_heads.loss(global_tap.vectors, batch["scenes"])
            if supervise:
                nouns, *answers = attention_targets(model, cfg.family, batch, marker_id, noun_ids, cfg.grid_heads)
                hops = [*nouns, *answers]
                attended = batch["attention_mask"].bool()
                terms = [
                    teacher.loss(*hop, attended) for teacher, hop in zip(teachers, hops, strict=True) if hop[0].numel()
                ]
                attention = torch.stack(terms).mean() if terms else total_loss.new_zeros(())
                total_loss = total_loss + cfg.attention_weight * attention
                attention_losses.append(attention.item())
            if probes is not None or phrases is not None:
                turns = list(named_turns(batch, marker_id, noun_ids))
                probe = total_loss.new_zeros(())
            if probes is not None:
                targets = probe_targets(turns, answer_id)
                probe = probe + cfg.probe_weight * probes.loss(targets)
                if words:
                    probe = probe + cfg.answer_probe_weight * probes.word_loss(targets)
            if phrases is not None:
                probe = probe + cfg.phrase_probe_weight * phrases.loss(
                    *phrase_targets(turns, batch["input_ids"], noun_ids)
                )
            if probes is not None or phrases is not None:
                total_loss = total_loss + probe
                probe_losses.append(probe.item())
            losses.append(loss.item())
            dense_losses.append(dense.item())
        opt.zero_grad(set_to_none=True)
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params if p.requires_grad], 1.0)
        opt.step()
        step += 1
        steps.tick(step)
        elapsed = time.perf_counter() - start
        if verbose and step % 25 == 0:
            recent = sum(losses[-25:]) / len(losses[-25:])
            aux = sum(dense_losses[-25:]) / len(dense_losses[-25:])
            rate = cosine_lr(step, steps.total, cfg.lr, cfg.warmup)
            att = sum(attention_losses[-25:]) / max(1, len(attention_losses[-25:]))
            pro = sum(probe_losses[-25:]) / max(1, len(probe_losses[-25:]))
            print(f"step {step}/{steps.total} loss {recent:.4f} dense {aux:.4f} attention {att:.3f}", end="")
            print(f" probes {pro:.3f}", end="")
            if video_losses:
                print(f" video {sum(video_losses[-10:]) / len(video_losses[-10:]):.4f}", end="")
            print(f" lr {rate:.2e} {elapsed / 60:.1f} min", flush=True)
        if cfg.eval_samples and (step % cfg.eval_every == 0 or step == steps.total):
            model.eval()
            acc = evaluate(
                model, processor, cfg.family, "val", cfg.eval_samples, seed=cfg.seed, version=cfg.data_version
            )
            model.train()
            cfg.log.append({"step": step, "minutes": round(elapsed / 60, 2), "loss": losses[-1], **acc})
            if verbose:
                print("  val", json.dumps(acc))
    tap.remove()
    if global_tap is not None:
        global_tap.remove()
    for teacher in teachers:
        teacher.remove()
    if probes is not None:
        probes.remove()
    if phrases is not None:
        phrases.remove()
    model.eval()
    minutes = (time.perf_counter() - start) / 60
    report = {
        "losses": [round(x, 4) for x in losses],
        "dense_losses": [round(x, 4) for x in dense_losses],
        "attention_losses": [round(x, 4) for x in attention_losses],
        "probe_losses": [round(x, 4) for x in probe_losses],
        "video_losses": [round(x, 4) for x in video_losses],
        "video_steps": len(video_losses),
        "vision_phase": vision_log,
        "command": "python -m training.train " + " ".join(sys.argv[1:]) if sys.argv else "",
        "config": asdict(cfg),
        "steps": step,
        "vision_steps": vision_log[-1]["step"] if vision_log else 0,
        "train_minutes": round(minutes, 2),
        "samples_seen": seen,
        "torch_threads": torch.get_num_threads(),
    }
    if out is not None:
        report = save(model, processor, out, report, test_samples)
        if verbose:
            print("test", json.dumps(report["test_accuracy"]))
    return model, processor, report


def save(model, processor, out: Path, report: dict, test_samples: int = SPLITS["test"]) -> dict:
    """Write float16 safetensors + processor files, then `measure` the saved copy and write `training.json`.
    Returns the report with the test results added."""
    out.mkdir(parents=True, exist_ok=True)
    copy = copy_module(model).to(torch.float16)
    copy.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return measure(out, test_samples)


def measure(out: Path, test_samples: int = SPLITS["test"]) -> dict:
    """Reload the saved model as float32 (what users load), answer the first `test_samples` questions of the test
    split (and, for a model trained on video, the first of the video test clips) and store the accuracy per category
    and every answer in `out/training.json`; returns the report."""
    from tokenzip.loading import load_vlm

    report = json.loads((out / "training.json").read_text())
    family = report["config"]["family"]
    version = report["config"].get("data_version", "v1")
    loaded, loaded_processor = load_vlm(out, dtype="float32")
    start = time.perf_counter()
    got: list[str] = []
    report["test_accuracy"] = evaluate(
        loaded, loaded_processor, family, "test", test_samples, record=got, version=version
    )
    report["test_answers"] = got
    report["test_minutes"] = round((time.perf_counter() - start) / 60, 2)
    if report["config"].get("video_share"):
        video = min(VIDEO_TEST, test_samples)
        clips: list[str] = []
        report["video_test_accuracy"] = evaluate_video(
            loaded, loaded_processor, family, "test", video, record=clips, version=version
        )
        report["video_test_answers"] = clips
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def copy_module(model):
    import copy

    return copy.deepcopy(model)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=FAMILIES, default="llava")
    ap.add_argument("--data-version", choices=("v1", "v2"), default=TrainConfig.data_version)
    ap.add_argument("--global-weight", type=float, default=None, help="default: 1 for v2 data, 0 for v1")
    ap.add_argument("--vision-width", type=int, default=TrainConfig.vision_width, help="tower width (0 = default)")
    ap.add_argument("--arch", choices=("", "v1", "v2"), default="", help="LLM size of another data version")
    ap.add_argument("--minutes", type=float, default=TrainConfig.minutes)
    ap.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    ap.add_argument("--vision-share", type=float, default=TrainConfig.vision_share)
    ap.add_argument("--tower-trainable-layers", type=int, default=TrainConfig.tower_trainable_layers)
    ap.add_argument("--video-share", type=float, default=TrainConfig.video_share)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--vision-batch-size", type=int, default=TrainConfig.vision_batch_size, help="0 = --batch-size")
    ap.add_argument("--glyph-weight", type=float, default=TrainConfig.glyph_weight)
    ap.add_argument("--extra-turns", type=int, default=TrainConfig.extra_turns, help="extra questions per image")
    ap.add_argument(
        "--question-rounds", type=int, default=TrainConfig.question_rounds, help="draws of one question per category"
    )
    ap.add_argument("--answer-probe-weight", type=float, default=None, help="default: RECIPE's (0 v1, 1 v2)")
    ap.add_argument("--phrase-probe-weight", type=float, default=None, help="default: RECIPE's (0 v1, 1 v2)")
    ap.add_argument(
        "--context-dropout", type=float, default=None, help="share of images losing unneeded tokens (default: RECIPE's)"
    )
    ap.add_argument("--init", default="", help="experiments: start from this saved model's weights")
    ap.add_argument("--attention-weight", type=float, default=TrainConfig.attention_weight)
    ap.add_argument("--grid-heads", action="store_true", help="noun -> object in one head per grid (OneVision)")
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--warmup", type=int, default=None, help="default: RECIPE's (150 for v1, 60 for v2)")
    ap.add_argument(
        "--zero-residual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decoder layers start as the identity (default: RECIPE's, on for v2)",
    )
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    ap.add_argument("--eval-samples", type=int, default=TrainConfig.eval_samples)
    ap.add_argument("--out", type=Path, default=None, help="directory for the trained model (default: not saved)")
    a = ap.parse_args(argv)
    cfg = TrainConfig(
        family=a.family,
        data_version=a.data_version,
        global_weight=a.global_weight,
        vision_width=a.vision_width,
        arch=a.arch,
        minutes=a.minutes,
        max_steps=a.max_steps,
        vision_share=a.vision_share,
        tower_trainable_layers=a.tower_trainable_layers,
        video_share=a.video_share,
        batch_size=a.batch_size,
        vision_batch_size=a.vision_batch_size,
        glyph_weight=a.glyph_weight,
        extra_turns=a.extra_turns,
        question_rounds=a.question_rounds,
        answer_probe_weight=a.answer_probe_weight,
        phrase_probe_weight=a.phrase_probe_weight,
        grid_heads=a.grid_heads,
        context_dropout=a.context_dropout,
        init=a.init,
        attention_weight=a.attention_weight,
        lr=a.lr,
        warmup=a.warmup,
        zero_residual=a.zero_residual,
        seed=a.seed,
        eval_every=a.eval_every,
        eval_samples=a.eval_samples,
    )
    train(cfg, a.out)


if __name__ == "__main__":
    main()
