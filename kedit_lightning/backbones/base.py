"""The one interface every backbone family satisfies.

Everything family-specific (image placeholder tokens, Q-Former, projector, prompt layout) lives
in the family's own file; editors and LightningModules only see this class.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from data_modules.encoding import SubBatch, SubBatchEncoder

# Config keys that say where or how a model was stored, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "architectures",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_commit_hash",
    "_attn_implementation_autoset",
}


def expand_braces(pattern: str) -> list[str]:
    """`layers.{29,30,31}.fc{1,2}.weight` -> the six names it stands for (shell-style braces)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for option in match.group(1).split(",") for name in expand_braces(head + option + tail)]


def _stable_config_dict(config: Any) -> dict:
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in sorted(value.items()) if k not in _VOLATILE_CONFIG_KEYS}
        return value

    return clean(config.to_dict())


class Backbone(nn.Module, ABC):
    """A frozen multimodal (or text) LM that scores EditBatch sub-batches.

    `forward(sub_batch)` returns logits aligned with `sub_batch["labels"]`: `logits[:, t]` is the
    model's distribution for `labels[:, t]` (the causal shift is done here, once, so losses and
    metrics compare positions directly). `forward(sub_batch, params)` runs the same model with
    some parameters replaced functionally, which is how editors apply an edit and still
    backpropagate into the editor.
    """

    family: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str, edit_params: Sequence[str], dtype: torch.dtype = torch.float32) -> Backbone:
        """Real weights and processor from a hub id or a local directory; a clear error otherwise."""

    @classmethod
    @abstractmethod
    def from_config(
        cls,
        config: dict[str, Any],
        processor: str | None,
        edit_params: Sequence[str],
        dtype: torch.dtype = torch.float32,
    ) -> Backbone:
        """Random weights of any size from transformers config kwargs."""

    def __init__(self, model: nn.Module, processor: SubBatchEncoder, edit_params: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.model.requires_grad_(False)
        self.edit_param_names = self.resolve_param_names(edit_params)

    @abstractmethod
    def model_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """Unshifted logits [B, T, V] for every position of `input_ids` (image placeholders included)."""

    def forward(self, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if params:
            # Re-enter this method with the given tensors standing in for the named parameters.
            return functional_call(self, {f"model.{name}": value for name, value in params.items()}, (sub_batch,))
        logits = self.model_logits(sub_batch["input_ids"], sub_batch["attention_mask"], sub_batch.get("pixel_values"))
        # Position t-1 predicts token t; position 0 predicts nothing (its label is always -100).
        return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, N, D]: each image as the language model reads it (the N embeddings that replace its placeholders).

        Every multimodal family's model follows transformers' `get_image_features(pixel_values)`,
        which returns these as a tensor, as `pooler_output` (BLIP-2), or as a list of per-image
        tensors there (LLaVA).
        """
        get_image_features = getattr(self.model, "get_image_features", None)
        if get_image_features is None:
            raise TypeError(
                f"{self.family} backbone: {type(self.model).__name__} has no vision side to read image features from"
            )
        features = get_image_features(pixel_values=pixel_values)
        features = getattr(features, "pooler_output", features)
        return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features

    def resolve_param_names(self, patterns: Sequence[str]) -> list[str]:
        """Expand brace patterns into exact parameter names of `self.model`, failing on unknown ones."""
        available = dict(self.model.named_parameters())
        names: list[str] = []
        for pattern in patterns:
            for name in expand_braces(pattern):
                if name not in available:
                    close = [n for n in available if n.rsplit(".", 2)[-1] == name.rsplit(".", 2)[-1]][:5]
                    raise KeyError(
                        f"{type(self).__name__}: no parameter named {name!r} (from pattern {pattern!r}); similar: {close}"
                    )
                if name not in names:
                    names.append(name)
        return names

    def editable_parameters(self, patterns: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
        """The parameters an editor changes, by name as in `self.model.named_parameters()`."""
        names = self.edit_param_names if patterns is None else self.resolve_param_names(patterns)
        params = dict(self.model.named_parameters())
        return {name: params[name] for name in names}

    def fingerprint(self) -> dict[str, Any]:
        """What an exported editor must match: family, config hash, edited names and shapes."""
        config_json = json.dumps(_stable_config_dict(self.model.config), sort_keys=True)
        return {
            "family": self.family,
            "config_hash": hashlib.sha256(config_json.encode()).hexdigest()[:16],
            "edit_params": {name: list(p.shape) for name, p in self.editable_parameters().items()},
        }

    def save_pretrained(self, path: str | Path) -> None:
        """Write the model and its tokenizer / image processor as an ordinary transformers directory."""
        self.model.save_pretrained(path)
        self.processor.tokenizer.save_pretrained(path)
        if self.processor.image_processor is not None:
            self.processor.image_processor.save_pretrained(path)


@dataclass
class BackboneSpec:
    """A backbone as data, for YAML configs and editor artifacts.

    Exactly one of `pretrained` (hub id or local directory, real weights) and `config`
    (transformers config kwargs, random weights of any size) is set. With `config`,
    `processor` names where the tokenizer / image processor come from (hub id or directory).
    `bootstrap` is a BackboneModule fit config (YAML) that trains the `pretrained` directory
    when it does not exist yet: how the quick start gets a base model that knows its world.
    """

    family: str
    edit_params: list[str] = field(default_factory=list)
    pretrained: str | None = None
    config: dict[str, Any] | None = None
    processor: str | None = None
    dtype: str = "float32"
    bootstrap: str | None = None

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.config is None):
            raise ValueError(f"BackboneSpec({self.family!r}): set exactly one of `pretrained` and `config`")


_FAMILIES: dict[str, type[Backbone]] = {}


def register(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make a family buildable by name from a BackboneSpec."""
    _FAMILIES[cls.family] = cls
    return cls


def build_backbone(spec: BackboneSpec) -> Backbone:
    if spec.family not in _FAMILIES:
        raise KeyError(f"unknown backbone family {spec.family!r}; known: {sorted(_FAMILIES)}")
    cls = _FAMILIES[spec.family]
    dtype = getattr(torch, spec.dtype)
    if spec.pretrained is not None:
        return cls.from_pretrained(spec.pretrained, edit_params=spec.edit_params, dtype=dtype)
    return cls.from_config(spec.config, processor=spec.processor, edit_params=spec.edit_params, dtype=dtype)
