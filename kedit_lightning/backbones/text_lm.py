"""Text-only language models (any AutoModelForCausalLM: OPT, LLaMA, GPT-2, ...), from a directory,
a hub id or a GGUF file.

For text-only editing and as SERAC's counterfactual model. The prompt is the record's text as
is; a sub-batch that carries images is an error, not silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from data_modules.encoding import PromptFormat, SubBatchEncoder
from kedit_lightning.backbones.base import Backbone, register
from kedit_lightning.backbones.loading import (
    as_dtype,
    check_vocab,
    default_edit_params,
    fill_text_config,
    load_tokenizer,
    pretrained_location,
    read_config_dict,
    resolve_tokenizer,
)


@register
class TextLMBackbone(Backbone):
    family: ClassVar[str] = "text"
    prompt_template: ClassVar[PromptFormat] = PromptFormat(with_image="{prompt}", text_only="{prompt}")

    def __init__(
        self, model: PreTrainedModel, tokenizer: Any, edit_params: Sequence[str] = (), max_length: int | None = None
    ) -> None:
        config = model.config
        check_vocab(tokenizer, config.vocab_size, config.name_or_path or f"{config.model_type} config")
        edit_params = list(edit_params) or default_edit_params(config, "", causal_wrapper=True)
        super().__init__(model, self.sub_batch_encoder(tokenizer, max_length), edit_params)

    @classmethod
    def sub_batch_encoder(cls, tokenizer: Any, max_length: int | None = None) -> SubBatchEncoder:
        """How a text LM's sub-batches are tokenized: the prompt as it is, no image processor."""
        return SubBatchEncoder(tokenizer, None, cls.prompt_template, max_length)

    @staticmethod
    def build_model(config: Mapping[str, Any], dtype: torch.dtype | str = torch.float32) -> PreTrainedModel:
        """Random weights from config kwargs that name their `model_type` (e.g. "opt", "llama", "gpt2")."""
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                "text backbone config needs `model_type` naming a causal LM (e.g. 'opt', 'llama', 'gpt2'); "
                f"got {model_type!r}"
            )
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=as_dtype(dtype))

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        processor: str | None = None,
        edit_params: Sequence[str] = (),
        dtype: torch.dtype = torch.float32,
        *,
        tokenizer: Any | None = None,
        max_length: int | None = None,
    ) -> TextLMBackbone:
        tokenizer = resolve_tokenizer(processor, tokenizer, cls.family)
        return cls(cls.build_model(fill_text_config(config, tokenizer), dtype), tokenizer, edit_params, max_length)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        edit_params: Sequence[str] = (),
        dtype: torch.dtype = torch.float32,
        *,
        max_length: int | None = None,
    ) -> TextLMBackbone:
        """`path`: a directory, hub id or .gguf file (dequantized into plain weights: editable, and saved
        by `save_pretrained` as an ordinary safetensors directory)."""
        config = read_config_dict(path, cls.family, set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
        source, kwargs = pretrained_location(path)
        if kwargs:
            # The config as read above: parsing a GGUF file's metadata again costs seconds.
            kwargs.update(quantization_config=GgufConfig(dequantize=True), config=AutoConfig.for_model(**config))
        model = AutoModelForCausalLM.from_pretrained(source, dtype=as_dtype(dtype), **kwargs)
        return cls(model, load_tokenizer(path), edit_params, max_length)

    def model_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        if pixel_values is not None:
            raise ValueError("text backbone: the sub-batch has pixel_values, but a text LM reads text only")
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
