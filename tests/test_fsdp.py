"""MEND with the frozen backbone sharded (FSDP2 under Lightning's ModelParallelStrategy; gloo, 2 CPU
processes): each rank holds half the backbone and the whole edited weights, edits exactly as the
unsharded model does, trains as one process does on the global batch (a step non-finite on one
rank skipped by all), and validates as one process does.

One launched script (this file, as test_ddp.py runs itself) runs two sharded fits: the tiny BLIP-2
in float32 (vision layers, Q-Former attention, OPT layers with a tied embedding), for exact
comparisons, and the tiny LLaVA in bfloat16 under `precision="bf16-mixed"` (CLIP and LLaMA
layers), the set-up of configs/strategies/fsdp.yaml on the 7B configs. At the start of each fit every
rank records what it holds of the backbone and edits one validation record; each then trains a
few steps. A sharded `validate` of the tiny BLIP-2 follows.

`EditorModule.configure_model` shards the module under ModelParallelStrategy (`shard_editor_module`);
calling it again changes nothing.
"""

import argparse
import functools
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from oracle import run_with
from test_ddp import Poison, Recorder, exit_launched_rank, launch_environment, trainer
from test_mend_module import make_module
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from data_modules.datamodules import VQADataModule
from data_modules.datasets import EditCollator, EditDataset
from data_modules.records import read_records
from kedit_lightning.callbacks import CompareWithFineTuning
from kedit_lightning.editor import Editor
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.mend import MEND
from kedit_lightning.evaluation import flatten_report
from kedit_lightning.export import ExportEditor
from kedit_lightning.modules import MENDModule

REPO = Path(__file__).resolve().parents[1]
RECORDS_PER_RANK_BATCH = 2
STEPS = {"blip2": 4, "llava": 2}
POISONED_BATCH = 1  # the float32 run's second batch: NaN images on rank 1, a step every process must skip
PRECISION = {"blip2": "32-true", "llava": "bf16-mixed"}


MODULES = {
    "blip2": make_module,
    # The tiny LLaVA held in bfloat16, as the 7B configs hold theirs.
    "llava": functools.partial(make_module, backbone="llava-tiny.yaml", dtype="bfloat16"),
}


def probe_record(world: Path, module: MENDModule) -> dict:
    """The first validation record as a one-record EditBatch."""
    dataset = EditDataset(read_records(world / "vqa" / "vqa_eval.json"), world / "images", "vqa")
    return EditCollator(module.backbone.processor)([dataset[0]])


def edit_probe(module: MENDModule, record: dict, bf16: bool) -> dict[str, dict[str, torch.Tensor] | torch.Tensor]:
    """The edited weights for the record's edit, the post-edit logits on its rephrase and the image
    features of its image, editor in eval mode (an edit in training mode would add to the first
    step's pending statistics)."""
    was_training = module.training
    module.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        inputs = StepInputs(module.backbone, {"edit": record["edit_inner"]})
        model = module.editor.edited_model(module.backbone)
        module.editor(model, inputs, inputs.rows("edit"), batched=True)
        params = model.weights()
        with torch.no_grad():
            post = run_with(module.backbone, record["edit_outer"], params)
            image = module.backbone.image_features(record["edit_inner"]["pixel_values"])
    module.train(was_training)
    return {
        "edit": {name: w.detach().float() for name, w in params.items()},
        "post_logits": post.float(),
        "image_features": image.float(),
    }


class Probe(Callback):
    """At fit start, per rank: each backbone parameter's local and full element counts, whether it is
    a DTensor, the edited weights as held, and `edit_probe` on one record."""

    def __init__(self, out: Path, record: dict, bf16: bool) -> None:
        self.out, self.record, self.bf16 = out, record, bf16

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.configure_model()  # Lightning called it once (sharding the module); again must change nothing
        params = dict(pl_module.backbone.model.named_parameters())
        held = {
            name: {
                "sharded": isinstance(p, DTensor),
                "local": (p.to_local() if isinstance(p, DTensor) else p).numel(),
                "full": p.numel(),
            }
            for name, p in params.items()
        }
        edited = {name: params[name].detach().float().clone() for name in pl_module.backbone.edit_param_names}
        result = {"held": held, "edited": edited, **edit_probe(pl_module, self.record, self.bf16)}
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(result, self.out / f"probe{trainer.global_rank}.pt")


def sharded_main(world: Path, out: Path) -> None:
    torch.set_num_threads(1)
    for family, make in MODULES.items():
        module = make(world)
        data = vqa_data(world)
        record = probe_record(world, module)
        callbacks = [Probe(out / family, record, bf16=PRECISION[family] == "bf16-mixed"), Recorder(out / family)]
        if family == "blip2":
            callbacks.append(Poison(POISONED_BATCH, rank=1, rows=slice(None)))
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        trainer(callbacks, devices=2, strategy=strategy, precision=PRECISION[family], max_steps=STEPS[family]).fit(
            module, datamodule=data
        )
    module = make_module(world)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    validator(devices=2, strategy=strategy).validate(module, datamodule=vqa_data(world))
    torch.save(module.last_report["val"], out / f"validation{torch.distributed.get_rank()}.pt")
    # The end-of-fit callbacks of the real configs.
    callbacks = [ExportEditor(dirpath=str(out / "exported"), name="mend"), CompareWithFineTuning()]
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    finisher = validator(
        devices=2,
        strategy=strategy,
        max_steps=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        default_root_dir=out / "root",
        callbacks=callbacks,
    )
    finisher.fit(make_module(world), datamodule=vqa_data(world))


def validator(**kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def vqa_data(world: Path) -> VQADataModule:
    return VQADataModule(
        str(world), train_file="vqa/vqa_train.json", val_file="vqa/vqa_eval.json", batch_size=RECORDS_PER_RANK_BATCH
    )


@pytest.fixture(scope="module")
def sharded(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    run = subprocess.run(
        [sys.executable, __file__, str(world), str(out)],
        cwd=REPO,
        env=launch_environment(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return out


def load_ranks(out: Path, prefix: str) -> list[dict]:
    return [torch.load(out / f"{prefix}{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize("family", list(MODULES))
def test_each_rank_holds_half_the_backbone_and_the_whole_edited_weights(sharded, world, family):
    probes = load_ranks(sharded / family, "probe")
    unsharded = MODULES[family](world)
    edited = set(unsharded.backbone.edit_param_names)
    held = [probe["held"] for probe in probes]
    assert set(held[0]) == set(held[1]) == set(dict(unsharded.backbone.model.named_parameters()))
    for name, (first, second) in ((name, (held[0][name], held[1][name])) for name in held[0]):
        if name in edited:
            assert not first["sharded"] and first["local"] == second["local"] == first["full"], name
        else:
            assert first["sharded"] and second["sharded"], name
            assert first["local"] + second["local"] == first["full"], name
    frozen = [name for name in held[0] if name not in edited]
    total = sum(held[0][name]["full"] for name in frozen)
    for rank_held in held:
        assert abs(sum(rank_held[name]["local"] for name in frozen) / total - 0.5) < 0.05
    for probe in probes:
        for name in edited:
            assert torch.equal(probe["edited"][name], unsharded.backbone.model.get_parameter(name).detach().float()), (
                name
            )


# The same operations on the same (all-gathered) weights: observed bitwise equal in float32 and
# bfloat16 alike. A bfloat16 edit of the tiny model moves weights by about one rounding step
# (1e-3), so any looser tolerance would accept no edit at all.
EDIT_TOLERANCE = {"rtol": 0.0, "atol": 1e-6}


@pytest.mark.parametrize("family", list(MODULES))
def test_an_edit_under_sharding_is_the_unsharded_edit(sharded, world, family):
    unsharded = MODULES[family](world)
    expected = edit_probe(unsharded, probe_record(world, unsharded), bf16=PRECISION[family] == "bf16-mixed")
    initial = {
        name: unsharded.backbone.model.get_parameter(name).detach().float()
        for name in unsharded.backbone.edit_param_names
    }
    assert all(not torch.equal(expected["edit"][name], w) for name, w in initial.items())
    for probe in load_ranks(sharded / family, "probe"):
        for name, weight in expected["edit"].items():
            torch.testing.assert_close(probe["edit"][name], weight, **EDIT_TOLERANCE, msg=name)
        for key in ("post_logits", "image_features"):
            torch.testing.assert_close(probe[key], expected[key], **EDIT_TOLERANCE, msg=key)


def test_sharded_training_equals_single_process_training_on_the_global_batch(sharded, world):
    ranks = load_ranks(sharded / "blip2", "rank")
    per_rank = [rank["batches"] for rank in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == STEPS["blip2"]
    assert ranks[0]["skipped_steps"] == ranks[1]["skipped_steps"] == 1
    for key, value in ranks[0]["editor"].items():
        assert torch.equal(value, ranks[1]["editor"][key]), key

    global_batches = [first + second for (_, first), (_, second) in zip(*per_rank)]
    assert all(len(set(batch)) == 2 * RECORDS_PER_RANK_BATCH for batch in global_batches)
    single = make_module(world)
    dataset = EditDataset(read_records(world / "vqa" / "vqa_train.json"), world / "images", "vqa")
    loader = DataLoader(dataset, batch_sampler=global_batches, collate_fn=EditCollator(single.backbone.processor))
    poison = Poison(POISONED_BATCH, rank=0, rows=slice(RECORDS_PER_RANK_BATCH, None))
    trainer([poison], max_epochs=1).fit(single, train_dataloaders=loader)
    assert int(single.skipped_steps) == 1

    trained = single.editor.state_dict()
    initial = make_module(world).editor.state_dict()
    assert sum(not torch.equal(value, initial[key]) for key, value in trained.items()) > len(trained) // 2
    for key, value in trained.items():
        torch.testing.assert_close(ranks[0]["editor"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_sharded_validation_reports_what_single_process_validation_reports(sharded, world):
    reports = load_ranks(sharded, "validation")
    single = make_module(world)
    validator(devices=1).validate(single, datamodule=vqa_data(world))
    expected = flatten_report(single.last_report["val"])
    assert expected["n_edits"] == len(read_records(world / "vqa" / "vqa_eval.json"))
    for report in reports:
        scored = flatten_report(report)
        assert scored.keys() == expected.keys() and expected
        for key, value in expected.items():
            assert abs(scored[key] - value) < 1e-6, key


def test_the_end_of_fit_callbacks_run_under_sharding(sharded):
    # The replicated editor exports as the plain MEND it was before sharding wrapped it.
    assert type(Editor.from_pretrained(sharded / "exported" / "mend" / "version_0").editor) is MEND
    # No logger: the report goes to a fresh run folder under default_root_dir.
    assert "| reliability |" in (sharded / "root" / "runs" / "unlogged" / "version_0" / "report.md").read_text()


def test_bf16_sharded_training_is_finite_and_the_ranks_agree(sharded, world):
    ranks = load_ranks(sharded / "llava", "rank")
    assert ranks[0]["skipped_steps"] == ranks[1]["skipped_steps"] == 0
    initial = MODULES["llava"](world).editor.state_dict()
    editor = ranks[0]["editor"]
    assert any(not torch.equal(value, initial[key]) for key, value in editor.items() if value.is_floating_point())
    for key, value in editor.items():
        assert torch.isfinite(value.float()).all(), key
        assert torch.equal(value, ranks[1]["editor"][key]), key


@pytest.mark.parametrize(
    "config",
    [
        "mend/llava-1.5-7b-vqa",
        "mend/minigpt4-vqa",
        "serac/llava-1.5-7b-vqa",
        *(
            f"{method}/{model}-7b-vqa"
            for method in ("mend", "serac")
            for model in ("qwen2-vl", "qwen2.5-vl", "llava-onevision")
        ),
    ],
)
def test_the_fsdp_overlay_shards_the_7b_configs(config, capsys, monkeypatch):
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train.py",
            "fit",
            "--config",
            f"configs/{config}.yaml",
            "--config",
            "configs/strategies/fsdp.yaml",
            "--print_config",
        ],
    )
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    trainer_config, strategy = printed["trainer"], printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert (
        strategy["init_args"]["data_parallel_size"] == trainer_config["devices"]
        and strategy["init_args"]["tensor_parallel_size"] == 1
    )
    assert (
        trainer_config["precision"] == "bf16-mixed" and printed["model"]["init_args"]["backbone"]["dtype"] == "bfloat16"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the sharded half of test_fsdp.py")
    parser.add_argument("world", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    sharded_main(args.world, args.out)
    exit_launched_rank()
