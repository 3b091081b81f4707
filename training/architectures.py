"""The untrained starting points of the bundled tiny models: real HF classes, sized for CPU training.

Each builder returns `(model, processor)` with freshly initialised weights and a word-level tokenizer whose
vocabulary covers every question and answer of `tokenzip.synthetic` (plus the chat-template words).

* ``llava``: `LlavaForConditionalGeneration`, 192 px images, 16 px patches -> 12x12 = 144 visual tokens (+ CLS in
  the tower, dropped by the 'default' strategy), CLIP tower of 5 layers (features of layer -2), Llama of 8 layers.
* ``qwen2_5_vl``: `Qwen2_5_VLForConditionalGeneration`, 280 px images, 14 px patches, windowed tower of 4 blocks, 64
  wide with 256-wide MLPs (window 140 px = 2x2 windows per image, full attention in blocks 1 and 3), 2x2 merger ->
  10x10 = 100 LLM tokens per image, M-RoPE Qwen2 LLM of 8 layers. The tower sees 400 patches per image: at 336 px
  (576 patches), 96 wide with 384-wide MLPs, a vision-phase step took 2.0 s on 2 cores against 1.0 s now. On v1
  data, trained 44 minutes with vision batches of 16 and the glyph head weighted 3, it reached 93.6 %; 96 wide it
  got fewer steps and did worse. On v2 (textured backgrounds) the 64-wide tower read few glyphs (80-83 % overall)
  and the bundled `synth-qwen2_5_vl` is 96 wide (`vision_width=96`, 96.6 %).
* ``llava_onevision``: `LlavaOnevisionForConditionalGeneration`, SigLIP tower on 96 px tiles (16 px patches, 6x6 per
  tile), anyres grid up to 2x2 tiles plus the base image and one newline token per row, Qwen2 LLM of 8 layers.

The LLM depends on the dataset version (`TEXT`): the v1 bundles have 8 decoder layers 128 wide. v2 has 20 layers
96 wide (4 heads of 24, 2 KV heads, MLP 288): deep enough that every policy's default in-LLM schedule (FastV at
layer 2, ATP, VisionDrop, HoliTom's inner layer) can reach keep 0.111 under the layer-averaged budget, which needs
at least 19 layers for FastV; a step costs about 1.8x the v1 one on 2 cores (4.0 s against 2.2 s at batch 32).
"""

from __future__ import annotations

from tokenzip.synthetic.vocabulary import vocabulary
from tokenzip.tiny import tiny_llava, tiny_llava_ov, tiny_qwen25vl

FAMILIES = ("llava", "qwen2_5_vl", "llava_onevision")
IMAGE_SIDE = {"llava": 192, "qwen2_5_vl": 280, "llava_onevision": 192}  # what each model sees
TEXT_V1 = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
TEXT_V2 = dict(TEXT_V1, hidden_size=96, intermediate_size=288, num_hidden_layers=20)
TEXT = {"v1": TEXT_V1, "v2": TEXT_V2}  # LLM settings per dataset version
MROPE_SECTION = {"v1": [4, 6, 6], "v2": [4, 4, 4]}  # sums to head_dim / 2 (32 / 24)


def word_tokenizer(specials: list[str]):
    """Whitespace word-level tokenizer over `vocabulary()`; `specials` are never split."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in ["<pad>", "<unk>", "<s>", "</s>", *vocabulary()]:
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok


def _width(default: int, vision_width: int) -> int:
    """The tower width: `vision_width`, or the family's `default` when it is 0."""
    if vision_width < 0 or vision_width % 8:
        raise ValueError(f"vision_width must be 0 (family default) or a positive multiple of 8, got {vision_width}")
    return vision_width or default


def build_llava(seed: int = 0, version: str = "v1", vision_width: int = 0):
    side = IMAGE_SIDE["llava"]
    w = _width(128, vision_width)
    vision = dict(hidden_size=w, intermediate_size=4 * w, num_attention_heads=4, projection_dim=w)
    vlm = tiny_llava(
        image_size=side,
        patch=16,
        vision_layers=5,
        seed=seed,
        tokenizer=word_tokenizer,
        vision_overrides=vision,
        text_overrides={**TEXT[version], "max_position_embeddings": 1024},
    )
    return vlm.model, vlm.processor


def build_qwen2_5_vl(seed: int = 0, version: str = "v1", vision_width: int = 0):
    width = TEXT[version]["hidden_size"]
    w = _width(64, vision_width)
    vision = dict(hidden_size=w, intermediate_size=4 * w, num_heads=4, window_size=140, out_hidden_size=width)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE_SECTION[version]}
    text = {**TEXT[version], "rope_parameters": rope}
    vlm = tiny_qwen25vl(
        max_side=IMAGE_SIDE["qwen2_5_vl"],
        seed=seed,
        tokenizer=word_tokenizer,
        vision_overrides=vision,
        text_overrides=text,
    )
    return vlm.model, vlm.processor


def build_llava_onevision(seed: int = 0, version: str = "v1", vision_width: int = 0):
    w = _width(128, vision_width)
    vision = dict(hidden_size=w, intermediate_size=4 * w, num_attention_heads=4)
    vlm = tiny_llava_ov(
        image_size=96,
        patch=16,
        seed=seed,
        tokenizer=word_tokenizer,
        vision_overrides=vision,
        text_overrides=TEXT[version],
    )
    return vlm.model, vlm.processor


BUILDERS = {"llava": build_llava, "qwen2_5_vl": build_qwen2_5_vl, "llava_onevision": build_llava_onevision}


def build(family: str, seed: int = 0, version: str = "v1", vision_width: int = 0):
    """Fresh `(model, processor)` of `family` (one of `FAMILIES`) for dataset `version` (the LLM size, `TEXT`),
    weights drawn from `seed`; `vision_width` > 0 sets the tower's width (MLPs 4x as wide; 0 = the defaults above)."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {list(FAMILIES)}")
    if version not in TEXT:
        raise ValueError(f"unknown dataset version {version!r}; versions: {list(TEXT)}")
    model, processor = BUILDERS[family](seed, version, vision_width)
    return model.train(), processor
