"""Image-only processors of the families whose full processor needs a video processor (and torchvision).

`ProcessorMixin` derives its sub-processors from the `__init__` signature, so these subclasses drop the video
processor argument there; everything else is the transformers processor.
"""

from __future__ import annotations


def qwen_image_only_processor_cls():
    """`Qwen2_5_VLProcessor` without a video processor (video processors need torchvision).

    `ProcessorMixin` derives its sub-processors from the `__init__` signature, so the argument is removed there.
    """
    from transformers import Qwen2_5_VLProcessor

    class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return Qwen2_5_VLImageOnlyProcessor


def qwen2_vl_image_only_processor_cls():
    """`Qwen2VLProcessor` without a video processor (see `qwen_image_only_processor_cls`)."""
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return Qwen2VLImageOnlyProcessor


def qwen3_vl_image_only_processor_cls():
    """`Qwen3VLProcessor` without a video processor (see `qwen_image_only_processor_cls`)."""
    from transformers import Qwen3VLProcessor

    class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return Qwen3VLImageOnlyProcessor


def ov_image_only_processor_cls():
    """`LlavaOnevisionProcessor` without a video processor (see `qwen_image_only_processor_cls`)."""
    from transformers import LlavaOnevisionProcessor

    class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
        def __init__(
            self,
            image_processor=None,
            tokenizer=None,
            num_image_tokens=None,
            vision_feature_select_strategy=None,
            chat_template=None,
            **kwargs,
        ):
            super().__init__(
                image_processor,
                tokenizer,
                None,
                num_image_tokens=num_image_tokens,
                vision_feature_select_strategy=vision_feature_select_strategy,
                chat_template=chat_template,
                **kwargs,
            )

    return LlavaOnevisionImageOnlyProcessor
