"""Callbacks that turn a meta-training run into a report."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from kedit_lightning.editors.ft import FineTune
from kedit_lightning.evaluation import EditMetrics, evaluate_batch, flatten_report
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


class CompareWithFineTuning(Callback):
    """At the end of a fit: score the FT baseline on the validation edits, print both side by side.

    The baseline fine-tunes the same edited layers with `steps` gradient steps at `lr`; with one
    step it has the same gradient budget as MEND. The table also lands in the run's log folder.
    """

    def __init__(self, lr: float = 1e-2, steps: int = 1) -> None:
        self.lr = lr
        self.steps = steps

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = EditMetrics(pl_module.hparams.hops).to(pl_module.device)
        # The same validation batches the editor was scored on (`limit_val_batches` included).
        limit = trainer.num_val_batches[0] if trainer.num_val_batches else float("inf")
        batches = itertools.islice(trainer.datamodule.val_dataloader(), None if math.isinf(limit) else int(limit))
        baseline = FineTune(self.lr, self.steps)
        for batch in batches:
            evaluate_batch(
                baseline, pl_module.backbone, pl_module.transfer_batch_to_device(batch, pl_module.device, 0), metrics
            )
        baseline_report = metrics.compute()
        method = type(pl_module).__name__.removesuffix("Module")
        # The editor a run keeps is its best checkpoint's, so that is the one to report.
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        report = (
            torch.load(best, map_location="cpu", weights_only=True).get(REPORT_KEY)
            if best
            else pl_module.last_report.get("val")
        )
        learned = {method: report} if report is not None else {}
        # Read on every rank: under several processes `log_dir` is a broadcast from rank 0.
        self._report(trainer.log_dir, {**learned, f"FT ({self.steps} step, lr {self.lr:g})": baseline_report})

    @rank_zero_only
    def _report(self, log_dir: str | None, columns: dict[str, dict]) -> None:
        table = metrics_table(columns)
        print("\nHeld-out edits (validation split):\n" + table)
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / "report.md").write_text(table + "\n")


class TorchThreads(Callback):
    """Set torch's intra-op thread count when a run starts (`torch.set_num_threads`).

    Tiny models (the quick start's) are dominated by per-op overhead: on a 2-core machine one
    thread runs them faster than two, and much faster when anything else shares the cores.
    """

    def __init__(self, num_threads: int = 1) -> None:
        self.num_threads = num_threads

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        torch.set_num_threads(self.num_threads)
