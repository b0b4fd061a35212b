"""Meta-training MEND (Mitchell et al., "Fast Model Editing at Scale", ICLR 2022).

Each training record is edited on its own, from the frozen backbone's weights, with the
editor's one-shot update; the outer loss then asks the edited model for the new answer on the
rephrased prompt (cedit) and on another image of the same thing (iedit), and for unchanged
output distributions on unrelated text and image inputs (cloc, KL against the unedited model).
Only the editor learns: the hypernetwork at `lr`, the per-layer edit learning rates at `lr_lr`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import grad_norm

from data_modules.encoding import SubBatch
from kedit_lightning.backbones import Backbone, BackboneSpec
from kedit_lightning.editors.losses import masked_kl, masked_nll
from kedit_lightning.editors.mend import MEND
from kedit_lightning.evaluation import HOPS, record_batches
from kedit_lightning.modules.editing import EditorModule


class MENDModule(EditorModule):
    def __init__(
        self,
        backbone: BackboneSpec,
        rank: int = 1920,
        n_hidden: int = 1,
        combine: bool = True,
        norm: bool = True,
        lr: float = 1e-6,
        edit_lr: float = 1e-4,
        lr_lr: float = 1e-4,
        cedit: float = 0.1,
        iedit: float = 0.1,
        cloc: float = 1.0,
        hops: Sequence[str] = HOPS,
        logged_edits: int = 4,
    ) -> None:
        super().__init__(backbone, hops, logged_edits)
        self.save_hyperparameters()
        self.editor: MEND | None = None
        # A buffer, so the count of skipped (non-finite) steps survives checkpoint and resume.
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))

    def build_editor(self, backbone: Backbone) -> None:
        hp = self.hparams
        self.editor = MEND.for_backbone(backbone, rank=hp.rank, n_hidden=hp.n_hidden, combine=hp.combine, norm=hp.norm, edit_lr=hp.edit_lr)

    def edit(self, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return self.editor(self.backbone, sub_batch, params)

    def _record_losses(self, record: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        backbone = self.backbone
        params = self.edit(record["edit_inner"])
        with torch.no_grad():
            pre_loc, pre_loc_image = backbone(record["loc"]), backbone(record["loc_image"])
        return {
            "edit": masked_nll(backbone(record["edit_outer"], params), record["edit_outer"]["labels"]),
            "image_edit": masked_nll(backbone(record["edit_outer_image"], params), record["edit_outer_image"]["labels"]),
            "loc": masked_kl(pre_loc, backbone(record["loc"], params), record["loc"]["labels"])
            + masked_kl(pre_loc_image, backbone(record["loc_image"], params), record["loc_image"]["labels"]),
        }

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        per_record = [self._record_losses(record) for record in record_batches(batch)]
        parts = {key: torch.stack([losses[key] for losses in per_record]).mean() for key in per_record[0]}
        hp = self.hparams
        loss = hp.cedit * parts["edit"] + hp.iedit * parts["image_edit"] + hp.cloc * parts["loc"]
        # Every rank must agree, or DDP would wait forever for the gradients of a skipped rank.
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            self.skipped_steps += 1
            self.log("train/skipped_steps", self.skipped_steps.float(), prog_bar=True)
            return None
        batch_size = len(per_record)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/loss_{k}": v for k, v in parts.items()}, batch_size=batch_size)
        self.log("train/skipped_steps", self.skipped_steps.float())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log_dict({f"editor/{k}": v for k, v in grad_norm(self.editor, norm_type=2).items()})
        for name, lr in zip(self.editor.param_names, self.editor.edit_lrs.detach()):
            self.log(f"edit_lr/{name}", lr)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            [
                {"params": list(self.editor.editor_parameters()), "lr": self.hparams.lr},
                {"params": list(self.editor.lr_parameters()), "lr": self.hparams.lr_lr},
            ]
        )
