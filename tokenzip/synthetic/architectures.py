"""The untrained starting points of the bundled tiny models: real HF classes, sized for CPU training.

Each builder returns `(model, processor)` with freshly initialised weights and a word-level tokenizer whose
vocabulary covers every question and answer of `tokenzip.synthetic` (plus the chat-template words).

* ``llava``: `LlavaForConditionalGeneration`, 192 px images, 16 px patches -> 12x12 = 144 visual tokens (+ CLS in
  the tower, dropped by the 'default' strategy), CLIP tower of 5 layers (features of layer -2), Llama of 8 layers.
* ``qwen2_5_vl``: `Qwen2_5_VLForConditionalGeneration`, 336 px images, 14 px patches, windowed tower (window 112 px,
  full attention in blocks 1 and 3), 2x2 merger -> 12x12 = 144 LLM tokens per image, M-RoPE Qwen2 LLM of 8 layers.
* ``llava_onevision``: `LlavaOnevisionForConditionalGeneration`, SigLIP tower on 96 px tiles (16 px patches, 6x6 per
  tile), anyres grid up to 2x2 tiles plus the base image and one newline token per row, Qwen2 LLM of 8 layers.
"""

from __future__ import annotations

from ..testing.tiny import (
    LLAVA_CHAT_TEMPLATE,
    OV_CHAT_TEMPLATE,
    OV_SPECIALS,
    QWEN_CHAT_TEMPLATE,
    QWEN_SPECIALS,
    _ov_image_only_processor_cls,
    _qwen_image_only_processor_cls,
)
from .vocabulary import vocabulary

FAMILIES = ("llava", "qwen2_5_vl", "llava_onevision")
RENDER_SIDE = 336  # synthetic images are rendered at this size (training and the lmms-eval task); processors resize
IMAGE_SIDE = {"llava": 192, "qwen2_5_vl": 336, "llava_onevision": 192}  # what each model sees
VIDEO_SIDE = {"qwen2_5_vl": 112, "llava_onevision": 96}
TEXT = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


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


def build_llava():
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    side, patch = IMAGE_SIDE["llava"], 16
    tok = word_tokenizer(["<image>"])
    vcfg = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=5,
        num_attention_heads=4,
        image_size=side,
        patch_size=patch,
        projection_dim=128,
    )
    tcfg = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **TEXT,
    )
    cfg = LlavaConfig(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(side // patch) ** 2,
    )
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    improc = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    proc = LlavaProcessor(
        image_processor=improc,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, proc


def build_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    side = IMAGE_SIDE["qwen2_5_vl"]
    tok = word_tokenizer(QWEN_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text_config = dict(
        vocab_size=len(tok),
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=tok.bos_token_id,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=tok.pad_token_id,
        **TEXT,
    )
    vision_config = dict(
        depth=4,
        hidden_size=96,
        intermediate_size=384,
        num_heads=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        out_hidden_size=TEXT["hidden_size"],
        fullatt_block_indexes=[1, 3],
        tokens_per_second=2,
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    improc = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": side * side}, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    proc = _qwen_image_only_processor_cls()(image_processor=improc, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    return model, proc


def build_llava_onevision():
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tile, patch = 96, 16
    tok = word_tokenizer(OV_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in OV_SPECIALS}
    pinpoints = [[tile * a, tile * b] for a in (1, 2) for b in (1, 2)]
    vcfg = SiglipVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=tile,
        patch_size=patch,
        vision_use_head=False,
    )
    tcfg = Qwen2Config(
        vocab_size=len(tok),
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=tok.pad_token_id,
        **TEXT,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    improc = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    proc = _ov_image_only_processor_cls()(
        image_processor=improc,
        tokenizer=tok,
        num_image_tokens=(tile // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=OV_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    return model, proc


BUILDERS = {"llava": build_llava, "qwen2_5_vl": build_qwen2_5_vl, "llava_onevision": build_llava_onevision}


def build(family: str):
    """Fresh `(model, processor)` of `family` (one of `FAMILIES`), weights from the current torch seed."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {list(FAMILIES)}")
    return BUILDERS[family]()
