"""Tiny, fully offline LLaVA-1.5, Qwen2.5-VL, LLaVA-OneVision, Qwen2-VL and LLaVA-NeXT models with hand-built
processors.

Nothing here downloads anything: tokenizers are word-level vocabularies built in memory, image processors
are the PIL backends constructed directly, and models are instantiated from configs with random weights.
They are the fixtures of the test suite, the models of `tokenzip demo` and of `tokenzip bench --model tiny-*`,
and the starting points of the bundled trained models (`training/architectures.py`).

Sizes (defaults):

* LLaVA-1.5: 112 px image, 14 px patches -> 8x8 = 64 visual tokens, CLIP tower with CLS, 4 layers.
* Qwen2.5-VL: 112x112 image -> 8x8 patches -> 4x4 = 16 LLM tokens after the 2x2 merger; 224x224 -> 64.
* LLaVA-OneVision: 56 px tiles, 14 px patches -> 16 tokens per tile; anyres adds tiles + one newline per row;
  a 4-frame video gives 4 x 2x2 pooled tokens + 1 newline.
* LLaVA-NeXT: 56 px tiles, 14 px patches -> CLS + 16 tokens per tile (CLS dropped before the projector); a base
  tile + 2 to 4 high-resolution tiles, un-padded, one newline per row.
* Qwen3-VL: 16 px patches, so 112 px images are resized to 128 px -> 8x8 patches -> 4x4 = 16 LLM tokens;
  DeepStack from vision blocks 0-2 into decoder layers 0-2; a 4-frame video gives 2 frame blocks of 16 tokens.

All LLMs are Llama/Qwen2 decoders of hidden size 64 (4 query heads, 2 KV heads: GQA is exercised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .processors import (
    ov_image_only_processor_cls,
    qwen2_vl_image_only_processor_cls,
    qwen3_vl_image_only_processor_cls,
    qwen_image_only_processor_cls,
)

WORDS = [
    "USER:",
    "ASSISTANT:",
    "What",
    "is",
    "in",
    "the",
    "image",
    "?",
    "a",
    "cat",
    "dog",
    "Describe",
    "this",
    "video",
    ".",
    "yes",
    "no",
    "system",
    "user",
    "assistant",
    "You",
    "are",
    "helpful",
    "color",
    "shape",
    "red",
    "green",
    "blue",
    "square",
    "circle",
    "left",
    "right",
    "how",
    "many",
    "one",
    "two",
    "three",
]


def make_tokenizer(specials: list[str], extra_words: tuple[str, ...] = ()):
    """A whitespace word-level tokenizer; `specials` become special tokens (never split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in ["<pad>", "<unk>", "<s>", "</s>", *WORDS, *extra_words]:
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=None,
    )
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok


def _with(overrides: dict | None, **base):
    """Config keyword arguments: `base` with `overrides` replacing (or adding) fields."""
    return {**base, **(overrides or {})}


def dummy_image(width: int = 112, height: int = 112, seed: int = 0) -> Image.Image:
    """A deterministic random RGB image."""
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


@dataclass
class TinyVLM:
    """A tiny model, its processor and the token ids a test needs."""

    model: Any
    processor: Any
    family: str

    @property
    def placeholder_ids(self) -> list[int]:
        """Ids of image/video placeholder tokens (suppress them when re-feeding generated ids)."""
        cfg = self.model.config
        ids = [getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)]
        return [int(i) for i in ids if i is not None]

    def prompt(self, text: str = "What is in the image ?", images: int = 1, video: bool = False) -> str:
        """A chat-formatted user prompt with `images` image items (and one video item if `video`)."""
        content: list[dict] = [{"type": "image"} for _ in range(images)]
        if video:
            content.append({"type": "video"})
        content.append({"type": "text", "text": text})
        msgs = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True)

    def inputs(self, images: list[Image.Image] | None, texts: list[str] | str, **kw) -> dict:
        """Processor call with left padding (what generation needs)."""
        self.processor.tokenizer.padding_side = "left"
        batched = not isinstance(texts, str)
        return dict(
            self.processor(
                images=images,
                text=texts,
                padding=batched,
                return_tensors="pt",
                **kw,
            )
        )


# ------------------------------------------------------------------------------------------ LLaVA-1.5
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_llava(
    attn: str = "sdpa",
    image_size: int = 112,
    patch: int = 14,
    vision_layers: int = 4,
    text_layers: int = 24,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer=make_tokenizer,
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
) -> TinyVLM:
    """Tiny `LlavaForConditionalGeneration` (CLIP tower with CLS, feature layer -2, 'default' strategy).

    `tokenizer(specials)` builds the tokenizer; `vision_overrides` / `text_overrides` replace config fields (the
    bundled trained models of `training/architectures.py` are these builders, sized up)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = tokenizer(["<image>"])
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vcfg = CLIPVisionConfig(
        **_with(
            vision_overrides,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=32,
        )
    )
    tcfg = LlamaConfig(
        **_with(
            text_overrides,
            vocab_size=len(tok),
            hidden_size=text_hidden,
            intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    cfg = LlavaConfig(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    improc = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    proc = LlavaProcessor(
        image_processor=improc,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return TinyVLM(model, proc, "llava")


# ------------------------------------------------------------------------------------------ Qwen2.5-VL
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def tiny_qwen25vl(
    attn: str = "sdpa",
    vision_layers: int = 4,
    text_layers: int = 24,
    fullatt_blocks: tuple[int, ...] = (1, 3),
    window_size: int = 56,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_side: int = 224,
    tokenizer=make_tokenizer,
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
) -> TinyVLM:
    """Tiny `Qwen2_5_VLForConditionalGeneration`: windowed vision blocks, 2x2 merger, M-RoPE LLM (images up to
    `max_side` px a side; `tokenizer` and the overrides as in `tiny_llava`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = tokenizer(QWEN_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text_config = _with(
        text_overrides,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=tok.bos_token_id,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=tok.pad_token_id,
    )
    vision_config = _with(
        vision_overrides,
        depth=vision_layers,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=window_size,
        out_hidden_size=64,
        fullatt_block_indexes=list(fullatt_blocks),
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
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    improc = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": max_side * max_side},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    proc = qwen_image_only_processor_cls()(image_processor=improc, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    return TinyVLM(model, proc, "qwen2_5_vl")


def tiny_qwen2vl(
    attn: str = "sdpa",
    vision_layers: int = 4,
    text_layers: int = 24,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_side: int = 224,
    tokenizer=make_tokenizer,
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
) -> TinyVLM:
    """Tiny `Qwen2VLForConditionalGeneration`: full-attention vision blocks, 2x2 merger, M-RoPE LLM (arguments as
    in `tiny_qwen25vl`)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = tokenizer(QWEN_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text_config = _with(
        text_overrides,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=tok.bos_token_id,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=tok.pad_token_id,
    )
    vision_config = _with(
        vision_overrides,
        depth=vision_layers,
        embed_dim=32,
        hidden_size=64,
        mlp_ratio=2,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    cfg = Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    improc = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": max_side * max_side},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    proc = qwen2_vl_image_only_processor_cls()(image_processor=improc, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    return TinyVLM(model, proc, "qwen2_vl")


def qwen_video_inputs(
    vlm: TinyVLM, frames: int = 4, side: int = 112, text: str = "Describe this video ?", seed: int = 0
) -> dict:
    """Hand-built Qwen2.5-VL / Qwen2-VL video inputs (the video processor needs torchvision).

    `frames` raw frames become `frames // 2` temporal patches; each has (side/14)^2 patches and (side/28)^2 LLM
    tokens.
    """
    cfg = vlm.model.config.vision_config
    tp, ps, ms = cfg.temporal_patch_size, cfg.patch_size, cfg.spatial_merge_size
    t, h, w = frames // tp, side // ps, side // ps
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(t * h * w, 3 * tp * ps * ps, generator=g)
    n_tokens = t * h * w // ms**2
    prompt = vlm.prompt(text, images=0, video=True).replace("<|video_pad|>", "<|video_pad|>" * n_tokens)
    enc = vlm.processor.tokenizer(prompt, return_tensors="pt")
    video_id = vlm.model.config.video_token_id
    mm_type = (enc.input_ids == video_id).long() * 2
    inputs = dict(
        input_ids=enc.input_ids,
        attention_mask=enc.attention_mask,
        pixel_values_videos=flat,
        video_grid_thw=torch.tensor([[t, h, w]]),
        mm_token_type_ids=mm_type,
    )
    if hasattr(cfg, "tokens_per_second"):  # Qwen2.5-VL scales video time; Qwen2-VL takes no such input
        inputs["second_per_grid_ts"] = torch.tensor([1.0])
    return inputs


def tiny_qwen3vl(
    attn: str = "sdpa",
    vision_layers: int = 4,
    text_layers: int = 24,
    deepstack: tuple[int, ...] = (0, 1, 2),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_side: int = 224,
    tokenizer=make_tokenizer,
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
) -> TinyVLM:
    """Tiny `Qwen3VLForConditionalGeneration`: full-attention vision blocks with learned position embeddings
    (an 8x8 table, resampled to each image) and 16 px patches, 2x2 merger, DeepStack from vision blocks `deepstack`
    into decoder layers 0 .. len(deepstack) - 1, Qwen3 decoder (q / k norms) with interleaved M-RoPE (arguments as
    in `tiny_qwen25vl`). A 128 px image gives 8x8 patches and 4x4 = 16 LLM tokens."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = tokenizer(QWEN_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text_config = _with(
        text_overrides,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        bos_token_id=tok.bos_token_id,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=tok.pad_token_id,
    )
    vision_config = _with(
        vision_overrides,
        depth=vision_layers,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=64,
        deepstack_visual_indexes=[i for i in deepstack if i < vision_layers],
    )
    cfg = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    improc = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 64 * 64, "longest_edge": max_side * max_side},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
    )
    proc = qwen3_vl_image_only_processor_cls()(image_processor=improc, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    return TinyVLM(model, proc, "qwen3_vl")


def qwen3_video_inputs(
    vlm: TinyVLM, frames: int = 4, side: int = 128, text: str = "Describe this video ?", seed: int = 0, fps: float = 2.0
) -> dict:
    """Hand-built Qwen3-VL video inputs laid out as its processor does (the video processor needs torchvision):
    every temporal patch is its own `<t seconds><|vision_start|>` frame tokens `<|vision_end|>` block, `t` the
    mean time of its frames at `fps`. `frames` raw frames become `frames // 2` temporal patches of (side/16)^2
    patches and (side/32)^2 LLM tokens each; `video_grid_thw` stays one row per video (the model splits it)."""
    cfg = vlm.model.config.vision_config
    tp, ps, ms = cfg.temporal_patch_size, cfg.patch_size, cfg.spatial_merge_size
    t, h, w = frames // tp, side // ps, side // ps
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(t * h * w, 3 * tp * ps * ps, generator=g)
    per_frame = h * w // ms**2
    frame = "<|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>"
    blocks = "".join(f"<{(j * tp + (tp - 1) / 2) / fps:.1f} seconds>" + frame for j in range(t))
    prompt = vlm.prompt(text, images=0, video=True).replace("<|vision_start|><|video_pad|><|vision_end|>", blocks)
    enc = vlm.processor.tokenizer(prompt, return_tensors="pt")
    video_id = vlm.model.config.video_token_id
    return dict(
        input_ids=enc.input_ids,
        attention_mask=enc.attention_mask,
        pixel_values_videos=flat,
        video_grid_thw=torch.tensor([[t, h, w]]),
        mm_token_type_ids=(enc.input_ids == video_id).long() * 2,
    )


# ------------------------------------------------------------------------------------------ LLaVA-OneVision
OV_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
OV_SPECIALS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]


def tiny_llava_ov(
    attn: str = "sdpa",
    image_size: int = 56,
    patch: int = 14,
    vision_layers: int = 4,
    text_layers: int = 24,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer=make_tokenizer,
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
) -> TinyVLM:
    """Tiny `LlavaOnevisionForConditionalGeneration` (SigLIP tower, anyres_max_9 with a 2x2 pinpoint grid;
    `tokenizer` and the overrides as in `tiny_llava`)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = tokenizer(OV_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in OV_SPECIALS}
    pinpoints = [[image_size * a, image_size * b] for a in (1, 2) for b in (1, 2)]
    vcfg = SiglipVisionConfig(
        **_with(
            vision_overrides,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            vision_use_head=False,
        )
    )
    tcfg = Qwen2Config(
        **_with(
            text_overrides,
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            bos_token_id=tok.bos_token_id,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=tok.pad_token_id,
        )
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
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    improc = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints
    )
    proc = ov_image_only_processor_cls()(
        image_processor=improc,
        tokenizer=tok,
        num_image_tokens=(image_size // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=OV_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    return TinyVLM(model, proc, "llava_onevision")


# ------------------------------------------------------------------------------------------ LLaVA-NeXT
def tiny_llava_next(
    attn: str = "sdpa",
    image_size: int = 56,
    patch: int = 14,
    vision_layers: int = 4,
    text_layers: int = 24,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer=make_tokenizer,
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
) -> TinyVLM:
    """Tiny `LlavaNextForConditionalGeneration`: CLIP tower with CLS (feature layer -2, 'default' strategy), Llama
    decoder, anyres tiles of `image_size` px on the real checkpoints' pinpoints scaled down (1x2, 2x1, 2x2, 3x1,
    1x3 tiles); `tokenizer` and the overrides as in `tiny_llava`."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tok = tokenizer(["<image>"])
    image_token_id = tok.convert_tokens_to_ids("<image>")
    pinpoints = [[image_size * a, image_size * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    vcfg = CLIPVisionConfig(
        **_with(
            vision_overrides,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=32,
        )
    )
    tcfg = LlamaConfig(
        **_with(
            text_overrides,
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    cfg = LlavaNextConfig(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    improc = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    proc = LlavaNextProcessor(
        image_processor=improc,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return TinyVLM(model, proc, "llava_next")


def ov_video_inputs(vlm: TinyVLM, frames: int = 4, text: str = "Describe this video ?", seed: int = 0) -> dict:
    """Hand-built LLaVA-OneVision video inputs (the video processor needs torchvision)."""
    cfg = vlm.model.config
    side = cfg.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    pixel_values_videos = torch.randn(1, frames, 3, side, side, generator=g)
    p = side // cfg.vision_config.patch_size
    n_tokens = frames * math.ceil(p / 2) ** 2 + 1
    prompt = vlm.prompt(text, images=0, video=True).replace("<video>", "<video>" * n_tokens)
    enc = vlm.processor.tokenizer(prompt, return_tensors="pt")
    return dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values_videos=pixel_values_videos)


FACTORIES = {
    "llava": tiny_llava,
    "qwen2_5_vl": tiny_qwen25vl,
    "llava_onevision": tiny_llava_ov,
    "qwen2_vl": tiny_qwen2vl,
    "llava_next": tiny_llava_next,
    "qwen3_vl": tiny_qwen3vl,
}


def tiny(family: str, **kw) -> TinyVLM:
    """Build the tiny model of `family` ('llava', 'qwen2_5_vl', 'llava_onevision', 'qwen2_vl', 'llava_next' or
    'qwen3_vl')."""
    if family not in FACTORIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {sorted(FACTORIES)}")
    return FACTORIES[family](**kw)


# the families with video
VIDEO_INPUTS = {
    "qwen2_5_vl": qwen_video_inputs,
    "qwen2_vl": qwen_video_inputs,
    "qwen3_vl": qwen3_video_inputs,
    "llava_onevision": ov_video_inputs,
}


def video_inputs(vlm: TinyVLM, frames: int = 4) -> dict:
    """A one-video prompt of `frames` dummy frames for a tiny model (ValueError for a family without video)."""
    make = VIDEO_INPUTS.get(vlm.family)
    if make is None:
        raise ValueError(f"{vlm.family} has no video input; video families: {sorted(VIDEO_INPUTS)}")
    return make(vlm, frames=frames)
