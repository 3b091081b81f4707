"""Video inputs built from frames without a video processor (`tokenzip.frames`)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tokenzip.frames import expand_placeholders, processor_inputs, video_inputs
from tokenzip.tiny import tiny


def frame(seed: int, side: int = 112) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def qwen():
    return tiny("qwen2_5_vl", text_layers=2, max_side=112)


@pytest.fixture(scope="module")
def onevision():
    return tiny("llava_onevision")


def test_qwen_pairs_of_equal_frames_are_the_image_patches(qwen):
    """A clip whose frames come in identical pairs [a, a, b, b] holds exactly the patches of the images a and b
    (an image fills both temporal slots with itself)."""
    a, b = frame(0), frame(1)
    built = video_inputs(qwen.processor, qwen.model.config, "qwen2_5_vl", [[a, a, b, b]])
    images = qwen.processor.image_processor([a, b], return_tensors="pt")
    assert torch.equal(built.tensors["pixel_values_videos"], images["pixel_values"])
    ((t, h, w),) = built.tensors["video_grid_thw"].tolist()
    assert (t, h, w) == (2, 8, 8)
    assert built.tokens == [2 * 8 * 8 // 4]


def test_qwen_temporal_slots_hold_consecutive_frames(qwen):
    """Temporal patch j holds frame 2j in slot 0 and frame 2j+1 in slot 1; an odd last frame is repeated."""
    frames = [frame(k) for k in range(5)]
    built = video_inputs(qwen.processor, qwen.model.config, "qwen2_5_vl", [frames])
    pv = built.tensors["pixel_values_videos"].view(3, 64, 3, 2, 14, 14)
    single = [qwen.processor.image_processor([f], return_tensors="pt")["pixel_values"] for f in frames]
    single = [s.view(64, 3, 2, 14, 14)[:, :, 0] for s in single]
    for j in range(3):
        for slot in range(2):
            assert torch.equal(pv[j, :, :, slot], single[min(2 * j + slot, 4)])
    assert built.tensors["second_per_grid_ts"].tolist() == [1.0]


def test_qwen_video_prompt_runs_and_marks_video_tokens(qwen):
    prompt = qwen.prompt("What shape appeared ?", images=0, video=True)
    qwen.processor.tokenizer.padding_side = "left"
    clips = [[frame(k) for k in range(4)], [frame(k) for k in range(4, 10)]]
    inputs = processor_inputs(qwen.processor, qwen.model.config, "qwen2_5_vl", [prompt, prompt], [], clips)
    video_id = qwen.model.config.video_token_id
    assert (inputs["input_ids"] == video_id).sum(-1).tolist() == [2 * 16, 3 * 16]
    assert torch.equal(inputs["mm_token_type_ids"] == 2, inputs["input_ids"] == video_id)
    with torch.no_grad():
        logits = qwen.model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_onevision_video_matches_the_model_token_count(onevision):
    prompt = onevision.prompt("What shape appeared ?", images=0, video=True)
    clips = [[frame(k, 96) for k in range(4)], [frame(k, 120) for k in range(4, 8)]]
    inputs = processor_inputs(onevision.processor, onevision.model.config, "llava_onevision", [prompt] * 2, [], clips)
    side = onevision.model.config.vision_config.image_size
    assert inputs["pixel_values_videos"].shape == (2, 4, 3, side, side)
    with torch.no_grad():
        logits = onevision.model(**inputs).logits  # the model refuses a placeholder count that does not match
    assert torch.isfinite(logits).all()


def test_onevision_frames_are_normalised_like_images(onevision):
    """A frame already at the tower's size is only rescaled and normalised, with the image processor's mean/std."""
    side = onevision.model.config.vision_config.image_size
    f = frame(3, side)
    built = video_inputs(onevision.processor, onevision.model.config, "llava_onevision", [[f]])
    improc = onevision.processor.image_processor
    pixels = torch.tensor(list(f.getdata()), dtype=torch.float32).view(side, side, 3).permute(2, 0, 1) / 255
    want = (pixels - torch.tensor(improc.image_mean)[:, None, None]) / torch.tensor(improc.image_std)[:, None, None]
    assert torch.allclose(built.tensors["pixel_values_videos"][0, 0], want, atol=1e-6)


def test_onevision_refuses_mixed_frame_counts(onevision):
    clips = [[frame(0, 96)] * 4, [frame(1, 96)] * 6]
    with pytest.raises(ValueError, match="one frame count"):
        video_inputs(onevision.processor, onevision.model.config, "llava_onevision", clips)


def test_llava_takes_no_video():
    llava = tiny("llava")
    with pytest.raises(ValueError, match="takes no video"):
        video_inputs(llava.processor, llava.model.config, "llava", [[frame(0)]])


def test_expand_placeholders_counts():
    assert expand_placeholders("a<v>b<v>c", "<v>", iter([2, 1])) == "a<v><v>b<v>c"
    with pytest.raises(ValueError, match="more <v> placeholders"):
        expand_placeholders("<v><v>", "<v>", iter([1]))


def test_qwen_refuses_frames_of_different_sizes(qwen):
    with pytest.raises(ValueError, match="share one size"):
        video_inputs(qwen.processor, qwen.model.config, "qwen2_5_vl", [[frame(0, 112), frame(1, 56)]])
