"""What every editor's LightningModule shares: the frozen backbone, edit evaluation, logging.

Subclasses build their editor (`build_editor`: a plain module with `edited_model` that edits when
called, see `evaluation.Editor`) and, when they learn, train it. Validation and test edit each held-out record on
its own from the unedited model (`evaluate_batch`) and report the standard metrics to every logger,
with a TensorBoard panel of a few edits (prompt, old answer, target, greedy pre- and post-edit answers, image).
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger

from data_modules.encoding import IGNORE_INDEX, SubBatch, SubBatchEncoder
from data_modules.records import DataError
from kedit_lightning.backbones import Backbone, BackboneSpec, build_backbone
from kedit_lightning.backbones.base import backbone_class
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.evaluation import HOPS, EditMetrics, Protocol, evaluate_batch, flatten_report, headline
from kedit_lightning.generation import greedy_answers
from kedit_lightning.sharding import shard_editor_module

REPORT_KEY = "kedit_val_report"
"""Where a Lightning checkpoint keeps the validation report of its weights (export and reports read it)."""
RNG_KEY = "kedit_rng_states"
"""Where a Lightning checkpoint keeps the process's random states (Lightning keeps none), for exact resumes."""


def rng_states() -> dict[str, Any]:
    """Python's, NumPy's and torch's random states, in types `torch.load(weights_only=True)` reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class EditorModule(LightningModule, ABC):
    def __init__(
        self, backbone: BackboneSpec, hops: Sequence[str] = HOPS, logged_edits: int = 4, protocol: Protocol = "kedit"
    ) -> None:
        """`protocol`: whose metric definitions validation and test report (README, "Metric protocols")."""
        super().__init__()
        # load_from_checkpoint hands the spec back as the plain dict `save_hyperparameters` stored.
        self.backbone_spec = backbone if isinstance(backbone, BackboneSpec) else BackboneSpec(**backbone)
        self.logged_edits = logged_edits
        self.hops = tuple(hops)
        self.val_metrics = EditMetrics(hops, (protocol,))
        self.test_metrics = EditMetrics(hops, (protocol,))
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
    def build_editor(self, backbone: Backbone) -> None:
        """Create `self.editor` once the backbone (and so the edited shapes) is known."""

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
        """Check the base model's folder against this run's world, bootstrapping it when missing (`prepare_base`)."""
        from kedit_lightning.modules.backbone import prepare_base

        datamodule = self._trainer.datamodule if self._trainer is not None else None
        prepare_base(self.backbone_spec, getattr(datamodule, "data_dir", None))

    def setup(self, stage: str) -> None:
        """Before the backbone loads: refuse data whose visual inputs its family cannot encode, and split the
        metrics by the data's groups (ADS-Edit's scenarios and image types)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "visual_problems"):
            return
        family = backbone_class(self.backbone_spec.family)
        problems = datamodule.visual_problems(family.visual_inputs, family.family)
        if problems:
            raise DataError(problems)
        for split, name in (("val", "val_metrics"), ("test", "test_metrics")):
            groups = datamodule.metric_groups(split)
            if groups:
                setattr(self, name, EditMetrics(self.hops, groups))

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
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only when a Trainer resumes: loading weights for export or evaluation leaves the random state alone.
        if self._trainer is not None and RNG_KEY in checkpoint:
            set_rng_states(checkpoint[RNG_KEY])

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

    def _check_ranks_run_the_same_forwards(self, batch: Mapping[str, Any]) -> None:
        """With a sharded backbone every forward gathers weights together with every other rank, so
        all ranks must run the same forwards: the same sub-batches (portability rows, one-hop edits,
        near neighbours)."""
        plan = tuple(key in batch for key in ("port", "port_edit", "neighbor"))
        # hash() of a tuple of bools is the same in every process (no string salt).
        gathered = self.all_gather(torch.tensor([hash(plan)], device=self.device))
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(
                "validation with a sharded backbone (ModelParallelStrategy) needs every rank's batch to run the same "
                "forwards: here some ranks' records have portability questions or one-hop edits and others not. "
                "Validate on a file where every record has the same ones (eval.json; or hops: [k] with "
                "require_port: true), or with DDP"
            )

    def _evaluate(self, batch: Mapping[str, Any], metrics: EditMetrics, log_examples: bool) -> None:
        if self.device_mesh is not None:
            self._check_ranks_run_the_same_forwards(batch)
        post = evaluate_batch(self.editor, self.backbone, batch, metrics)
        if log_examples and "meta" in batch:
            self._log_examples(batch, post["edit_inner"])

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, log_examples=batch_idx == 0)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, log_examples=False)

    def _finish(self, metrics: EditMetrics, stage: str) -> None:
        report = metrics.compute()
        metrics.reset()
        self.last_report[stage] = report
        flat = flatten_report({k: v for k, v in report.items() if k != "n_edits"}, f"{stage}/")
        # One number to select checkpoints and stop early on: the mean of the headline metrics present
        # (five with images, three for text-only data).
        present = headline(report)
        flat[f"{stage}/score"] = sum(report[key] for key in present) / len(present)
        self.log_dict(flat, prog_bar=False, sync_dist=False)
        for key in ("reliability", "t_generality", "t_locality"):
            self.log(f"{stage[0]}_{key[:5]}", report[key], prog_bar=True, logger=False)

    def on_validation_epoch_end(self) -> None:
        self._finish(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._finish(self.test_metrics, "test")

    def _answers(self, answer_logits: torch.Tensor, labels: torch.Tensor) -> list[str]:
        """Each row's argmax answer, decoded (`answer_logits` [P, V] at the answer positions of `labels`)."""
        ids = answer_logits.argmax(-1).split((labels != IGNORE_INDEX).sum(-1).tolist())
        return [self.backbone.processor.tokenizer.decode(row.tolist()).strip() for row in ids]

    @torch.no_grad()
    def _generated_answers(self, sub_batch: SubBatch) -> tuple[list[str], list[str]] | None:
        """Each row's greedy answer before and after its own edit (generation.py: the edit in force through
        the edited model, SERAC's routing included); None for a sharded backbone (ModelParallelStrategy:
        every rank would have to decode the same rows)."""
        if self.device_mesh is not None:
            return None
        model = self.editor.edited_model(self.backbone)
        inputs = StepInputs(self.backbone, {"edit": sub_batch})
        groups = self.editor(model, inputs, inputs.rows("edit"))
        pre = greedy_answers(model, self.backbone, {"edit": sub_batch})
        post = greedy_answers(model, self.backbone, {"edit": sub_batch}, groups)
        return [a.strip() for a in pre], [a.strip() for a in post]

    def _shown_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[C, H, W] in [0, 1]: an image as the model saw it, its processor's normalisation undone."""
        processor = self.backbone.processor.image_processor
        mean = torch.as_tensor(getattr(processor, "image_mean", None) or 0.0, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(getattr(processor, "image_std", None) or 1.0, dtype=torch.float32).view(-1, 1, 1)
        return (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)

    def _log_examples(self, batch: Mapping[str, Any], post_logits: torch.Tensor) -> None:
        """A few edits on TensorBoard: prompt, old answer, target, the greedy answers before and after the
        edit (the answer tokens' argmax with a sharded backbone), and the edit's image."""
        tb = next((lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is None or self.trainer.sanity_checking:
            return
        sub_batch = {
            k: v[: self.logged_edits] if isinstance(v, torch.Tensor) else v for k, v in batch["edit_inner"].items()
        }
        generated = self._generated_answers(sub_batch)
        if generated is not None:
            (pre, post), how = generated, "greedy"
        else:
            labels = sub_batch["labels"]
            with torch.no_grad():
                logits = self.backbone(sub_batch)
            pre = self._answers(logits[labels != IGNORE_INDEX], labels)
            post = self._answers(post_logits[: int((labels != IGNORE_INDEX).sum())], labels)
            how = "argmax"
        for i, (meta, before, after) in enumerate(zip(batch["meta"], pre, post)):
            text = (
                f"**prompt** {meta['prompt']}  \n**old answer** {meta['pred']}  \n**target** {meta['alt']}  \n"
                f"**pre-edit ({how})** {before}  \n**post-edit ({how})** {after}"
            )
            tag = self.logged_example_index(meta)
            tb.add_text(f"val_edits/{tag}", text, self.global_step)
            if sub_batch.get("pixel_values") is not None:
                tb.add_image(
                    f"val_edit_images/{tag}", self._shown_image(sub_batch["pixel_values"][i]), self.global_step
                )

    @staticmethod
    def logged_example_index(meta: Mapping[str, Any]) -> str:
        return str(meta.get("index", meta["prompt"]))[:60]
