"""What the image-text families (BLIP-2, LLaVA, MiniGPT-4) share: random weights from a config
dict, loading a transformers directory, and the end of construction (default image processor,
its size check, default edited layers). A family names its model and config classes, the model
types its directories may declare, its image placeholder token, where its language model sits
and its default image transform; its `__init__` (tokenizer checks, prompt layout) and
`model_logits` stay its own.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from transformers import PretrainedConfig, PreTrainedModel

from data_modules.encoding import PromptFormat, SubBatchEncoder
from kedit_lightning.backbones.base import Backbone
from kedit_lightning.backbones.loading import (
    as_dtype,
    check_image_size,
    default_edit_params,
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

    @staticmethod
    @abstractmethod
    def default_image_processor(image_size: int) -> Any:
        """The family's own image transform, used when a directory or caller gives none."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        image_processor: Any | None,
        edit_params: Sequence[str],
        max_length: int | None,
        *,
        prompt_format: PromptFormat,
        image_token_id: int,
        source: str,
    ) -> None:
        """Called by the families' `__init__` once their tokenizer checks and prompt layout are done."""
        config = model.config
        image_size = config.vision_config.image_size
        image_processor = image_processor if image_processor is not None else self.default_image_processor(image_size)
        check_image_size(image_processor, image_size, source)
        edit_params = list(edit_params) or default_edit_params(
            config.text_config, self.language_model_prefix, causal_wrapper=self.causal_lm_wrapper
        )
        super().__init__(model, SubBatchEncoder(tokenizer, image_processor, prompt_format, max_length), edit_params)
        self.image_token_id = image_token_id

    @property
    def language_config(self) -> Any:
        return self.model.config.text_config

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
    ) -> ImageTextBackbone:
        tokenizer, image_processor = resolve_processor(processor, tokenizer, image_processor, cls.family)
        tokenizer = with_special_token(tokenizer, cls.image_token)
        config = {**config, "text_config": fill_text_config(config.get("text_config"), tokenizer)}
        config.setdefault("image_token_index", tokenizer.convert_tokens_to_ids(cls.image_token))
        return cls(cls.build_model(config, dtype), tokenizer, image_processor, edit_params, max_length)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        edit_params: Sequence[str] = (),
        dtype: torch.dtype = torch.float32,
        *,
        max_length: int | None = None,
    ) -> ImageTextBackbone:
        read_config_dict(path, cls.family, cls.model_types)
        model = cls.model_class.from_pretrained(path, dtype=as_dtype(dtype))
        return cls(model, load_tokenizer(path), load_image_processor(path), edit_params, max_length)
