"""Built-in configs of real checkpoints, typed in from their public `config.json` files (no download).

`build_config(name, text_layers=None)` returns the transformers config; a model built from it on the meta
device (`torch.device("meta")`) costs no memory and is what `tokenzip flops` and the FLOP-counter checks use;
`--random-weights` benchmarks instantiate it for real (optionally with fewer layers).

Values: llava-hf/llava-1.5-{7b,13b}-hf, Qwen/Qwen2.5-VL-{3B,7B}-Instruct, Qwen/Qwen2-VL-{2B,7B}-Instruct,
Qwen/Qwen3-VL-{2B,8B}-Instruct, llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf,
llava-hf/llava-v1.6-{vicuna,mistral}-7b-hf. Only what shapes compute is reproduced (no token ids beyond the
placeholders, no generation settings).
"""

from __future__ import annotations

from typing import Any

CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=26,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=False,
)
QWEN25_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
    hidden_act="silu",
)
QWEN2_VISION = dict(  # Qwen2-VL's tower (the same in 2B and 7B but for the merger's output width, `hidden_size`)
    depth=32,
    embed_dim=1280,
    mlp_ratio=4,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    hidden_act="quick_gelu",
)
QWEN3_TEXT = dict(  # Qwen3-VL's decoders: explicit head_dim, interleaved M-RoPE (`mrope_interleaved`)
    vocab_size=151936,
    head_dim=128,
    num_key_value_heads=8,
    max_position_embeddings=262144,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_bias=False,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
)
QWEN3_VISION = dict(  # Qwen3-VL's towers: learned position embeddings (48 x 48 table), 16 px patches, DeepStack
    num_heads=16,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=2304,
    hidden_act="gelu_pytorch_tanh",
)
QWEN3_TOP = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)

BUILTIN: dict[str, dict[str, Any]] = {
    "llava-1.5-7b": dict(
        family="llava",
        vision=CLIP_L_336,
        text=dict(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        top=dict(image_token_index=32000, image_seq_length=576, vision_feature_layer=-2),
    ),
    "llava-1.5-13b": dict(
        family="llava",
        vision=CLIP_L_336,
        text=dict(
            vocab_size=32064,
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        top=dict(image_token_index=32000, image_seq_length=576, vision_feature_layer=-2),
    ),
    "llava-v1.6-vicuna-7b": dict(  # LLaVA-NeXT: anyres tiles on llava_next.PINPOINTS, CLS dropped ('default')
        family="llava_next",
        vision=CLIP_L_336,
        text=dict(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            pad_token_id=0,
        ),
        top=dict(image_token_index=32000, image_seq_length=576),
    ),
    "llava-v1.6-mistral-7b": dict(
        family="llava_next",
        vision=CLIP_L_336,
        text=dict(
            model_type="mistral",
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            sliding_window=None,
        ),
        top=dict(image_token_index=32000, image_seq_length=576),
    ),
    "qwen2.5-vl-3b": dict(
        family="qwen2_5_vl",
        vision={**QWEN25_VISION, "out_hidden_size": 2048},
        text=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        top=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652),
    ),
    "qwen2.5-vl-7b": dict(
        family="qwen2_5_vl",
        vision={**QWEN25_VISION, "out_hidden_size": 3584},
        text=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        top=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652),
    ),
    "qwen2-vl-2b": dict(
        family="qwen2_vl",
        vision={**QWEN2_VISION, "hidden_size": 1536},
        text=dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        top=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652),
    ),
    "qwen2-vl-7b": dict(
        family="qwen2_vl",
        vision={**QWEN2_VISION, "hidden_size": 3584},
        text=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        top=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652),
    ),
    # Qwen3-VL: the values of the two public config.json files as quoted (verbatim JSON) in third-party code; the
    # Hugging Face pages themselves could not be opened offline. Every value below appears in at least one such copy.
    "qwen3-vl-2b": dict(
        family="qwen3_vl",
        vision={
            **QWEN3_VISION,
            "depth": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "out_hidden_size": 2048,
            "deepstack_visual_indexes": [5, 11, 17],
        },
        text={
            **QWEN3_TEXT,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "tie_word_embeddings": True,
        },
        top={**QWEN3_TOP, "tie_word_embeddings": True},
    ),
    "qwen3-vl-8b": dict(
        family="qwen3_vl",
        vision={
            **QWEN3_VISION,
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "out_hidden_size": 4096,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        text={
            **QWEN3_TEXT,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "tie_word_embeddings": False,
        },
        top={**QWEN3_TOP, "tie_word_embeddings": False},
    ),
    "llava-onevision-qwen2-0.5b": dict(
        family="llava_onevision",
        vision=SIGLIP_SO400M,
        text=dict(
            vocab_size=152000,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        top=dict(image_token_index=151646, video_token_index=151647),
    ),
    "llava-onevision-qwen2-7b": dict(
        family="llava_onevision",
        vision=SIGLIP_SO400M,
        text=dict(
            vocab_size=152128,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
        ),
        top=dict(image_token_index=151646, video_token_index=151647),
    ),
}


def builtin_names() -> list[str]:
    return sorted(BUILTIN)


def build_config(name: str, text_layers: int | None = None, vision_layers: int | None = None):
    """The transformers config of built-in model `name` (optionally with fewer LLM / vision layers): the family's
    adapter builds it from the typed-in `text` / `vision` / `top` settings."""
    from .adapters import adapter_class

    if name not in BUILTIN:
        raise KeyError(f"unknown built-in model {name!r}; built-in: {', '.join(builtin_names())}")
    spec = BUILTIN[name]
    text = dict(spec["text"])
    vision = dict(spec["vision"])
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    return adapter_class(spec["family"]).build_config(text, vision, spec["top"], vision_layers)


def model_class(family: str):
    """The transformers model class of `family` (its adapter's first model class)."""
    import transformers

    from .adapters import adapter_class

    return getattr(transformers, adapter_class(family).model_classes[0])
