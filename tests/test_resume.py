"""Exact resume: a fit killed with SIGKILL and resumed with `--ckpt_path last` ends bitwise where the
uninterrupted fit ends (editor, optimizer, running statistics, random states, data position), from JSON
data and from shards, mid-epoch and at an epoch boundary; unresumable checkpoints stop with one line."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import VAL_FILE, quiet_trainer
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from test_shards import IndexOf, dataset
from torch.utils.data import DataLoader, TensorDataset

from data_modules.shards import ShardStream, StreamLoader, resolve_shards, write_shards
from kedit_lightning.backbones import load_backbone_spec
from kedit_lightning.errors import run_training_entry
from kedit_lightning.training_cli import LAST, AtomicCheckpointIO, main

REPO = Path(__file__).resolve().parents[1]
STEPS = 16  # the JSON epoch has 12 batches of 8 records (90 records), the sharded one 11: both cross a boundary
BATCH = 8
RUN = "tiny"


def fit_config(world: Path, runs: Path, shards: Path | None) -> Path:
    """A `train.py fit` config: MEND on the tiny BLIP-2, a checkpoint after every step and after each
    epoch's validation (one batch)."""
    spec = load_backbone_spec(REPO / "configs/backbones/blip2-tiny.yaml")
    data = {"data_dir": str(world), "train_file": "vqa/vqa_train.json", "val_file": VAL_FILE, "batch_size": BATCH}
    if shards is not None:
        data["train_shards"] = str(shards)
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "kedit_lightning.modules.MENDModule",
            "init_args": {
                "backbone": {
                    "family": spec.family,
                    "config": spec.config,
                    "processor": str(world / "tokenizer"),
                    "edit_params": spec.edit_params,
                },
                "rank": 8,
                "lr": 1e-3,
                "edit_lr": 1e-2,
            },
        },
        "data": {"class_path": "data_modules.datamodules.VQADataModule", "init_args": data},
        "trainer": {
            "max_steps": STEPS,
            "accelerator": "cpu",
            "inference_mode": False,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(runs), "name": RUN},
            },
            "callbacks": [
                {"class_path": "kedit_lightning.callbacks.TorchThreads"},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "save_last": True, "filename": "{step}"},
                },
                {  # as the quick start's: at the end of each epoch's validation
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"monitor": "val/score", "mode": "max", "save_top_k": -1, "filename": "val-{step}"},
                },
            ],
        },
    }
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def checkpoints(runs: Path, version: int = 0) -> Path:
    return runs / RUN / f"version_{version}" / "checkpoints"


def assert_same(left, right, where: str = "") -> None:
    """Bitwise equality of nested checkpoint contents (tensors with torch.equal)."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and left.dtype == right.dtype and torch.equal(left, right), where
    elif isinstance(left, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            assert_same(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), where
        for i, (a, b) in enumerate(zip(left, right)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert left == right, where


def assert_same_end(resumed: Path, uninterrupted: Path) -> None:
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (resumed, uninterrupted))
    assert a["global_step"] == b["global_step"] == STEPS and a["epoch"] == b["epoch"] == 1
    editor = [k for k in b["state_dict"] if k.startswith("editor.")]
    assert len(editor) > 30 and any(k.endswith("x_moments.count") for k in editor)
    assert_same(a["state_dict"], b["state_dict"], "state_dict")  # editor weights, running moments, skipped steps
    assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer")
    assert_same(a["kedit_rng_states"], b["kedit_rng_states"], "rng")
    assert_same(a["loops"]["fit_loop"]["state_dict"], b["loops"]["fit_loop"]["state_dict"], "data position")


@pytest.fixture(scope="module", params=["json", "shards"])
def uninterrupted(request, world, tmp_path_factory) -> tuple[Path, Path | None, Path]:
    """(world, shard index or None, the uninterrupted fit's runs folder)."""
    root = tmp_path_factory.mktemp(f"resume-{request.param}")
    shards = None
    if request.param == "shards":
        shards = write_shards(world / "vqa/vqa_train.json", world / "images", root / "shards", BATCH)
    runs = root / "uninterrupted"
    main(["fit", "--config", str(fit_config(world, runs, shards))])
    return world, shards, runs


def test_a_run_killed_mid_epoch_resumes_bitwise(uninterrupted, tmp_path):
    world, shards, reference = uninterrupted
    runs = tmp_path / "runs"
    config = fit_config(world, runs, shards)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (checkpoints(runs) / "step=2.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = torch.load(checkpoints(runs) / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 1 <= killed_at < 11  # mid first epoch (last.ckpt is written after step=N.ckpt)
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert not (runs / RUN / "version_1").exists()  # logged on into the resumed version
    assert_same_end(checkpoints(runs) / f"step={STEPS}.ckpt", checkpoints(reference) / f"step={STEPS}.ckpt")


@pytest.mark.parametrize("saved_after", ["step", "val-step"], ids=["last batch", "validation"])
def test_a_run_resumed_at_an_epoch_boundary_ends_bitwise(uninterrupted, tmp_path, saved_after):
    world, shards, reference = uninterrupted
    boundary = 11 if shards is not None else 12  # the first epoch's last step
    runs = tmp_path / "runs"
    checkpoints(runs).mkdir(parents=True)
    shutil.copy(checkpoints(reference) / f"{saved_after}={boundary}.ckpt", checkpoints(runs) / "last.ckpt")
    main(["fit", "--config", str(fit_config(world, runs, shards)), "--ckpt_path", "last"])
    assert_same_end(checkpoints(runs) / f"step={STEPS}.ckpt", checkpoints(reference) / f"step={STEPS}.ckpt")


def test_resuming_without_a_checkpoint_stops_with_one_line(world, tmp_path):
    config = fit_config(world, tmp_path / "runs", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), "--ckpt_path", "last"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "train.py: ResumeError: --ckpt_path last: no checkpoint of run 'tiny' to resume "
        f"(no {tmp_path / 'runs' / RUN}/version_*/checkpoints/last.ckpt); start it without --ckpt_path"
    ]
    assert not (tmp_path / "runs" / RUN).exists()  # nothing started


def test_a_truncated_checkpoint_stops_with_one_line_naming_it(world, uninterrupted, tmp_path, capsys):
    _, _, reference = uninterrupted
    runs = tmp_path / "runs"
    folder = checkpoints(runs, version=3)
    folder.mkdir(parents=True)
    shutil.copy(checkpoints(reference) / "step=2.ckpt", folder / "step=2.ckpt")
    whole = (checkpoints(reference) / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    argv = ["fit", "--config", str(fit_config(world, runs, None)), "--ckpt_path", "last"]
    assert run_training_entry(lambda: main(argv)) == 2  # as train.py runs it
    assert capsys.readouterr().err.strip().splitlines() == [
        f"train.py: ResumeError: {folder / 'last.ckpt'}: truncated or not a checkpoint (not a complete torch archive); "
        "other checkpoints there: step=2.ckpt"
    ]


def test_checkpoints_are_written_beside_their_name_and_renamed_into_place(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def killed_mid_write(obj, file):
        file.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert path.read_bytes() == before  # the previous checkpoint is whole


@pytest.mark.parametrize("stop_after", [0, 1, 3, 10, 11, 12])
def test_a_stream_resumed_mid_pass_yields_the_rest_of_the_pass(tmp_path, stop_after):
    dataset(tmp_path, 24, name="data.json")
    write_shards(tmp_path / "data.json", tmp_path / "images", tmp_path / "by5", 5)
    shards = resolve_shards(tmp_path / "by5")  # 5, 5, 5, 5, 4: the two workers' quotas are 7 and 5 batches of 2

    def loader() -> StreamLoader:
        return StreamLoader(ShardStream(shards, IndexOf(), 2, even=True, num_workers=2, shuffle=True), list)

    whole = list(loader())
    assert len(whole) == 12
    first = loader()
    batches = iter(first)
    seen = [next(batches) for _ in range(stop_after)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert seen + list(resumed) == whole


class ScoreFallsEachEpoch(LightningModule):
    """A one-weight module whose `val/score` is best after the first epoch and worse after each later one."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - batch[0]).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", 1.0 - 0.1 * self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def shipped_checkpoint_callbacks() -> dict[str, list[dict]]:
    """Each distinct ModelCheckpoint list of the shipped training configs, with the first config that has it."""
    distinct = {}
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        trainer = config.get("trainer") if isinstance(config, dict) else None
        callbacks = [
            callback
            for callback in ((trainer or {}).get("callbacks") or [])
            if callback.get("class_path", "").endswith("ModelCheckpoint")
        ]
        if callbacks:
            distinct.setdefault(yaml.safe_dump(callbacks), (path.relative_to(REPO).as_posix(), callbacks))
    return dict(distinct.values())


@pytest.mark.parametrize("config", sorted(shipped_checkpoint_callbacks()))
def test_every_shipped_config_keeps_last_ckpt_at_the_latest_epoch_and_the_best_apart(config, tmp_path):
    """Since Lightning 2.6 `save_last` copies only a checkpoint that was saved, so beside a best-only ModelCheckpoint
    `last.ckpt` stayed at the best epoch and `--ckpt_path last` went back to it, dropping the epochs after."""
    callbacks = [
        ModelCheckpoint(**callback.get("init_args", {})) for callback in shipped_checkpoint_callbacks()[config]
    ]
    data = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    trainer = quiet_trainer(
        max_epochs=3, enable_checkpointing=True, callbacks=callbacks, default_root_dir=tmp_path, log_every_n_steps=1
    )
    trainer.fit(ScoreFallsEachEpoch(), data, data)
    assert torch.load(tmp_path / "checkpoints" / LAST, weights_only=False)["epoch"] == 2, config
    # What ExportEditor exports: the first ModelCheckpoint's best, the first epoch here.
    assert torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)["epoch"] == 0, config
