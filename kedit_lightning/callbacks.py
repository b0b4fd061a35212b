"""Callbacks that turn a meta-training run into a report."""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from kedit_lightning.baselines import load_baseline
from kedit_lightning.editors.edited_model import WeightEditor
from kedit_lightning.editors.ft import FineTune
from kedit_lightning.editors.ike import IKE
from kedit_lightning.evaluation import (
    EVERY_POSITION_PROTOCOLS,
    EditMetrics,
    evaluate_batch,
    flatten_report,
    report_column,
)
from kedit_lightning.modules.editing import REPORT_KEY


def metrics_table(columns: dict[str, dict]) -> str:
    """A Markdown table, one row per metric and one column per method."""
    flat = {
        name: flatten_report({k: v for k, v in report.items() if k not in ("n_edits", "exact_match")})
        for name, report in columns.items()
    }
    keys = list(dict.fromkeys(key for report in flat.values() for key in report))
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key in keys:
        lines.append(
            f"| {key} | "
            + " | ".join(f"{report[key]:.3f}" if key in report else "-" for report in flat.values())
            + " |"
        )
    edits = {name: report.get("n_edits") for name, report in columns.items()}
    lines.append("| edits | " + " | ".join(str(n) for n in edits.values()) + " |")
    return "\n".join(lines)


_UNLOGGED_RUNS: weakref.WeakKeyDictionary[Trainer, Path] = weakref.WeakKeyDictionary()


def next_free_version(folder: Path) -> Path:
    """`folder/version_N` for the smallest N that does not exist yet."""
    return next(folder / f"version_{i}" for i in itertools.count() if not (folder / f"version_{i}").exists())


def run_folder(trainer: Trainer) -> Path:
    """Where a run's files (config.yaml, report.md) go: the logger's folder, or without a logger
    `<default_root_dir>/runs/unlogged/version_N`, the next free one when first asked (then the same for
    the whole run), so a later run never writes over them. Writers create it. On rank 0 only: nothing
    is broadcast."""
    logger = trainer.logger
    logged = (getattr(logger, "log_dir", None) or logger.save_dir) if logger is not None else None
    if logged is not None:
        return Path(logged)
    if trainer not in _UNLOGGED_RUNS:
        _UNLOGGED_RUNS[trainer] = next_free_version(Path(trainer.default_root_dir) / "runs" / "unlogged")
    return _UNLOGGED_RUNS[trainer]


class RunFolderConfig(SaveConfigCallback):
    """LightningCLI's config.yaml, written into `run_folder` (never the working directory):
    `LightningCLI(..., save_config_callback=RunFolderConfig)`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = run_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        config_path = folder / self.config_filename
        self.parser.save(
            self.config, str(config_path), skip_unset=False, overwrite=self.overwrite, multifile=self.multifile
        )


class CompareWithFineTuning(Callback):
    """At the end of a fit: score baselines on the validation edits, print them beside the trained editor.

    Always the FT baseline: the same edited layers with `steps` gradient steps at `lr` (with one step,
    MEND's gradient budget); then each of `baselines` (`baselines.py` names or YAML files: unedited,
    ft-l, lora, ike), IKE with the training split's records as demonstrations. Columns: unedited, the
    trained editor, FT, the rest. The table also lands in the run's folder (`run_folder`). Under a protocol
    that reads every position (easyedit), baselines that answer only at the answer positions (IKE, GRACE,
    WISE) are refused at setup, as `kedit eval` refuses them.
    """

    def __init__(self, lr: float = 1e-2, steps: int = 1, baselines: Sequence[str] = ()) -> None:
        self.lr = lr
        self.steps = steps
        self.baselines = dict(load_baseline(spec) for spec in baselines)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        protocol = pl_module.hparams.get("protocol", "kedit")
        answer_only = [name for name, editor in self.baselines.items() if not isinstance(editor, WeightEditor)]
        if protocol in EVERY_POSITION_PROTOCOLS and answer_only:
            raise ValueError(
                f"CompareWithFineTuning: baselines {', '.join(answer_only)} answer only at the answer positions, and "
                f"protocol {protocol} reads every position: use protocol kedit or vlkeb, or leave them out"
            )

    def _score(
        self, editor: nn.Module, trainer: Trainer, pl_module: LightningModule, unedited: bool = False
    ) -> dict[str, Any]:
        protocol = pl_module.hparams.get("protocol", "kedit")
        metrics = EditMetrics(pl_module.hparams.hops, (protocol,), unedited=unedited).to(pl_module.device)
        # The same validation batches the editor was scored on (`limit_val_batches` included).
        limit = trainer.num_val_batches[0] if trainer.num_val_batches else float("inf")
        batches = itertools.islice(trainer.datamodule.val_dataloader(), None if math.isinf(limit) else int(limit))
        for batch in batches:
            evaluate_batch(
                editor, pl_module.backbone, pl_module.transfer_batch_to_device(batch, pl_module.device, 0), metrics
            )
        return metrics.compute()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for editor in self.baselines.values():
            if isinstance(editor, IKE):
                editor.demonstrate(trainer.datamodule.split_records("train"))
        # The unedited column is always there (the FT run's `pre_` scores): no need to score it again.
        scored = {
            name: self._score(editor, trainer, pl_module)
            for name, editor in self.baselines.items()
            if name != "unedited"
        }
        baseline_report = self._score(FineTune(self.lr, self.steps), trainer, pl_module, unedited=True)
        method = type(pl_module).__name__.removesuffix("Module")
        # The editor a run keeps is its best checkpoint's, so that is the one to report.
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        report = (
            torch.load(best, map_location="cpu", weights_only=True).get(REPORT_KEY)
            if best
            else pl_module.last_report.get("val")
        )
        learned = {method: report} if report is not None else {}
        unedited = report_column(baseline_report, unedited=True)  # the same records, before any edit
        fine_tuned = {f"FT ({self.steps} step, lr {self.lr:g})": report_column(baseline_report)}
        others = {name: report_column(report) for name, report in scored.items()}
        self._report(trainer, {"unedited": unedited, **learned, **fine_tuned, **others})

    @rank_zero_only
    def _report(self, trainer: Trainer, columns: dict[str, dict]) -> None:
        table = metrics_table(columns)
        print("\nHeld-out edits (validation split):\n" + table)
        folder = run_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(table + "\n")


class TorchThreads(Callback):
    """Set torch's intra-op thread count when a run starts (`torch.set_num_threads`).

    Tiny models (the quick start's) are dominated by per-op overhead: on a 2-core machine one
    thread runs them faster than two, and much faster when anything else shares the cores.
    """

    def __init__(self, num_threads: int = 1) -> None:
        self.num_threads = num_threads

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        torch.set_num_threads(self.num_threads)
