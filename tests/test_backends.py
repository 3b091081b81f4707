"""Other ways users load models: accelerate device_map with disk offload, bfloat16, FlashAttention-2."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, POLICY_CASES, apply_case, get_tiny, image_inputs

from tokenzip.reference import cached_greedy, greedy_tokens, uncached_logits
from tokenzip.tiny import tiny


def _device_map(model, offloaded: set[str]) -> dict[str, str]:
    mapping = {}
    lm = model.model.language_model
    for name, _ in model.model.named_children():
        if name != "language_model":
            mapping[f"model.{name}"] = "cpu"
    for name, _ in model.model.named_parameters(recurse=False):  # OneVision's image_newline
        mapping[f"model.{name}"] = "cpu"
    for name, _ in lm.named_children():
        if name == "layers":
            for i in range(len(lm.layers)):
                key = f"model.language_model.layers.{i}"
                mapping[key] = "disk" if key in offloaded else "cpu"
        else:
            mapping[f"model.language_model.{name}"] = "cpu"
    mapping["lm_head"] = "cpu"
    return mapping


@functools.cache
def offloaded(family: str, folder: str):
    """The tiny `family` model saved and reloaded with decoder layers 1, 2 and 5 on disk (accelerate hooks)."""
    plain = get_tiny(family, "sdpa")
    plain.model.save_pretrained(folder)
    on_disk = {"model.language_model.layers.1", "model.language_model.layers.2", "model.language_model.layers.5"}
    model = (
        type(plain.model)
        .from_pretrained(
            folder,
            device_map=_device_map(plain.model, on_disk),
            offload_folder=str(Path(folder) / "offload"),
            attn_implementation="sdpa",
        )
        .eval()
    )
    assert model.model.language_model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {family: str(tmp_path_factory.mktemp(f"offload-{family}")) for family in FAMILIES}


@pytest.mark.parametrize(
    ("family", "case"),
    [(f, c) for f in FAMILIES for c in POLICY_CASES if f == "llava" or c != "random-vision"],  # vision: CLIP only
)
def test_disk_offloaded_model_gives_the_same_tokens(folders, family, case):
    plain = get_tiny(family, "sdpa")
    model = offloaded(family, folders[family])
    inputs = image_inputs(plain, 2)
    with apply_case(plain.model, case, 0.25):
        want, _ = cached_greedy(plain.model, inputs, 3)
    with apply_case(model, case, 0.25) as patch:
        got, _ = cached_greedy(model, inputs, 3)
        sample = patch.stats.last.samples[0]
        assert sample.visual_mean < sample.visual_in or sample.cache_per_layer != sample.sequence_per_layer
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "llava_next", "qwen3_vl"])
@pytest.mark.parametrize(
    "case", ["random", "pool", "fastv", "random-llm", "hiprune", "holov", "visiondrop", "mustdrop", "atp", "holitom"]
)
def test_bfloat16_generation_is_consistent(family, case):
    vlm = tiny(family, dtype=torch.bfloat16)
    inputs = image_inputs(vlm, 2)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    with apply_case(vlm.model, case, 0.25) as patch:
        tokens, logits = cached_greedy(vlm.model, inputs, 3)
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
    assert vlm.model.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference.float(), atol=5e-2, rtol=5e-2)
    assert torch.equal(greedy_tokens(vlm.model, reference)[:, 0], tokens[:, 0])


def _flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(
    not _flash_available(),
    reason="flash_attention_2 needs the flash-attn package and a CUDA GPU (flash-attn cannot be built on CPU-only "
    "machines); tokenzip's hooks use the same code path with 2-D masks",
)
@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_flash_attention_2_matches_sdpa(case):
    results = {}
    for attn in ("sdpa", "flash_attention_2"):
        vlm = tiny("llava", attn=attn, dtype=torch.bfloat16)
        vlm.model.to("cuda")
        inputs = {k: v.to("cuda") for k, v in image_inputs(vlm, 2).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with apply_case(vlm.model, case, 0.25) as patch:
            tokens, _ = cached_greedy(vlm.model, inputs, 3)
            kept = [s.sequence_per_layer for s in patch.stats.last.samples]
        results[attn] = (tokens.cpu(), kept)
    assert results["sdpa"][1] == results["flash_attention_2"][1]
    assert torch.equal(results["sdpa"][0][:, 0], results["flash_attention_2"][0][:, 0])
