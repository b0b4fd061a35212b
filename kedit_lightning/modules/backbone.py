"""Fine-tune a backbone on answer tokens: how a tiny base model comes to know its world.

Batches are dicts of sub-batches (the data layer's FactCollator gives {"with_image": ...,
"text_only": ...}); the loss is the answer-token NLL summed over sub-batches. The result is
exported with `save_pretrained`, so `Family.from_pretrained(dir)` (or a BackboneSpec with
`pretrained: dir`) gives it back for editing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torchmetrics import MeanMetric

from data_modules.encoding import IGNORE_INDEX, SubBatch, SubBatchEncoder
from data_modules.synthetic import WORLD_FILE
from kedit_lightning.backbones import (
    Backbone,
    BackboneSpec,
    build_backbone,
)  # the package import registers every family
from kedit_lightning.backbones.loading import GGUF_SUFFIX, check_gguf
from kedit_lightning.metrics import answer_token_accuracy


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over answer tokens (logits aligned with labels, -100 elsewhere)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def sub_batches(batch: Mapping[str, Any]) -> dict[str, SubBatch]:
    """The sub-batches of a batch (entries with labels; bookkeeping entries such as `meta` are skipped)."""
    found = {name: value for name, value in batch.items() if isinstance(value, Mapping) and "labels" in value}
    if not found:
        raise ValueError(f"batch has no sub-batches (dicts with labels); keys: {sorted(batch)}")
    return found


class BackboneModule(LightningModule):
    """Answer-token fine-tuning of a whole backbone (or the parameters matching `trainable`).

    Args:
        backbone: a BackboneSpec; in YAML either its fields or the path of a
            configs/backbones/*.yaml file. Python callers may pass a built Backbone instead
            (tests, notebooks); the annotation stays BackboneSpec because jsonargparse reads
            file paths only for a plain dataclass type.
        lr: peak AdamW learning rate, reached after `warmup_steps` of linear warmup; then cosine
            decay to `lr * min_lr_ratio` at the trainer's last step.
        weight_decay: AdamW decay on matrices (biases, norms and 1-D tensors are not decayed).
        trainable: glob patterns of parameter names (as in `backbone.model.named_parameters()`)
            to fine-tune; None fine-tunes everything.
        export_dir: where `on_train_end` writes the fine-tuned backbone (save_pretrained); None skips.
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        trainable: list[str] | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(backbone, Backbone):
            self.save_hyperparameters(ignore=["backbone"])
        else:
            # load_from_checkpoint passes the stored dict back.
            spec = backbone if isinstance(backbone, BackboneSpec) else BackboneSpec(**backbone)
            self.save_hyperparameters(ignore=["backbone"])
            # Stored as a plain dict so hparams files and checkpoints hold no custom classes.
            self.hparams["backbone"] = dataclasses.asdict(spec)
            backbone = build_backbone(spec)
        self.backbone = backbone
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.export_dir = export_dir
        self._unfreeze(trainable)
        self.train_acc = MeanMetric()
        self.val_acc = MeanMetric()

    @property
    def processor(self) -> SubBatchEncoder:
        """The backbone's tokenizer + image processor, for the DataModule's collator."""
        return self.backbone.processor

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None and getattr(datamodule, "processor", None) is None:
            datamodule.processor = self.backbone.processor

    def _unfreeze(self, patterns: Sequence[str] | None) -> None:
        named = dict(self.backbone.model.named_parameters())
        if patterns is None:
            chosen = set(named)
        else:
            chosen = {name for name in named if any(fnmatch(name, p) for p in patterns)}
            unmatched = [p for p in patterns if not any(fnmatch(name, p) for name in named)]
            if unmatched:
                raise ValueError(
                    f"trainable patterns {unmatched} match no parameter of the {self.backbone.family} backbone"
                )
        for name, param in named.items():
            param.requires_grad_(name in chosen)

    def on_fit_start(self) -> None:
        # transformers' from_pretrained returns models in eval mode; fine-tuning uses their dropout.
        self.backbone.train()

    def forward(self, sub_batch: SubBatch) -> torch.Tensor:
        return self.backbone(sub_batch)

    def _shared_step(self, batch: Mapping[str, Any], stage: str, accuracy: MeanMetric) -> torch.Tensor:
        parts = sub_batches(batch)
        rows = sum(int(sb["labels"].shape[0]) for sb in parts.values())
        total = torch.zeros((), device=self.device)
        for name, sb in parts.items():
            logits = self.backbone(sb)
            loss = answer_nll(logits, sb["labels"])
            total = total + loss
            accuracy.update(answer_token_accuracy(logits.detach()[sb["labels"] != IGNORE_INDEX], sb["labels"]))
            self.log(f"{stage}/loss_{name}", loss, batch_size=int(sb["labels"].shape[0]))
        on_step = stage == "train"
        self.log(f"{stage}/loss", total, prog_bar=True, batch_size=rows, on_step=on_step, on_epoch=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=True, batch_size=rows, on_step=False, on_epoch=True)
        return total

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val", self.val_acc)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.backbone.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("BackboneModule's cosine schedule needs a finite run: set max_steps or max_epochs")
        decay_steps = max(int(total) - self.warmup_steps, 1)
        cosine = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=self.lr * self.min_lr_ratio)
        if self.warmup_steps > 0:
            warmup = LinearLR(optimizer, start_factor=1.0 / (self.warmup_steps + 1), total_iters=self.warmup_steps)
            schedule = SequentialLR(optimizer, [warmup, cosine], milestones=[self.warmup_steps])
        else:
            schedule = cosine
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def export(self, directory: str | Path) -> Path:
        """Write the backbone as a transformers directory that `from_pretrained` reads back, with
        `BASE_RECORD`: the synthetic world it learned (when its data has one) and its hyper-parameters."""
        directory = Path(directory)
        self.backbone.save_pretrained(directory)
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        record = {
            "world": world_record(getattr(datamodule, "data_dir", None)),
            "hyper_parameters": {k: str(v) if isinstance(v, Path) else v for k, v in self.hparams.items()},
        }
        (directory / BASE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        return directory

    def on_train_end(self) -> None:
        if self.export_dir is not None and self.trainer.is_global_zero:
            self.export(self.export_dir)


BASE_RECORD = "kedit_base.json"
"""What a base model `BackboneModule.export` wrote was trained on: its world, its bootstrap config."""


def world_record(data_dir: str | Path | None) -> dict[str, Any] | None:
    """The synthetic world in `data_dir` (its world.json's path, seed and sha256), or None when there is none."""
    world = Path(data_dir) / WORLD_FILE if data_dir is not None else None
    if world is None or not world.is_file():
        return None
    text = world.read_bytes()
    seed = json.loads(text).get("seed")
    return {"file": str(world.absolute()), "seed": seed, "sha256": hashlib.sha256(text).hexdigest()}


def looks_local(source: str) -> bool:
    """Whether `pretrained` names a folder rather than a hub id ("name" or "namespace/name")."""
    path = Path(source)
    return path.is_absolute() or source.startswith((".", "~")) or len(path.parts) > 2 or path.parent.is_dir()


def prepare_base(spec: BackboneSpec, data_dir: str | Path | None = None) -> None:
    """Check (and with `bootstrap`, build) the `pretrained` folder of `spec` for a run on `data_dir`'s world.

    A missing folder is an error unless `bootstrap` is set and the folder is the one the bootstrap
    config exports to (its `model.init_args.export_dir`; any folder when it names none): a typo
    in `pretrained` then stops at once instead of starting a bootstrap into a new folder. An existing
    folder with a `BASE_RECORD` is refused when it learned another synthetic world than `data_dir`'s
    or was built from other contents of the bootstrap config: it is never reused silently, nor
    replaced (delete it to rebuild). Hub ids are left to `from_pretrained`.
    """
    pretrained = spec.pretrained
    if pretrained is None:
        return
    if str(pretrained).endswith(GGUF_SUFFIX):  # a GGUF file, or `smollm2.gguf` (the packaged one): not a folder
        check_gguf(str(pretrained))
        return
    folder = Path(pretrained)
    if not folder.exists():
        if spec.bootstrap is None:
            if looks_local(pretrained):
                raise FileNotFoundError(f"backbone.pretrained: {pretrained}: no such model folder (and no bootstrap)")
            return
        target = (yaml.safe_load(Path(spec.bootstrap).read_text()) or {}).get("model", {}).get("init_args", {})
        target = target.get("export_dir")
        if target is not None and Path(target).absolute() != folder.absolute():
            raise FileNotFoundError(
                f"backbone.pretrained: {pretrained}: no such model folder; its bootstrap {spec.bootstrap} builds "
                f"{target} (a typo? to build a base elsewhere, set export_dir in a copy of that config)"
            )
        bootstrap_backbone(spec.bootstrap, folder)
    record_file = folder / BASE_RECORD
    if not record_file.is_file():
        if spec.bootstrap is not None:
            rank_zero_warn(
                f"backbone.pretrained: {pretrained} has no {BASE_RECORD} (built before bases recorded their world), "
                "so which world it learned is not checked; delete it to rebuild it with the record"
            )
        return
    record = json.loads(record_file.read_text())
    world, built = record.get("world"), world_record(data_dir)
    if world is not None and built is not None and world["sha256"] != built["sha256"]:
        raise ValueError(
            f"backbone.pretrained: {pretrained} learned the synthetic world {world['file']} (seed {world['seed']}), "
            f"this run's data is {built['file']} (seed {built['seed']}); delete the folder to rebuild it on this "
            "world, or name another"
        )
    bootstrap = record.get("bootstrap")
    if spec.bootstrap is not None and bootstrap is not None:
        digest = hashlib.sha256(Path(spec.bootstrap).read_bytes()).hexdigest()
        if digest != bootstrap["sha256"]:
            raise ValueError(
                f"backbone.pretrained: {pretrained} was built from other contents of {bootstrap['config']} than "
                f"{spec.bootstrap} has now; delete the folder to rebuild it, or name another"
            )


def bootstrap_backbone(config: str | Path, export_dir: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Fine-tune a base model with a LightningCLI fit config and export it to `export_dir`.

    `config` is a `train.py fit` YAML whose model is a BackboneModule (e.g.
    configs/backbones/blip2-tiny-bootstrap.yaml); `overrides` are extra command-line arguments
    (e.g. "--trainer.max_steps=5"). Returns `export_dir`, which `from_pretrained` reads.
    """
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    args = ["fit", "--config", str(config), *overrides, f"--model.init_args.export_dir={export_dir}"]
    LightningCLI(
        BackboneModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        args=args,
    )
    record_file = Path(export_dir) / BASE_RECORD
    if not record_file.is_file():
        raise RuntimeError(f"{config}: training finished but wrote no model to {export_dir}")
    record = json.loads(record_file.read_text())
    record["bootstrap"] = {"config": str(config), "sha256": hashlib.sha256(Path(config).read_bytes()).hexdigest()}
    record_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return Path(export_dir)
