"""Fine-tuning baseline: plain gradient descent on the edited layers, on the edit alone.

Given the same layers and the same budget of gradient steps as a learned editor (MEND uses one
gradient of the edit loss), this is what the edit would do without meta-learning, so every
report can show what meta-training buys. A step's update lr * sum_t delta_t x_t^T is low-rank, so
it is a `WeightEditedModel` group like MEND's; each step is a group on top of the previous one.
"""

from __future__ import annotations

from typing import Any

import torch

from kedit_lightning.editors.edited_model import StepInputs, WeightEditedModel, WeightEditor, new_edit_groups


class FineTune(WeightEditor):
    """`steps` steps of SGD with learning rate `lr` on the edit's NLL, on the backbone's edited weights."""

    def __init__(self, lr: float = 1e-2, steps: int = 1) -> None:
        super().__init__()
        self.lr = lr
        self.steps = steps

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain data: `FineTune.from_config(config)` rebuilds it (for artifacts)."""
        return {"lr": self.lr, "steps": self.steps}

    def forward(
        self,
        model: WeightEditedModel,
        inputs: StepInputs,
        rows: torch.Tensor,
        on_top_of: torch.Tensor | None = None,
        batched: bool = False,
    ) -> torch.Tensor:
        """As `MEND.forward`: each row's (or, `batched`, all rows') edit as `steps` gradient steps."""
        groups = on_top_of
        for _ in range(self.steps):
            new, weights = new_edit_groups(model, len(rows), groups, batched)
            factors, row_of = model.capture(inputs, rows, groups, weights)
            for name, (x, delta) in factors.items():
                model.add({name: (self.lr * delta, x)}, new[row_of[name]])
            groups = new
        return groups
