"""`python train.py fit --config ...`: Lightning's CLI, resuming only what it can resume exactly.

`--ckpt_path last` resumes the run of the same name: `last.ckpt` of the logger's newest `version_*`
folder that has one (and logs on into that version), or of the ModelCheckpoint's own `dirpath`; with
none, the run stops with one line instead of starting from scratch. A checkpoint that is not a complete
file (a run killed while writing one elsewhere, a truncated copy) stops the run with one line naming it.
Checkpoints are written to a temporary file beside their name and renamed into place, so a run killed
mid-write leaves the previous checkpoint of that name whole.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kedit_lightning.callbacks import RunFolderConfig
from kedit_lightning.known_warnings import quiet_known_warnings

LAST = "last.ckpt"


class ResumeError(ValueError):
    """A checkpoint to resume from is missing or unreadable (a user error: one line)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing a local checkpoint to `.NAME.partial` beside it and renaming
    that into place (Lightning's own stages it in the system temp folder and copies it across file systems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)


def check_checkpoint(path: Path) -> None:
    """Refuse a checkpoint file that is missing or not a complete torch archive (truncated, empty, other)."""
    if path.is_dir():  # a distributed (sharded) checkpoint: its strategy reads and checks it
        return
    if not path.is_file():
        raise ResumeError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):
        others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
        fallback = f"other checkpoints there: {', '.join(others[:3])}" if others else "no other checkpoint there"
        raise ResumeError(f"{path}: truncated or not a checkpoint (not a complete torch archive); {fallback}")


def _init_args(node: Any) -> Any:
    return node.get("init_args") if hasattr(node, "get") and node.get("init_args") is not None else None


def _version_number(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_last_checkpoint(config: Any) -> tuple[Path, Any]:
    """The `last.ckpt` that `--ckpt_path last` resumes for a subcommand's config, and the logger config
    node to continue in (None when the checkpoint is not in a logger's version folder)."""
    trainer = config["trainer"]
    for callback in trainer.get("callbacks") or []:
        args = _init_args(callback)
        if callback.get("class_path", "").endswith("ModelCheckpoint") and args and args.get("dirpath"):
            last = Path(args["dirpath"]) / LAST
            if last.exists():
                return last, None
            raise ResumeError(f"--ckpt_path last: no {LAST} in the ModelCheckpoint dirpath {args['dirpath']}")
    root = Path(trainer.get("default_root_dir") or ".")
    logger = trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    if logger is False:
        last = root / "checkpoints" / LAST
        if last.exists():
            return last, None
        raise ResumeError(f"--ckpt_path last: no {last} (the run has no logger, so checkpoints go there)")
    args = _init_args(logger)
    save_dir = Path(args.get("save_dir") or root) if args else root
    name = (args.get("name") if args else None) or "lightning_logs"
    run = save_dir / name
    versions = sorted(run.glob(f"version_*/checkpoints/{LAST}"), key=lambda p: _version_number(p.parent.parent))
    if not versions:
        raise ResumeError(
            f"--ckpt_path last: no checkpoint of run {name!r} to resume (no {run}/version_*/checkpoints/{LAST}); "
            "start it without --ckpt_path"
        )
    return versions[-1], args


class TrainingCLI(LightningCLI):
    """LightningCLI over any editor LightningModule and any DataModule, with exact, checked resumes."""

    def __init__(self, **kwargs: Any) -> None:
        quiet_known_warnings()
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunFolderConfig,
            save_config_kwargs={"overwrite": True},
            **kwargs,
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Lightning's, then the checkpoint to resume resolved and checked (before anything is set up or logged)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path is None or "://" in str(ckpt_path):
            return
        if ckpt_path == "last":
            last, logger_args = find_last_checkpoint(config)
            config["ckpt_path"] = ckpt_path = str(last)
            if logger_args is not None:  # log on into the resumed version, not a fresh one
                logger_args["version"] = last.parent.parent.name
        if ckpt_path not in ("best", "hpc", "registry"):
            check_checkpoint(Path(ckpt_path))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def main(args: list[str] | None = None) -> None:
    """Run the CLI (train.py reports a checkpoint that cannot be resumed, a `ResumeError`, in one line)."""
    TrainingCLI(args=args)
