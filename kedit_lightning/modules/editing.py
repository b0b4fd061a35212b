"""What every editor's LightningModule shares: the frozen backbone, edit evaluation, logging.

Subclasses say how to edit and, when they learn, how to train (`training_step`,
`configure_optimizers`): weight editors (MEND, FT) derive from `WeightEditorModule` and implement
`edit`, which returns new weights; an editor that leaves the weights alone (SERAC) implements
`edited_model`. Validation and
test edit each held-out record on its own from the unedited model and report the standard
metrics to every logger, with a TensorBoard text panel of a few edits (prompt, old answer,
target, pre- and post-edit prediction).
"""

from __future__ import annotations

import dataclasses
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger

from data_modules.encoding import IGNORE_INDEX, SubBatch, SubBatchEncoder
from kedit_lightning.backbones import Backbone, BackboneSpec, build_backbone
from kedit_lightning.evaluation import (
    HEADLINE,
    HOPS,
    EditedModel,
    EditMetrics,
    flatten_report,
    record_batches,
    with_weights,
)
from kedit_lightning.sharding import shard_editor_module

REPORT_KEY = "kedit_val_report"
"""Where a Lightning checkpoint keeps the validation report of its weights (export and reports read it)."""


class EditorModule(LightningModule, ABC):
    def __init__(self, backbone: BackboneSpec, hops: Sequence[str] = HOPS, logged_edits: int = 4) -> None:
        super().__init__()
        # load_from_checkpoint hands the spec back as the plain dict `save_hyperparameters` stored.
        self.backbone_spec = backbone if isinstance(backbone, BackboneSpec) else BackboneSpec(**backbone)
        self.logged_edits = logged_edits
        self.val_metrics = EditMetrics(hops)
        self.test_metrics = EditMetrics(hops)
        self.backbone: Backbone | None = None
        self.last_report: dict[str, dict[str, Any]] = {}
        # The frozen backbone is rebuilt from its spec, never stored in Lightning checkpoints.
        self.strict_loading = False

    def save_hyperparameters(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's, with the backbone spec stored as a plain dict: checkpoints then load with
        `torch.load(weights_only=True)` (Lightning's default) and hparams.yaml stays readable."""
        kwargs.setdefault("frame", inspect.currentframe().f_back)
        super().save_hyperparameters(*args, **kwargs)
        if isinstance(self.hparams.get("backbone"), BackboneSpec):
            self.hparams["backbone"] = dataclasses.asdict(self.hparams["backbone"])

    # -- the editor -------------------------------------------------------------------------
    @abstractmethod
    def edited_model(self, edits: Sequence[SubBatch]) -> EditedModel:
        """The post-edit model after `edits` (sub-batches such as a record's `edit_inner`), applied
        in order starting from the unedited backbone."""

    def build_editor(self, backbone: Backbone) -> None:
        """Create the editor's own modules once the backbone (and so the edited shapes) is known."""

    def input_processor(self) -> SubBatchEncoder:
        """What the DataModule tokenizes with: the backbone's processor, or an editor's that adds its own views."""
        return self.backbone.processor

    # -- model lifecycle --------------------------------------------------------------------
    def train(self, mode: bool = True) -> EditorModule:
        """Lightning's train/eval switch, with the frozen backbone always in eval mode: dropout
        would make the pre-edit targets of the locality loss noisy (and ranks disagree)."""
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        return self

    def prepare_data(self) -> None:
        if (
            self.backbone_spec.pretrained
            and self.backbone_spec.bootstrap
            and not Path(self.backbone_spec.pretrained).exists()
        ):
            from kedit_lightning.modules.backbone import bootstrap_backbone

            bootstrap_backbone(self.backbone_spec.bootstrap, self.backbone_spec.pretrained)

    def configure_model(self) -> None:
        if self.backbone is None:
            self.backbone = build_backbone(self.backbone_spec)
            self.build_editor(self.backbone)
        if self.device_mesh is not None:  # ModelParallelStrategy: shard the frozen backbone, replicate the editor
            shard_editor_module(self, self.device_mesh)
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "processor", None) is None:
            datamodule.processor = self.input_processor()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("backbone.")}
        checkpoint["backbone_fingerprint"] = self.backbone.fingerprint()
        if "val" in self.last_report:
            checkpoint[REPORT_KEY] = self.last_report["val"]

    # -- evaluation -------------------------------------------------------------------------
    def _check_grad_mode(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "editing needs gradients during evaluation: create the Trainer with inference_mode=False"
            )

    def on_validation_start(self) -> None:
        self._check_grad_mode()

    def on_test_start(self) -> None:
        self._check_grad_mode()

    def _check_ranks_run_the_same_forwards(self, records: Sequence[Mapping[str, Any]]) -> None:
        """With a sharded backbone every forward gathers weights together with every other rank, so
        all ranks must run the same forwards in the same order. Records differ only in their
        portability rows (scored in one forward) and one-hop edits (an edit and a forward each)."""
        plan = tuple(
            (len(r.get("port_hops", ())) > len(r.get("port_edit_row", ())), len(r.get("port_edit_row", ())))
            for r in records
        )
        # hash() of a tuple of ints and bools is the same in every process (no string salt).
        gathered = self.all_gather(torch.tensor([len(records), hash(plan)], device=self.device))
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(
                "validation with a sharded backbone (ModelParallelStrategy) needs every rank's batch to have the same shape: "
                "the ranks' records here differ in portability questions or one-hop edits. Validate on a file where every record "
                "has the same ones (eval.json; or hops: [k] with require_port: true), or with DDP"
            )

    def _evaluate(self, batch: Mapping[str, Any], metrics: EditMetrics, log_examples: bool) -> None:
        records = list(record_batches(batch))
        if self.device_mesh is not None:
            self._check_ranks_run_the_same_forwards(records)
        for index, record in enumerate(records):
            edit = record["edit_inner"]
            post = metrics.update(
                self.backbone, record, self.edited_model([edit]), lambda further: self.edited_model([edit, further])
            )
            if log_examples and index < self.logged_edits and "meta" in record:
                self._log_example(record, post["edit_inner"])

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, log_examples=batch_idx == 0)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, log_examples=False)

    def _finish(self, metrics: EditMetrics, stage: str) -> None:
        report = metrics.compute()
        metrics.reset()
        self.last_report[stage] = report
        flat = flatten_report({k: v for k, v in report.items() if k != "n_edits"}, f"{stage}/")
        # One number to select checkpoints and stop early on: the mean of the five headline metrics.
        flat[f"{stage}/score"] = sum(report[key] for key in HEADLINE) / len(HEADLINE)
        self.log_dict(flat, prog_bar=False, sync_dist=False)
        for key in ("reliability", "t_generality", "t_locality"):
            self.log(f"{stage[0]}_{key[:5]}", report[key], prog_bar=True, logger=False)

    def on_validation_epoch_end(self) -> None:
        self._finish(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._finish(self.test_metrics, "test")

    def _decode_answer(self, logits: torch.Tensor, labels: torch.Tensor) -> str:
        mask = labels != IGNORE_INDEX
        return self.backbone.processor.tokenizer.decode(logits.argmax(-1)[mask].tolist()).strip()

    def _log_example(self, record: Mapping[str, Any], post_logits: torch.Tensor) -> None:
        tb = next((lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is None or self.trainer.sanity_checking:
            return
        sub_batch = record["edit_inner"]
        with torch.no_grad():
            pre = self._decode_answer(self.backbone(sub_batch)[0], sub_batch["labels"][0])
        post = self._decode_answer(post_logits[0], sub_batch["labels"][0])
        meta = record["meta"][0]
        text = f"**prompt** {meta['prompt']}  \n**old answer** {meta['pred']}  \n**target** {meta['alt']}  \n**pre-edit** {pre}  \n**post-edit** {post}"
        tb.add_text(f"val_edits/{self.logged_example_index(meta)}", text, self.global_step)

    @staticmethod
    def logged_example_index(meta: Mapping[str, Any]) -> str:
        return str(meta.get("index", meta["prompt"]))[:60]


class WeightEditorModule(EditorModule):
    """An editor whose edit is new weights for the backbone's edit parameters (MEND, FT)."""

    @abstractmethod
    def edit(self, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Edited weights for the edit(s) in `sub_batch`, starting from `params` (None: the backbone's own)."""

    def edited_model(self, edits: Sequence[SubBatch]) -> EditedModel:
        params = None
        with torch.enable_grad():
            for sub_batch in edits:
                params = {k: v.detach() for k, v in self.edit(sub_batch, params).items()}
        return with_weights(self.backbone, params)
