"""Backbone families behind one interface (see base.Backbone)."""

from kedit_lightning.backbones.base import Backbone, BackboneSpec, build_backbone, expand_braces, register

__all__ = ["Backbone", "BackboneSpec", "build_backbone", "expand_braces", "register"]
