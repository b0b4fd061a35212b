"""The unedited model as an editor: every edit is a group with nothing in it, so every score is the
pre-edit model's (the table's reference column: Reliability there is how often the model already
gave the new answer, Locality is 1)."""

from __future__ import annotations

from typing import Any

import torch

from kedit_lightning.editors.edited_model import StepInputs, WeightEditedModel, WeightEditor, new_edit_groups


class Unedited(WeightEditor):
    @property
    def config(self) -> dict[str, Any]:
        return {}

    def forward(
        self,
        model: WeightEditedModel,
        inputs: StepInputs,
        rows: torch.Tensor,
        on_top_of: torch.Tensor | None = None,
        batched: bool = False,
    ) -> torch.Tensor:
        return new_edit_groups(model, len(rows), on_top_of, batched)[0]
