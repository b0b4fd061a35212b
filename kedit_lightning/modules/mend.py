"""Meta-training MEND (Mitchell et al., "Fast Model Editing at Scale", ICLR 2022).

Each training record is edited on its own, from the frozen backbone's weights, with the
editor's one-shot update; the outer loss then asks the edited model for the new answer on the
rephrased prompt (cedit) and on another image of the same thing (iedit), and for unchanged
output distributions on unrelated text and image inputs (cloc, KL against the unedited model).
Only the editor learns: the hypernetwork at `lr`, the per-layer edit learning rates at `lr_lr`.

The editor's input-normalisation statistics change once per training step: every edit of the
step normalises with the statistics as of the step's start, and the moments of all the step's
rows are committed after the step's loss is known, merged across processes (an all-gather of
the editor's packed (count, mean, M2) through the strategy), and not at all for a skipped
non-finite step. A step is thus a function of its global batch: under DDP, N processes with B
records each train exactly as one process with N*B records would (up to float rounding), and
every process holds the same statistics, so DDP's broadcast of rank 0's buffers changes nothing.
Gradients are averaged by DDP, and the loss is a mean over records, so the two agree there too.

A step whose loss is not finite on any process is skipped on all of them (counted in
`skipped_steps`): no statistics, and no optimizer update, the optimizer's state included.
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
from kedit_lightning.modules.editing import WeightEditorModule


class MENDModule(WeightEditorModule):
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
        self.finite_batches = 0  # batches with a finite loss since the last optimizer step

    def build_editor(self, backbone: Backbone) -> None:
        hp = self.hparams
        self.editor = MEND.for_backbone(
            backbone, rank=hp.rank, n_hidden=hp.n_hidden, combine=hp.combine, norm=hp.norm, edit_lr=hp.edit_lr
        )

    def edit(self, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return self.editor(self.backbone, sub_batch, params)

    def _record_losses(self, record: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        backbone = self.backbone
        params = self.edit(record["edit_inner"])
        with torch.no_grad():
            pre_loc, pre_loc_image = backbone(record["loc"]), backbone(record["loc_image"])
        return {
            "edit": masked_nll(backbone(record["edit_outer"], params), record["edit_outer"]["labels"]),
            "image_edit": masked_nll(
                backbone(record["edit_outer_image"], params), record["edit_outer_image"]["labels"]
            ),
            "loc": masked_kl(pre_loc, backbone(record["loc"], params), record["loc"]["labels"])
            + masked_kl(pre_loc_image, backbone(record["loc_image"], params), record["loc_image"]["labels"]),
        }

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        per_record = [self._record_losses(record) for record in record_batches(batch)]
        parts = {key: torch.stack([losses[key] for losses in per_record]).mean() for key in per_record[0]}
        hp = self.hparams
        loss = hp.cedit * parts["edit"] + hp.iedit * parts["image_edit"] + hp.cloc * parts["loc"]
        pending = self.editor.take_pending_statistics()
        # Every rank must agree, or DDP would wait forever for the gradients of a skipped rank.
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        self.skipped_steps += int(not finite)
        # Logged the same way on every step: Lightning refuses a key logged two ways in one epoch.
        self.log("train/skipped_steps", self.skipped_steps.float(), prog_bar=True)
        if not finite:
            # Lightning's DDP needs a loss from every rank (None is refused): this one gives the
            # editor exact zero gradients, and `on_before_optimizer_step` then drops them.
            return sum(p.sum() for p in self.editor.parameters()) * 0.0
        self.finite_batches += 1
        if pending.numel():
            # [world size, L] in rank order (just [L] on one device): every rank commits the same.
            self.editor.commit_statistics(self.all_gather(pending))
        batch_size = len(per_record)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/loss_{k}": v for k, v in parts.items()}, batch_size=batch_size)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        finite_batches, self.finite_batches = self.finite_batches, 0
        if not finite_batches:
            # Adam leaves a parameter without a gradient alone, its moments and step count included.
            optimizer.zero_grad(set_to_none=True)
            return
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
