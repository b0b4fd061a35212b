"""MEND meta-training under DDP (gloo, 2 CPU processes) is single-process training on the global batch.

The DDP run streams webdataset shards, split by rank as data_modules.shards describes; a
callback records, per rank, the record indices of every batch and the final editor. The
single-process run then trains on the same global batches (rank 0's records, then rank 1's) and
must end with the same editor, MEND's normalisation statistics included. One step has a NaN on
rank 1 only: every rank, and the single process, must skip it.

This file is also the DDP script: the test runs it with `python`, and Lightning's "ddp" launcher
starts rank 1 by running it again (a subprocess, so nothing of pytest's process is forked).
"""

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from lightning import Callback, Trainer
from test_mend_module import make_module
from torch.utils.data import DataLoader

from data_modules.datamodules import VQADataModule
from data_modules.datasets import EditCollator, EditDataset
from data_modules.records import read_records
from data_modules.shards import write_shards

REPO = Path(__file__).resolve().parents[1]
RECORDS = 8  # 4 shards of 2: each of 2 ranks reads 2 shards, i.e. 2 full batches of 2 per epoch
RECORDS_PER_RANK_BATCH = 2
EPOCHS = 2
DISTRIBUTED_VARIABLES = {
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
}
POISONED_BATCH = 1  # the second training batch: NaN images on rank 1 (rows 2..3 of the global batch)


class Poison(Callback):
    """NaN images in `rows` of the edit sub-batch of the `at`-th training batch on `rank`."""

    def __init__(self, at: int, rank: int, rows: slice) -> None:
        self.at, self.rank, self.rows, self.batches = at, rank, rows, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batches == self.at and trainer.global_rank == self.rank:
            batch["edit_inner"]["pixel_values"][self.rows] = float("nan")
        self.batches += 1


class Recorder(Callback):
    """Per rank: (epoch, record indices) of every training batch, then the editor and skipped steps."""

    def __init__(self, out: Path) -> None:
        self.out, self.batches = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((trainer.current_epoch, [meta["index"] for meta in batch["meta"]]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        result = {
            "batches": self.batches,
            "editor": pl_module.editor.state_dict(),
            "skipped_steps": int(pl_module.skipped_steps),
        }
        torch.save(result, self.out / f"rank{trainer.global_rank}.pt")


def trainer(callbacks, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **kwargs,
    )


def ddp_main(world: Path, shards: Path, subset: Path, out: Path) -> None:
    torch.set_num_threads(1)
    module = make_module(world)
    data = VQADataModule(
        str(world),
        train_file=str(subset),
        val_file="vqa/vqa_eval.json",
        batch_size=RECORDS_PER_RANK_BATCH,
        train_shards=str(shards),
    )
    callbacks = [Poison(POISONED_BATCH, rank=1, rows=slice(None)), Recorder(out)]
    trainer(callbacks, devices=2, strategy="ddp", max_epochs=EPOCHS).fit(module, datamodule=data)


def launch_environment() -> dict[str, str]:
    """This process's environment without cluster or torchrun variables (Lightning would join
    that cluster instead of launching its own two processes), on one thread per process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in DISTRIBUTED_VARIABLES
    }
    return {**env, "OMP_NUM_THREADS": "1"}


def exit_launched_rank() -> None:
    """End a rank of a launched test script once its work is written. All ranks meet first, so none
    closes its gloo connections while another still uses them; then the process leaves without running
    exit-time destructors, where gloo's threads can abort a finished run ("terminate called without an
    active exception", seen on CI after every file was written)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_training_equals_single_process_training_on_the_global_batch(world, tmp_path):
    subset = tmp_path / "train.json"
    subset.write_text(json.dumps(json.loads((world / "vqa" / "vqa_train.json").read_text())[:RECORDS]))
    shards = write_shards(subset, world / "images", tmp_path / "shards", shard_size=RECORDS_PER_RANK_BATCH)
    out = tmp_path / "ddp"
    run = subprocess.run(
        [sys.executable, __file__, str(world), str(shards), str(subset), str(out)],
        cwd=REPO,
        env=launch_environment(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # Every record exactly once per epoch, across both ranks; equal batch counts per rank.
    per_rank = [rank["batches"] for rank in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == EPOCHS * RECORDS // (2 * RECORDS_PER_RANK_BATCH)
    for epoch in range(EPOCHS):
        seen = Counter(i for batches in per_rank for e, indices in batches if e == epoch for i in indices)
        assert seen == Counter(range(RECORDS)), f"epoch {epoch}: {seen}"

    # The ranks agree with each other, and skipped the step only rank 1 found non-finite.
    assert ranks[0]["skipped_steps"] == ranks[1]["skipped_steps"] == 1
    for key, value in ranks[0]["editor"].items():
        assert torch.equal(value, ranks[1]["editor"][key]), key

    # One process on the same global batches: rank 0's records, then rank 1's, step by step.
    global_batches = [first + second for (_, first), (_, second) in zip(*per_rank)]
    single = make_module(world)
    dataset = EditDataset(read_records(subset), world / "images", "vqa")
    loader = DataLoader(dataset, batch_sampler=global_batches, collate_fn=EditCollator(single.backbone.processor))
    recorder = Recorder(tmp_path / "single")
    poison = Poison(POISONED_BATCH, rank=0, rows=slice(RECORDS_PER_RANK_BATCH, None))
    trainer([poison, recorder], max_epochs=1).fit(single, train_dataloaders=loader)
    assert [indices for _, indices in recorder.batches] == global_batches
    assert int(single.skipped_steps) == 1

    trained = single.editor.state_dict()
    counts = [value for key, value in trained.items() if key.endswith("moments.count")]
    assert counts and all(count > 0 for count in counts)
    initial = make_module(world).editor.state_dict()
    assert sum(not torch.equal(value, initial[key]) for key, value in trained.items()) > len(trained) // 2
    for key, value in trained.items():
        torch.testing.assert_close(ranks[0]["editor"][key], value, rtol=1e-4, atol=1e-6, msg=key)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the DDP half of test_ddp.py")
    for name in ("world", "shards", "subset", "out"):
        parser.add_argument(name, type=Path)
    args = parser.parse_args()
    ddp_main(args.world, args.shards, args.subset, args.out)
    exit_launched_rank()
