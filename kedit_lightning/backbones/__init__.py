"""Backbone families behind one interface (see base.Backbone).

Importing this package registers every family, so `build_backbone(spec)` can build any of them.
"""

from pathlib import Path

import yaml

from kedit_lightning.backbones.base import Backbone, BackboneSpec, build_backbone, expand_braces, register
from kedit_lightning.backbones.blip2 import Blip2Backbone
from kedit_lightning.backbones.llava import LlavaBackbone
from kedit_lightning.backbones.llava_onevision import LlavaOnevisionBackbone
from kedit_lightning.backbones.minigpt4 import (
    MiniGPT4Backbone,
    MiniGPT4Config,
    MiniGPT4ForConditionalGeneration,
    load_minigpt4_projection,
)
from kedit_lightning.backbones.qwen2_vl import Qwen2VLBackbone
from kedit_lightning.backbones.text_lm import TextLMBackbone

FAMILIES: dict[str, type[Backbone]] = {
    cls.family: cls
    for cls in (Blip2Backbone, LlavaBackbone, LlavaOnevisionBackbone, MiniGPT4Backbone, Qwen2VLBackbone, TextLMBackbone)
}


def load_backbone_spec(path: str | Path) -> BackboneSpec:
    """Read a BackboneSpec from a YAML file (its keys are the BackboneSpec fields)."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of BackboneSpec fields, got {type(data).__name__}")
    unknown = set(data) - set(BackboneSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"{path}: unknown BackboneSpec fields {sorted(unknown)}; known: {sorted(BackboneSpec.__dataclass_fields__)}"
        )
    if data.get("family") not in FAMILIES:
        raise ValueError(f"{path}: family {data.get('family')!r} is not one of {sorted(FAMILIES)}")
    return BackboneSpec(**data)


__all__ = [
    "FAMILIES",
    "Backbone",
    "BackboneSpec",
    "Blip2Backbone",
    "LlavaBackbone",
    "LlavaOnevisionBackbone",
    "MiniGPT4Backbone",
    "MiniGPT4Config",
    "MiniGPT4ForConditionalGeneration",
    "Qwen2VLBackbone",
    "TextLMBackbone",
    "build_backbone",
    "expand_braces",
    "load_backbone_spec",
    "load_minigpt4_projection",
    "register",
]
