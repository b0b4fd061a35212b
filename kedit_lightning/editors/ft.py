"""Fine-tuning baseline: plain gradient descent on the edited layers, on the edit alone.

Given the same layers and the same budget of gradient steps as a learned editor (MEND uses one
gradient of the edit loss), this is what the edit would do without meta-learning, so every
report can show what meta-training buys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from data_modules.encoding import SubBatch
from kedit_lightning.backbones.base import Backbone
from kedit_lightning.editors.losses import masked_nll


class FineTune(nn.Module):
    """`steps` steps of SGD with learning rate `lr` on the edit's NLL, on the backbone's edited weights."""

    def __init__(self, lr: float = 1e-2, steps: int = 1) -> None:
        super().__init__()
        self.lr = lr
        self.steps = steps

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain data: `FineTune.from_config(config)` rebuilds it (for artifacts)."""
        return {"lr": self.lr, "steps": self.steps}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FineTune:
        return cls(**config)

    def forward(
        self, backbone: Backbone, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        current = (
            dict(params) if params is not None else {n: p.detach() for n, p in backbone.editable_parameters().items()}
        )
        with torch.enable_grad():
            for _ in range(self.steps):
                leaves = {n: w.detach().requires_grad_() for n, w in current.items()}
                loss = masked_nll(backbone(sub_batch, leaves), sub_batch["labels"])
                grads = torch.autograd.grad(loss, list(leaves.values()))
                current = {n: (w - self.lr * g).detach() for (n, w), g in zip(leaves.items(), grads)}
        return current
