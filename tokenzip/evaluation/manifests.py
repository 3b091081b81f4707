"""lmms-eval model manifests (entry-point group `lmms_eval.models`); import-light on purpose."""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

LLAVA = ModelManifest(model_id="tokenzip_llava_hf", simple_class_path="tokenzip.evaluation.lmms_model.TokenzipLlava")
QWEN2_5_VL = ModelManifest(
    model_id="tokenzip_qwen2_5_vl", simple_class_path="tokenzip.evaluation.lmms_model.TokenzipQwen2_5_VL"
)
LLAVA_ONEVISION = ModelManifest(
    model_id="tokenzip_llava_onevision", simple_class_path="tokenzip.evaluation.lmms_model.TokenzipLlavaOnevision"
)
QWEN2_VL = ModelManifest(
    model_id="tokenzip_qwen2_vl", simple_class_path="tokenzip.evaluation.lmms_model.TokenzipQwen2VL"
)
LLAVA_NEXT = ModelManifest(
    model_id="tokenzip_llava_next", simple_class_path="tokenzip.evaluation.lmms_model.TokenzipLlavaNext"
)
QWEN3_VL = ModelManifest(
    model_id="tokenzip_qwen3_vl", simple_class_path="tokenzip.evaluation.lmms_model.TokenzipQwen3VL"
)
MANIFESTS = (LLAVA, QWEN2_5_VL, LLAVA_ONEVISION, QWEN2_VL, LLAVA_NEXT, QWEN3_VL)
