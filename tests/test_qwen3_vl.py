"""Qwen3-VL specifics: DeepStack features follow the tokens a stage keeps, per-frame video items, frames -> inputs.

The shared contract tests (conftest FAMILIES) cover keep=1.0, cache, batches, backends and FLOPs; these check what
only Qwen3-VL has. DeepStack adds, after decoder layers 0..2 of the tiny model, per-visual-token features computed
before the LLM; a kept token must receive exactly its own features (those the unpruned model adds at the original
position it stands for), and nothing may be added to text tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny, image_inputs, video_inputs

import tokenzip
from tokenzip.frames import processor_inputs
from tokenzip.frames import video_inputs as frame_inputs
from tokenzip.tiny import dummy_image


@pytest.fixture
def recorder(monkeypatch):
    """Records every `_deepstack_process` call of Qwen3-VL (hidden in / out, mask, features) and, while a patch is
    active, the layout the engine says the layer ran on (set `state["patch"]`)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    real = Qwen3VLTextModel._deepstack_process
    calls: list[dict] = []
    state: dict = {"patch": None}

    def record(self, hidden, mask, embeds):
        out = real(self, hidden, mask, embeds)
        patch = state["patch"]
        layout = None
        if patch is not None and patch._runtime is not None and patch._runtime.state is not None:
            layout = patch._runtime.state.current
        calls.append(dict(hidden=hidden.clone(), out=out, mask=mask.clone(), embeds=embeds.clone(), layout=layout))
        return out

    monkeypatch.setattr(Qwen3VLTextModel, "_deepstack_process", record)
    return calls, state


def _features_by_position(calls: list[dict]) -> list[dict[tuple[int, int], torch.Tensor]]:
    """Per DeepStack layer of an unpruned forward: (sample, prompt position) -> the features added there."""
    out = []
    for call in calls:
        positions = call["mask"].nonzero().tolist()  # row-major, the order of the features
        out.append({(b, p): call["embeds"][k] for k, (b, p) in enumerate(positions)})
    return out


def _assert_own_features(full: list[dict], pruned: list[dict], expect_dropped: bool | None) -> None:
    """Every DeepStack call of the pruned forward added to each slot exactly the unpruned features of the original
    position it holds (nothing to text slots, nothing to padding)."""
    assert len(pruned) == len(full) == 3
    dropped = False
    for layer, (want, call) in enumerate(zip(full, pruned)):
        layout = call["layout"]
        assert layout is not None
        hidden, out = call["hidden"], call["out"]
        assert hidden.shape[1] == layout.length
        expected = hidden.clone()
        n_visual = 0
        for b in range(layout.batch):
            for s in range(layout.length):
                key = (b, int(layout.orig[b, s]))
                if bool(layout.valid[b, s]) and key in want:
                    expected[b, s] = hidden[b, s] + want[key]
                    n_visual += 1
        assert torch.equal(out, expected), f"DeepStack layer {layer}: a token received features not its own"
        assert int(call["mask"].sum()) == n_visual
        dropped |= n_visual < len(want)
    assert expect_dropped is None or dropped == expect_dropped


def _run(vlm, inputs, recorder, policy=None, keep=1.0, **options):
    calls, state = recorder
    calls.clear()
    with torch.no_grad():
        if policy is None:
            logits = vlm.model(**inputs).logits
        else:
            with tokenzip.apply(vlm.model, policy, keep, **options) as patch:
                state["patch"] = patch
                logits = vlm.model(**inputs).logits
            state["patch"] = None
    return logits, list(calls)


@pytest.mark.parametrize(
    "policy, options",
    [
        ("random", {}),  # pre-LLM, unordered
        ("divprune", {}),  # pre-LLM
        ("holitom", {}),  # pre-LLM merges (values): the representative token gets its own features
        ("fastv", {"layer": 1}),  # in-LLM before DeepStack layers 1 and 2
        ("random", {"stage": "llm", "layer": 2}),  # in-LLM before the last DeepStack layer
        ("visiondrop", {}),  # pre-LLM and in-LLM stages
        ("mustdrop", {}),  # merges before the LLM, in-LLM and decode stages (none before layer 3 here)
        ("atp", {}),  # (in-LLM stages after the DeepStack layers on this model)
    ],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_kept_tokens_receive_exactly_their_own_deepstack_features(recorder, policy, options, batch):
    vlm = get_tiny("qwen3_vl", "sdpa")
    inputs = image_inputs(vlm, batch)
    _, full = _run(vlm, inputs, recorder)
    _, pruned = _run(vlm, inputs, recorder, policy, 0.25, **options)
    later = policy in ("mustdrop", "atp")  # their stages come after the DeepStack layers of this model
    _assert_own_features(_features_by_position(full), pruned, expect_dropped=None if later else True)


def test_deepstack_on_a_video_follows_each_frame(recorder):
    vlm = get_tiny("qwen3_vl", "sdpa")
    inputs = video_inputs(vlm)
    _, full = _run(vlm, inputs, recorder)
    _, pruned = _run(vlm, inputs, recorder, "random", 0.25)
    _assert_own_features(_features_by_position(full), pruned, expect_dropped=True)


def test_deepstack_on_an_image_and_a_video_in_one_prompt(recorder):
    """The model joins image and video DeepStack features in prompt order; each kept token still gets its own."""
    vlm = get_tiny("qwen3_vl", "sdpa")
    prompt = vlm.prompt("What shape appeared ?", images=1, video=True)
    frames = [dummy_image(128, 128, k) for k in range(4)]
    image = dummy_image(96, 128, 9)
    inputs = processor_inputs(vlm.processor, vlm.model.config, "qwen3_vl", [prompt], [image], [frames])
    _, full = _run(vlm, inputs, recorder)
    _, pruned = _run(vlm, inputs, recorder, "fastv", 0.25, layer=1)
    _assert_own_features(_features_by_position(full), pruned, expect_dropped=True)


@pytest.mark.parametrize("policy", ["random", "fastv"])
def test_keep_one_passes_deepstack_through_untouched(recorder, policy):
    vlm = get_tiny("qwen3_vl", "sdpa")
    inputs = image_inputs(vlm, 2)
    before, full = _run(vlm, inputs, recorder)
    same, kept = _run(vlm, inputs, recorder, policy, 1.0)
    assert torch.equal(same, before)
    for a, b in zip(full, kept):
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["embeds"], b["embeds"])


def test_the_deepstack_wrapper_is_removed_with_the_patch():
    vlm = get_tiny("qwen3_vl", "sdpa")
    lm = vlm.model.model.language_model
    assert "_deepstack_process" not in lm.__dict__
    patch = tokenzip.apply(vlm.model, "random", 0.5)
    assert "_deepstack_process" in lm.__dict__
    patch.remove()
    assert "_deepstack_process" not in lm.__dict__


def test_a_video_is_one_item_per_temporal_patch():
    vlm = get_tiny("qwen3_vl", "sdpa")
    inputs = video_inputs(vlm)  # 4 frames -> 2 temporal patches of 4x4 tokens, each its own framed run
    with torch.no_grad(), tokenzip.apply(vlm.model, "random", 0.5) as patch:
        vlm.model(**inputs)
    items = patch.stats.last.samples[0].items
    assert [(it.modality, it.tokens) for it in items] == [("video", 16), ("video", 16)]
    assert [it.kept for it in items] == [8, 8]


def test_frames_become_time_stamped_frame_blocks_like_the_processor():
    """`tokenzip.frames` lays a Qwen3-VL video out as `Qwen3VLProcessor.replace_video_token` does."""
    from transformers import Qwen3VLProcessor

    vlm = get_tiny("qwen3_vl", "sdpa")
    frames = [dummy_image(128, 128, k) for k in range(5)]  # odd: the last frame is repeated
    built = frame_inputs(vlm.processor, vlm.model.config, "qwen3_vl", [frames], fps=2.0)
    assert built.tensors["video_grid_thw"].tolist() == [[3, 8, 8]]
    assert "second_per_grid_ts" not in built.tensors
    times = Qwen3VLProcessor._calculate_timestamps(None, list(range(5)), 2.0, 2)
    want = "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * 16 + "<|vision_end|>" for t in times)
    assert built.texts == [want]
    prompt = vlm.prompt("What shape appeared ?", images=0, video=True)
    inputs = processor_inputs(vlm.processor, vlm.model.config, "qwen3_vl", [prompt], [], [frames])
    video_id = vlm.model.config.video_token_id
    assert int((inputs["input_ids"] == video_id).sum()) == 3 * 16
    start = vlm.model.config.vision_start_token_id
    assert int((inputs["input_ids"] == start).sum()) == 3  # one block per temporal patch, no outer wrapper
    with torch.no_grad():
        before = vlm.model(**inputs).logits
        with tokenzip.apply(vlm.model, "divprune", 1.0):
            assert torch.equal(vlm.model(**inputs).logits, before)
        with tokenzip.apply(vlm.model, "divprune", 0.25):
            assert vlm.model(**inputs).logits.shape[1] < before.shape[1]


def test_the_built_in_configs_build():
    from tokenzip.configs import build_config

    for name, layers in (("qwen3-vl-2b", (28, 24, [5, 11, 17])), ("qwen3-vl-8b", (36, 27, [8, 16, 24]))):
        config = build_config(name)
        assert config.text_config.num_hidden_layers == layers[0]
        assert config.vision_config.depth == layers[1]
        assert list(config.vision_config.deepstack_visual_indexes) == layers[2]
        short = build_config(name, text_layers=4, vision_layers=10)
        assert [i for i in short.vision_config.deepstack_visual_indexes] == [i for i in layers[2] if i < 10]
