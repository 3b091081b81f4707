"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): the adapter's anyres geometry against the model's own packing,
the stages it refuses and why, and the built-in configs' token counts. The shared contract tests (keep=1.0, cache,
batches, backends, budgets, FLOPs) run on it through `conftest.FAMILIES`."""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny

import tokenzip
from tokenzip.adapters import get_adapter
from tokenzip.errors import UnsupportedModelError
from tokenzip.pricing import meta_model, workload
from tokenzip.tiny import dummy_image

SIZES = [(112, 100), (100, 60), (56, 56), (60, 170), (170, 60), (4000, 1)]  # (width, height): every pinpoint grid


def _features(vlm, inputs):
    args = {k: inputs[k] for k in ("pixel_values", "image_sizes")}
    with torch.no_grad():
        return args, vlm.model.model.get_image_features(**args)


@pytest.mark.parametrize("size", SIZES)
def test_item_shapes_match_the_models_packing_and_the_processors_placeholders(size):
    vlm = get_tiny("llava_next", "sdpa")
    adapter = get_adapter(vlm.model)
    inputs = vlm.inputs([dummy_image(*size)], vlm.prompt())
    arguments, out = _features(vlm, inputs)
    (shape,) = adapter.item_shapes("image", arguments, out)  # check=True: lengths verified against the output
    assert shape.length == int((inputs["input_ids"] == vlm.model.config.image_token_id).sum())
    g = adapter.grid
    base, tiles = shape.parts
    assert (base.rows, base.cols, base.newline_per_row) == (g, g, False) and shape.leading == shape.trailing == 0
    assert tiles.newline_per_row and tiles.offset == g * g
    assert shape.vision_rows == (0, int(adapter._tiles_per_image(arguments)[0]))
    # the newline tokens are the model's learned image_newline, exactly where the shape puts them
    packed = out.pooler_output[0]
    newline = vlm.model.model.image_newline
    assert torch.equal(packed[shape.newline_mask()], newline.expand(int(shape.newline_mask().sum()), -1))
    assert not (packed[shape.content_mask()] == newline).all(-1).any()


def test_every_image_of_a_multi_image_prompt_is_tiled():
    """Unlike OneVision (base grid + one newline per image of a multi-image sample), LLaVA-NeXT tiles each image."""
    vlm = get_tiny("llava_next", "sdpa")
    adapter = get_adapter(vlm.model)
    inputs = vlm.inputs([[dummy_image(56, 56, 1), dummy_image(70, 50, 2)]], [vlm.prompt("What", images=2)])
    arguments, out = _features(vlm, inputs)
    shapes = adapter.item_shapes("image", arguments, out)
    assert [len(s.parts) for s in shapes] == [2, 2] and all(s.parts[1].newline_per_row for s in shapes)
    assert sum(s.length for s in shapes) == int((inputs["input_ids"] == vlm.model.config.image_token_id).sum())
    assert shapes[1].vision_rows[0] == shapes[0].vision_rows[1]


def test_no_anyres_max_downsampling():
    """A 3 x 1 tile image keeps its full un-padded tile grid (OneVision would not shrink it either at this size,
    but the adapter must never apply anyres_max: LLaVA-NeXT has no such setting)."""
    vlm = get_tiny("llava_next", "sdpa")
    adapter = get_adapter(vlm.model)
    size = torch.tensor([[60, 170]])  # (H, W): best fit 1 x 3 tiles of 56 px
    rows, cols = adapter._highres_grid(size[0], {"image_sizes": size})
    assert (rows, cols) == adapter._unpadded_grid(size[0])
    assert cols == 3 * adapter.grid


@pytest.mark.parametrize("size", [(112, 100), (100, 60)])
def test_vision_scores_follow_the_packed_features(size):
    """Per-tile tower scores land on the LLM tokens the model packs each tile's patches into: scoring the
    projected features themselves (a CLS column in front, as the tower's rows have) reproduces the packed output,
    NaN at the newlines."""
    vlm = get_tiny("llava_next", "sdpa")
    adapter = get_adapter(vlm.model)
    inputs = vlm.inputs([dummy_image(*size)], vlm.prompt())
    arguments, out = _features(vlm, inputs)
    shapes = adapter.item_shapes("image", arguments, out)
    n_tiles = shapes[0].vision_rows[1]
    with torch.no_grad():
        tower = vlm.model.model.vision_tower(inputs["pixel_values"][0, :n_tiles], output_hidden_states=True)
        projected = vlm.model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:])
    rows = torch.cat([torch.full_like(projected[:, :1], float("nan")), projected], 1)  # [tiles, 1 + g*g, D]
    (mapped,) = adapter.vision_scores_to_items("image", rows, shapes, arguments)
    content = shapes[0].content_mask()
    assert torch.isnan(mapped[~content]).all()
    torch.testing.assert_close(mapped[content], out.pooler_output[0][content], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("options", "stage"), [({"stage": "vision", "layer": 1}, "vision-tower")])
def test_tower_stages_are_refused_with_the_reason(options, stage):
    vlm = get_tiny("llava_next", "sdpa")
    with pytest.raises(UnsupportedModelError, match=f"{stage} stage is not supported on llava_next"):
        tokenzip.apply(vlm.model, "random", 0.5, **options)
    info = get_adapter(vlm.model).info()
    assert info.vision_has_cls and not info.supports_vision_stage and not info.supports_projector_stage
    assert info.supports_compact_positions
    with pytest.raises(tokenzip.errors.PolicyOptionError, match="r_scope"):
        tokenzip.apply(vlm.model, "mustdrop", 0.5, r_scope="batch")


def test_cls_signal_reaches_the_items():
    """HoloV scores with CLIP's CLS row on LLaVA-NeXT (column 0 of each tile, never a grid cell)."""
    vlm = get_tiny("llava_next", "sdpa")
    inputs = vlm.inputs([dummy_image(112, 100)], vlm.prompt())
    with torch.no_grad(), tokenzip.apply(vlm.model, "holov", 0.25) as patch:
        logits = vlm.model(**inputs).logits
    assert torch.isfinite(logits).all()
    item = patch.stats.last.samples[0].items[0]
    assert item.kept < item.content


def test_full_strategy_is_refused():
    from tokenzip.adapters.llava_next import LlavaNextAdapter

    vlm = get_tiny("llava_next", "sdpa")
    vlm.model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(UnsupportedModelError, match="vision_feature_select_strategy='full'"):
            LlavaNextAdapter(vlm.model)
    finally:
        vlm.model.config.vision_feature_select_strategy = "default"


def test_videos_are_refused_in_examples():
    with pytest.raises(ValueError, match="LLaVA-NeXT-Video"):
        get_adapter(get_tiny("llava_next", "sdpa").model).example_items(frames=4)


@pytest.mark.parametrize("name", ["llava-v1.6-vicuna-7b", "llava-v1.6-mistral-7b"])
def test_builtin_configs(name):
    model = meta_model(name)
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    text = model.config.text_config
    assert text.model_type == ("mistral" if "mistral" in name else "llama")
    assert getattr(text, "sliding_window", None) is None
    assert model.config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    work = workload(model)  # 672 x 672: base 24 x 24 + 2 x 2 tiles un-padded to 48 x 48 + 48 newlines
    assert [s.length for s in work.shapes] == [576 + 48 * 49] and work.vision_rows == 5
    wide = workload(model, image_size=(336, 1008))  # 1 x 3 tiles: 24 x 72 + 24 newlines
    assert [s.length for s in wide.shapes] == [576 + 24 * 73]


def test_lmms_eval_model_loads_a_saved_checkpoint(tmp_path):
    """`tokenzip_llava_next` (pyproject entry point -> manifest -> class) loads a saved LLaVA-NeXT directory and
    answers under a policy through lmms-eval's input path."""
    from pathlib import Path

    import tomllib

    from tokenzip.evaluation.lmms_model import MODEL_NAMES, TokenzipLlavaNext
    from tokenzip.evaluation.manifests import LLAVA_NEXT, MANIFESTS
    from tokenzip.evaluation.media import build_inputs

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    entry = project["project"]["entry-points"]["lmms_eval.models"]["tokenzip_llava_next"]
    assert entry == "tokenzip.evaluation.manifests:LLAVA_NEXT" and LLAVA_NEXT in MANIFESTS
    assert LLAVA_NEXT.simple_class_path.endswith(".TokenzipLlavaNext")
    assert MODEL_NAMES["llava_next"] == LLAVA_NEXT.model_id
    vlm = get_tiny("llava_next", "sdpa")
    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    lmm = TokenzipLlavaNext(pretrained=str(tmp_path), policy="pool", keep=0.25, agreement=False)
    assert type(lmm.model).__name__ == "LlavaNextForConditionalGeneration"
    images = [[dummy_image(112, 100, 0)], [dummy_image(100, 60, 1)]]
    prompts = [lmm._prompt("What is in the image ?", v) for v in images]
    inputs = build_inputs(lmm.model, lmm.processor, lmm.family, prompts, images)
    answers, record, _ = lmm._run("pool", 0.25, {}, inputs, {"max_new_tokens": 2}, [], None)
    assert len(answers) == 2 and all(s.items[0].kept < s.items[0].content for s in record.samples)
