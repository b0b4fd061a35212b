"""MiniGPT-4 (Zhu et al., 2023), composed from transformers parts.

Architecture, as the paper defines it: BLIP-2's frozen EVA ViT-g (with its final LayerNorm,
`ln_vision`) and Q-Former with 32 learned queries, one Linear `llama_proj` from the Q-Former
width to the LLM width, and Vicuna (a LLaMA causal LM). Prompt layout:
"###Human: <Img><ImageHere></Img> {prompt}###Assistant:", where <ImageHere> is one placeholder
token per query, replaced by the projected query embeddings.

`MiniGPT4ForConditionalGeneration` is a `PreTrainedModel` with its own config class, so
save_pretrained / from_pretrained work as for any transformers model. `MiniGPT4Backbone.
from_components` builds it from the public pieces: a BLIP-2 checkpoint (vision tower and
Q-Former; MiniGPT-4 used the BLIP-2 FlanT5-XXL stage, "Salesforce/blip2-flan-t5-xxl"), a
Vicuna checkpoint, and the MiniGPT-4 projection `.pth`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub.dataclasses import strict
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Blip2Config,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file

from data_modules.encoding import PromptFormat
from kedit_lightning.backbones.base import register
from kedit_lightning.backbones.blip2 import blip_image_processor
from kedit_lightning.backbones.image_text import ImageTextBackbone
from kedit_lightning.backbones.loading import (
    as_dtype,
    check_image_token,
    check_vocab,
    load_image_processor,
    load_tokenizer,
    read_config_dict,
    reject_placeholders,
    with_special_token,
)

IMAGE_TOKEN = "<ImageHere>"
# Parameters taken from the BLIP-2 checkpoint.
BLIP2_PREFIXES = ("vision_model.", "qformer.", "query_tokens")


@strict
class MiniGPT4Config(PreTrainedConfig):
    """BLIP-2 vision and Q-Former configs, a causal-LM config (LLaMA by default) and the query count."""

    model_type = "minigpt4"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "vision_config": Blip2VisionConfig,
        "qformer_config": Blip2QFormerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    image_token_index: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size


class MiniGPT4ForConditionalGeneration(PreTrainedModel):
    config_class = MiniGPT4Config
    base_model_prefix = "minigpt4"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False  # the Q-Former does not support it
    _no_split_modules = ["Blip2EncoderLayer", "Blip2QFormerLayer", "LlamaDecoderLayer"]

    def __init__(self, config: MiniGPT4Config) -> None:
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        # Named as in the MiniGPT-4 checkpoint, so its state dict loads without renaming.
        self.llama_proj = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MiniGPT4ForConditionalGeneration):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, num_query_tokens, llm_hidden]: ViT (+ ln_vision) -> Q-Former queries -> llama_proj."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = self.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask
        ).last_hidden_state
        return self.llama_proj(query_output.to(self.llama_proj.weight.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        placeholders = input_ids == self.config.image_token_index
        # The placeholder id may lie past the LLM vocabulary (Vicuna has 32000 rows); embed a valid id, then overwrite.
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values).to(inputs_embeds.dtype)
            if int(placeholders.sum()) != image_features.shape[0] * image_features.shape[1]:
                raise ValueError(
                    f"{int(placeholders.sum())} image placeholders for "
                    f"{image_features.shape[0]}x{image_features.shape[1]} image embeddings"
                )
            inputs_embeds = inputs_embeds.masked_scatter(placeholders.unsqueeze(-1), image_features)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


def _read_prefixed_weights(path: str, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Only the tensors under `prefixes` from a (possibly sharded) safetensors checkpoint."""
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = sorted({file for key, file in weight_map.items() if key.startswith(tuple(prefixes))})
        shards = [cached_file(path, file) for file in files]
    else:
        single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
        if single is None:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        shards = [single]
    weights = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as handle:
            weights.update({key: handle.get_tensor(key) for key in handle.keys() if key.startswith(tuple(prefixes))})
    return weights


def load_minigpt4_projection(model: MiniGPT4ForConditionalGeneration, path: str | Path) -> None:
    """Put the public MiniGPT-4 projection (`.pth`, state dict under "model" with
    llama_proj.weight/bias) into `model`."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: expected a dict (with the state dict under 'model'), got {type(checkpoint).__name__}"
        )
    expected = {name: tuple(p.shape) for name, p in model.llama_proj.named_parameters(prefix="llama_proj")}
    for name, shape in expected.items():
        if name not in state:
            raise KeyError(f"{path}: no {name!r} in the checkpoint; keys: {sorted(state)[:8]}")
        if tuple(state[name].shape) != shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(state[name].shape)}, "
                f"the model needs {shape} (Q-Former width -> LLM width)"
            )
    dtype = model.language_model.get_input_embeddings().weight.dtype
    model.load_state_dict({name: state[name].to(dtype) for name in expected}, strict=False, assign=True)


@register
class MiniGPT4Backbone(ImageTextBackbone):
    family: ClassVar[str] = "minigpt4"
    model_class = MiniGPT4ForConditionalGeneration
    config_class = MiniGPT4Config
    model_types = frozenset({MiniGPT4Config.model_type})
    image_token = IMAGE_TOKEN
    language_model_prefix = "language_model."
    causal_lm_wrapper = True
    default_image_processor = staticmethod(blip_image_processor)
    prompt_template: ClassVar[PromptFormat] = PromptFormat(
        with_image="###Human: <Img>{image}</Img> {prompt}###Assistant:",
        text_only="###Human: {prompt}###Assistant:",
        image_token=IMAGE_TOKEN,
    )

    def __init__(
        self,
        model: MiniGPT4ForConditionalGeneration,
        tokenizer: Any,
        image_processor: Any | None = None,
        edit_params: Sequence[str] = (),
        max_length: int | None = None,
    ) -> None:
        config = model.config
        source = config.name_or_path or "minigpt4 config"
        image_token_id = check_image_token(tokenizer, IMAGE_TOKEN, config.image_token_index, source)
        # The placeholder never reaches the embedding table, so it may lie outside the LLM vocabulary.
        check_vocab(tokenizer, config.text_config.vocab_size, source, outside={IMAGE_TOKEN})
        prompt_format = dataclasses.replace(self.prompt_template, num_image_tokens=config.num_query_tokens)
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
    def from_components(
        cls,
        blip2: str,
        llm: str,
        projection: str | Path,
        edit_params: Sequence[str] = (),
        dtype: torch.dtype = torch.float32,
        *,
        max_length: int | None = None,
    ) -> MiniGPT4Backbone:
        """Assemble MiniGPT-4 from a BLIP-2 checkpoint, a Vicuna (LLaMA) checkpoint and the projection `.pth`.

        Only the BLIP-2 vision tower, Q-Former and queries are read (not its language model). The
        model is laid out on the meta device first, so no weights are allocated twice. The
        tokenizer is the LLM's plus the <ImageHere> placeholder; the image processor is BLIP-2's.
        """
        dtype = as_dtype(dtype)
        blip2_config = Blip2Config(**read_config_dict(blip2, cls.family, {"blip-2"}))
        read_config_dict(llm, cls.family, {"llama"})
        tokenizer = with_special_token(load_tokenizer(llm), IMAGE_TOKEN)
        config = MiniGPT4Config(
            vision_config=blip2_config.vision_config.to_dict(),
            qformer_config=blip2_config.qformer_config.to_dict(),
            text_config=AutoConfig.from_pretrained(llm).to_dict(),
            num_query_tokens=blip2_config.num_query_tokens,
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        )
        with torch.device("meta"):
            model = MiniGPT4ForConditionalGeneration._from_config(config, dtype=dtype)
        model.language_model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype)
        model.config.text_config = model.language_model.config
        blip2_weights = {key: value.to(dtype) for key, value in _read_prefixed_weights(blip2, BLIP2_PREFIXES).items()}
        model.load_state_dict(blip2_weights, strict=False, assign=True)
        load_minigpt4_projection(model, projection)
        still_empty = [name for name, p in model.named_parameters() if p.is_meta]
        if still_empty:
            raise ValueError(f"{blip2}: missing {len(still_empty)} vision/Q-Former weights, e.g. {still_empty[:4]}")
        image_processor = load_image_processor(blip2, required=False)
        return cls(model, tokenizer, image_processor, edit_params, max_length)

    def model_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        if pixel_values is None:
            reject_placeholders(input_ids, self.image_token_id, self.family)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
