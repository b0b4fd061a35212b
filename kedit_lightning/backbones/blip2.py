"""BLIP-2 (Li et al., 2023) on transformers' Blip2ForConditionalGeneration with a decoder-only LM (OPT).

Layout, as Blip2Processor writes it: `num_query_tokens` <image> placeholders come first, then
BOS, then the prompt; the model swaps the placeholders for the projected Q-Former outputs. The
tokenizer therefore does not add BOS itself: the prompt layout writes it after the placeholders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessorPil

from data_modules.encoding import PromptFormat
from kedit_lightning.backbones.base import register
from kedit_lightning.backbones.image_text import ImageTextBackbone
from kedit_lightning.backbones.loading import (
    check_image_token,
    check_vocab,
    reject_placeholders,
    with_special_token,
)

IMAGE_TOKEN = "<image>"


def blip_image_processor(image_size: int) -> BlipImageProcessorPil:
    """BLIP-2's evaluation transform: resize to a square, CLIP mean/std (the class defaults)."""
    return BlipImageProcessorPil(size={"height": image_size, "width": image_size})


def init_query_tokens(model: nn.Module) -> None:
    """Draw the learned queries from N(0, initializer_range), as BLIP-2's own code does.

    transformers zero-fills them (its checkpoints always overwrite them), but all-zero queries
    sit where the Q-Former's input LayerNorm (eps 1e-12) has gradients of order 1e6, which makes
    training a randomly initialised model diverge.
    """
    if model.query_tokens.is_meta:
        return
    with torch.no_grad():
        model.query_tokens.normal_(mean=0.0, std=model.config.initializer_range)


@register
class Blip2Backbone(ImageTextBackbone):
    family: ClassVar[str] = "blip2"
    model_class = Blip2ForConditionalGeneration
    config_class = Blip2Config
    model_types = frozenset({"blip-2"})
    image_token = IMAGE_TOKEN
    language_model_prefix = "language_model."
    causal_lm_wrapper = True
    default_image_processor = staticmethod(blip_image_processor)
    prompt_template: ClassVar[PromptFormat] = PromptFormat(
        with_image="{image}{prompt}", text_only="{prompt}", image_token=IMAGE_TOKEN
    )

    def __init__(
        self,
        model: Blip2ForConditionalGeneration,
        tokenizer: Any,
        image_processor: Any | None = None,
        edit_params: Sequence[str] = (),
        max_length: int | None = None,
    ) -> None:
        config = model.config
        source = config.name_or_path or "blip2 config"
        if not config.use_decoder_only_language_model:
            raise ValueError(
                f"{source}: BLIP-2 with an encoder-decoder language model ({config.text_config.model_type}) "
                "is not supported; logits must align with input_ids"
            )
        tokenizer = with_special_token(tokenizer, IMAGE_TOKEN)
        if config.image_token_index is None:
            # Checkpoints from before transformers placed image tokens in the text: add the slot as Blip2Processor does.
            config.image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        image_token_id = check_image_token(tokenizer, IMAGE_TOKEN, config.image_token_index, source)
        check_vocab(tokenizer, config.text_config.vocab_size, source)
        if tokenizer.bos_token is None:
            raise ValueError(f"{source}: the tokenizer has no BOS token, which BLIP-2 places after the image tokens")
        tokenizer.add_bos_token = False
        bos = tokenizer.bos_token
        prompt_format = PromptFormat(
            with_image="{image}" + bos + "{prompt}",
            text_only=bos + "{prompt}",
            image_token=IMAGE_TOKEN,
            num_image_tokens=config.num_query_tokens,
        )
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

    @classmethod
    def build_model(
        cls, config: Mapping[str, Any], dtype: torch.dtype | str = torch.float32
    ) -> Blip2ForConditionalGeneration:
        model = super().build_model(config, dtype)
        init_query_tokens(model)
        return model

    def model_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        if pixel_values is None:
            # Text-only sub-batches (locality) run the language model alone.
            reject_placeholders(input_ids, self.image_token_id, self.family)
            return self.model.language_model(input_ids=input_ids, attention_mask=attention_mask).logits
        return self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
