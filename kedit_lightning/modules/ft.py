"""The fine-tuning baseline as a LightningModule: evaluation only, nothing to meta-train.

`trainer.validate(FTModule(spec), datamodule)` scores plain fine-tuning of the same edited
layers with the same metrics as the learned editors.
"""

from __future__ import annotations

from collections.abc import Sequence

from kedit_lightning.backbones import Backbone, BackboneSpec
from kedit_lightning.editors.ft import FineTune
from kedit_lightning.evaluation import HOPS, Protocol
from kedit_lightning.modules.editing import EditorModule


class FTModule(EditorModule):
    def __init__(
        self,
        backbone: BackboneSpec,
        lr: float = 1e-2,
        steps: int = 1,
        hops: Sequence[str] = HOPS,
        logged_edits: int = 4,
        protocol: Protocol = "kedit",
    ) -> None:
        super().__init__(backbone, hops, logged_edits, protocol)
        self.save_hyperparameters()
        self.editor = FineTune(lr=lr, steps=steps)

    def build_editor(self, backbone: Backbone) -> None:
        """Nothing to build: fine-tuning has no trained parts."""
