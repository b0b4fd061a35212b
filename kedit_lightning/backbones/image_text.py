"""What the image-text families (BLIP-2, LLaVA, MiniGPT-4) share: random weights from a config
dict, and loading a transformers directory. A family names its model and config classes, the
model types its directories may declare, and its image placeholder token; its `__init__`
(prompt layout, checks) and `model_logits` stay its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from transformers import PretrainedConfig, PreTrainedModel

from kedit_lightning.backbones.base import Backbone
from kedit_lightning.backbones.loading import (
    as_dtype,
    fill_text_config,
    load_image_processor,
    load_tokenizer,
    read_config_dict,
    resolve_processor,
    with_special_token,
)


class ImageTextBackbone(Backbone):
    model_class: ClassVar[type[PreTrainedModel]]
    config_class: ClassVar[type[PretrainedConfig]]
    model_types: ClassVar[frozenset[str]]
    image_token: ClassVar[str]

    @classmethod
    def build_model(cls, config: Mapping[str, Any], dtype: torch.dtype | str = torch.float32) -> PreTrainedModel:
        """Random weights from the family's config kwargs (nested sub-config dicts)."""
        return cls.model_class._from_config(cls.config_class(**config), dtype=as_dtype(dtype))

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        processor: str | None = None,
        edit_params: Sequence[str] = (),
        dtype: torch.dtype = torch.float32,
        *,
        tokenizer: Any | None = None,
        image_processor: Any | None = None,
        max_length: int | None = None,
    ) -> "ImageTextBackbone":
        tokenizer, image_processor = resolve_processor(processor, tokenizer, image_processor, cls.family)
        tokenizer = with_special_token(tokenizer, cls.image_token)
        config = {**config, "text_config": fill_text_config(config.get("text_config"), tokenizer)}
        config.setdefault("image_token_index", tokenizer.convert_tokens_to_ids(cls.image_token))
        return cls(cls.build_model(config, dtype), tokenizer, image_processor, edit_params, max_length)

    @classmethod
    def from_pretrained(cls, path: str, edit_params: Sequence[str] = (), dtype: torch.dtype = torch.float32, *, max_length: int | None = None) -> "ImageTextBackbone":
        read_config_dict(path, cls.family, cls.model_types)
        model = cls.model_class.from_pretrained(path, dtype=as_dtype(dtype))
        return cls(model, load_tokenizer(path), load_image_processor(path), edit_params, max_length)
