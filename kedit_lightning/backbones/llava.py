"""LLaVA-1.5 (Liu et al., 2024) on transformers' LlavaForConditionalGeneration.

Layout: "USER: <image>\\n{prompt} ASSISTANT:", with <image> repeated once per visual feature the
projector emits, exactly as LlavaProcessor expands it: one per vision position (patches plus a
CLS token where the tower has one), minus the CLS when vision_feature_select_strategy is
"default" (the model then drops it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

from data_modules.encoding import PromptFormat
from kedit_lightning.backbones.base import register
from kedit_lightning.backbones.image_text import ImageTextBackbone
from kedit_lightning.backbones.loading import (
    check_image_token,
    check_vocab,
    reject_placeholders,
)

IMAGE_TOKEN = "<image>"


def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """LLaVA-1.5's CLIP transform: shortest edge to `image_size`, centre crop, CLIP mean/std."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def num_image_features(model: LlavaForConditionalGeneration) -> int:
    """How many embeddings the projector emits per image (what LlavaProcessor counts)."""
    tower = model.model.vision_tower
    embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "num_positions"):
        raise ValueError(f"cannot count the image positions of a {type(tower).__name__} vision tower")
    return embeddings.num_positions - (1 if model.config.vision_feature_select_strategy == "default" else 0)


@register
class LlavaBackbone(ImageTextBackbone):
    family: ClassVar[str] = "llava"
    model_class = LlavaForConditionalGeneration
    config_class = LlavaConfig
    model_types = frozenset({"llava"})
    image_token = IMAGE_TOKEN
    language_model_prefix = "model.language_model."
    causal_lm_wrapper = False
    default_image_processor = staticmethod(clip_image_processor)
    prompt_template: ClassVar[PromptFormat] = PromptFormat(
        with_image="USER: {image}\n{prompt} ASSISTANT:", text_only="USER: {prompt} ASSISTANT:", image_token=IMAGE_TOKEN
    )

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        tokenizer: Any,
        image_processor: Any | None = None,
        edit_params: Sequence[str] = (),
        max_length: int | None = None,
    ) -> None:
        config = model.config
        source = config.name_or_path or "llava config"
        image_token_id = check_image_token(tokenizer, IMAGE_TOKEN, config.image_token_index, source)
        check_vocab(tokenizer, config.text_config.vocab_size, source)
        prompt_format = dataclasses.replace(self.prompt_template, num_image_tokens=num_image_features(model))
        super().__init__(
            model,
            tokenizer,
            image_processor,
            edit_params,
            max_length,
            prompt_format=prompt_format,
            image_token_id=image_token_id,
            source=source,
        )

    def model_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        if pixel_values is None:
            reject_placeholders(input_ids, self.image_token_id, self.family)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
