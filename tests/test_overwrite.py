"""Nothing overwritten, nothing reused silently: exports and run files go to fresh folders, a base model
knows the world and config it was built from, an editor knows the weights it was trained on, and
editor.json values outside sane ranges are refused."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIGS, VAL_FILE, VAL_RECORDS, base_spec
from lightning import Trainer
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import load_file, save_file

from data_modules.datamodules import VQADataModule
from data_modules.synthetic import write_synthetic_world
from kedit_lightning.artifact import CARD_FILE, WEIGHTS_FILE, ArtifactError, FingerprintMismatch, sha256_of
from kedit_lightning.backbones import BackboneSpec, build_backbone, load_backbone_spec
from kedit_lightning.callbacks import CompareWithFineTuning, RunFolderConfig
from kedit_lightning.cli import main
from kedit_lightning.editor import Editor
from kedit_lightning.export import ExportEditor
from kedit_lightning.modules import MENDModule
from kedit_lightning.modules.backbone import BASE_RECORD, prepare_base


def fit_once(base_dir: Path, world: Path, root: Path, logger, callbacks) -> Trainer:
    """One MEND training step without validation: enough for the run's files to be written."""
    torch.manual_seed(0)
    module = MENDModule(base_spec(base_dir), rank=4, lr=1e-3, edit_lr=1e-3)
    data = VQADataModule(str(world), train_file="vqa/vqa_train.json", val_file=VAL_FILE, batch_size=VAL_RECORDS)
    trainer = Trainer(
        max_steps=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        inference_mode=False,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, data)
    return trainer


def test_a_second_fit_exports_beside_the_first_without_touching_it(base_dir, world, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    exports = []
    for logs in ("runs", "runs-moved-away"):  # the same logger name and version twice, as after `mv runs ...`
        export = ExportEditor(dirpath=str(checkpoints))
        fit_once(base_dir, world, tmp_path, TensorBoardLogger(str(tmp_path / logs), name="run", version=0), [export])
        exports.append(export.exported)
        if len(exports) == 1:
            first = {p.name: p.read_bytes() for p in exports[0].iterdir()}
    assert exports == [checkpoints / "run" / "version_0", checkpoints / "run" / "version_1"]
    assert {p.name: p.read_bytes() for p in exports[0].iterdir()} == first
    # overwrite: true writes into the logger's folder again.
    export = ExportEditor(dirpath=str(checkpoints), overwrite=True)
    fit_once(base_dir, world, tmp_path, TensorBoardLogger(str(tmp_path / "again"), name="run", version=0), [export])
    assert export.exported == checkpoints / "run" / "version_0"


def test_by_default_the_editor_goes_into_the_run_folder_never_over_an_earlier_one(base_dir, world, tmp_path):
    exports = []
    for overwrite in (False, False, True):  # the same version folder each time, as when a run is resumed
        export = ExportEditor(overwrite=overwrite)
        fit_once(base_dir, world, tmp_path, TensorBoardLogger(str(tmp_path / "runs"), name="run", version=0), [export])
        exports.append(export.exported)
    run = tmp_path / "runs" / "run" / "version_0"
    assert exports == [run / "editor", run / "editor_1", run / "editor"]
    assert not (tmp_path / "checkpoints").exists()


def test_without_a_logger_run_files_land_in_a_fresh_run_folder(base_dir, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        fit_once(base_dir, world, tmp_path, False, [CompareWithFineTuning(), ExportEditor()])
    unlogged = tmp_path / "runs" / "unlogged"
    assert sorted(p.name for p in unlogged.iterdir()) == ["version_0", "version_1"]
    assert all((unlogged / v / "report.md").is_file() for v in ("version_0", "version_1"))
    header = (unlogged / "version_0" / "report.md").read_text().splitlines()[0]
    assert header.startswith("| metric | unedited |") and "| FT (1 step" in header  # the unedited column first
    assert all((unlogged / v / "editor" / "editor.json").is_file() for v in ("version_0", "version_1"))
    assert not (tmp_path / "report.md").exists()


def test_lightning_cli_config_goes_to_the_run_folder_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--model=lightning.pytorch.demos.boring_classes.BoringModel",
        "--data=lightning.pytorch.demos.boring_classes.BoringDataModule",
        "--trainer.logger=false",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
    ]
    for _ in range(2):
        LightningCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunFolderConfig,
            args=args,
        )
    assert not (tmp_path / "config.yaml").exists()
    unlogged = tmp_path / "runs" / "unlogged"
    assert [(unlogged / v / "config.yaml").is_file() for v in ("version_0", "version_1")] == [True, True]


@pytest.fixture(scope="module")
def bootstrap_config(world, tmp_path_factory) -> Path:
    """A one-step bootstrap of the tiny BLIP-2 on the session's world, exporting to `<folder>/base`."""
    folder = tmp_path_factory.mktemp("bootstrap")
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "blip2-tiny.yaml"), processor=str(world / "tokenizer"))
    (folder / "backbone.yaml").write_text(yaml.safe_dump(dataclasses.asdict(spec)))
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "kedit_lightning.modules.backbone.BackboneModule",
            "init_args": {"backbone": "backbone.yaml", "export_dir": str(folder / "base")},
        },
        "data": {
            "class_path": "data_modules.datamodules.FactsDataModule",
            "init_args": {"data_dir": str(world), "train_file": "vqa/vqa_train.json", "val_file": VAL_FILE},
        },
        "trainer": {
            "max_steps": 1,
            "limit_val_batches": 0,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
        },
    }
    (folder / "bootstrap.yaml").write_text(yaml.safe_dump(config))
    return folder / "bootstrap.yaml"


def bootstrapped_spec(pretrained: Path, bootstrap: Path | None) -> BackboneSpec:
    return BackboneSpec(
        family="blip2", pretrained=str(pretrained), bootstrap=None if bootstrap is None else str(bootstrap)
    )


def test_a_base_is_built_once_records_its_world_and_is_not_reused_for_another(bootstrap_config, world, tmp_path):
    base = bootstrap_config.parent / "base"
    spec = bootstrapped_spec(base, bootstrap_config)
    prepare_base(spec, world)
    record = json.loads((base / BASE_RECORD).read_text())
    assert record["world"]["seed"] == 0 and record["world"]["file"] == str(world / "world.json")
    assert record["bootstrap"]["config"] == str(bootstrap_config)
    config_bytes = (base / "config.json").read_bytes()
    prepare_base(spec, world)  # the same world: reused as it is
    assert (base / "config.json").read_bytes() == config_bytes
    other_world = tmp_path / "world1"
    write_synthetic_world(other_world, seed=1, entities=8)
    with pytest.raises(
        ValueError, match=r"learned the synthetic world .* \(seed 0\), this run's data is .* \(seed 1\)"
    ):
        prepare_base(spec, other_world)
    unrecorded = Path(shutil.copytree(base, tmp_path / "unrecorded"))
    (unrecorded / BASE_RECORD).unlink()
    with pytest.warns(UserWarning, match="has no kedit_base.json .* which world it learned is not checked"):
        prepare_base(bootstrapped_spec(unrecorded, bootstrap_config), other_world)
    changed = tmp_path / "bootstrap.yaml"
    changed.write_text(bootstrap_config.read_text().replace("max_steps: 1", "max_steps: 2"))
    with pytest.raises(ValueError, match="was built from other contents of"):
        prepare_base(bootstrapped_spec(base, changed), world)


def test_a_typo_in_pretrained_is_an_error_not_a_bootstrap(bootstrap_config, world, tmp_path):
    typo = bootstrap_config.parent / "bsae"
    with pytest.raises(FileNotFoundError, match="no such model folder; its bootstrap .* builds .*base .a typo"):
        prepare_base(bootstrapped_spec(typo, bootstrap_config), world)
    assert not typo.exists()
    with pytest.raises(FileNotFoundError, match="bsae: no such model folder .and no bootstrap"):
        prepare_base(bootstrapped_spec(typo, None), world)
    prepare_base(bootstrapped_spec(Path("Salesforce/blip2-opt-2.7b"), None), world)  # a hub id: from_pretrained's


@pytest.fixture(scope="module")
def other_base(base_dir, world, tmp_path_factory) -> Path:
    """The tiny BLIP-2 of `base_dir`'s architecture with other random weights."""
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "blip2-tiny.yaml"), processor=str(world / "tokenizer"))
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("other") / "blip2-tiny"
    build_backbone(spec).save_pretrained(out)
    return out


def test_an_editor_refuses_other_weights_of_its_architecture_unless_allowed(fitted, base_dir, other_base):
    editor = Editor.from_pretrained(fitted.artifact)
    with pytest.raises(FingerprintMismatch, match=r"trained on other weights .*--allow-other-weights") as refused:
        editor.load_backbone(str(other_base))
    assert "\n" not in str(refused.value)
    assert editor.load_backbone(str(other_base), allow_other_weights=True).family == "blip2"
    # Its own base in another dtype is the same weights.
    Editor.from_pretrained(fitted.artifact).load_backbone(str(base_dir), dtype="bfloat16")


def test_kedit_eval_refuses_other_weights_in_one_line_and_takes_the_flag(fitted, world, other_base, tmp_path, capsys):
    args = ["eval", "--editor", str(fitted.artifact), "--backbone", str(other_base), "--data", str(world / VAL_FILE)]
    args += ["--images", str(world / "images"), "--device", "cpu", "--json", str(tmp_path / "report.json")]
    assert main(args) == 2
    error = capsys.readouterr().err
    # The last line is kedit's (transformers may draw a loading bar before it).
    assert "Traceback" not in error and error.endswith("\n")
    assert error.splitlines()[-1].rpartition("\r")[2].startswith("kedit eval: FingerprintMismatch: the editor in")
    assert "trained on other weights" in error.splitlines()[-1]
    assert main([*args, "--allow-other-weights", "--no-progress"]) == 0
    assert (tmp_path / "report.json").is_file()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("edit_lr", 1e6, r"editor.config.edit_lr is 1000000.0; it must be a finite number in \(0, 100\]"),
        ("edit_lr", float("nan"), "editor.config.edit_lr is nan"),
        ("rank", 0, "editor.config.rank is 0; it must be an integer >= 1"),
        ("param_shapes", {"w": [0, 4]}, "editor.config.param_shapes is"),
    ],
)
def test_editor_json_values_outside_sane_ranges_are_refused(fitted, tmp_path, field, value, message):
    artifact = Path(shutil.copytree(fitted.artifact, tmp_path / "artifact"))
    card = json.loads((artifact / CARD_FILE).read_text())
    card["editor"]["config"][field] = value
    (artifact / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match=message):
        Editor.from_pretrained(artifact)


def test_trained_edit_lrs_outside_sane_ranges_are_refused(fitted, tmp_path):
    artifact = Path(shutil.copytree(fitted.artifact, tmp_path / "artifact"))
    tensors = load_file(artifact / WEIGHTS_FILE)
    tensors["edit_lrs"] = tensors["edit_lrs"] * 1e6
    save_file(tensors, artifact / WEIGHTS_FILE)
    card = json.loads((artifact / CARD_FILE).read_text())
    card["weights"]["sha256"] = sha256_of(artifact / WEIGHTS_FILE)
    (artifact / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match=r"editor.safetensors: tensor edit_lrs holds 1\d\d\d.*; .* within 100"):
        Editor.from_pretrained(artifact)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("threshold", 1.5, "editor.config.threshold is 1.5; it must be a number strictly between 0 and 1"),
        ("image_tokens", 0, "editor.config.image_tokens is 0; it must be an integer >= 1"),
    ],
)
def test_serac_editor_json_values_outside_sane_ranges_are_refused(serac_fitted, tmp_path, field, value, message):
    artifact = Path(shutil.copytree(serac_fitted.artifact, tmp_path / "artifact"))
    card = json.loads((artifact / CARD_FILE).read_text())
    card["editor"]["config"][field] = value
    (artifact / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match=message):
        Editor.from_pretrained(artifact)
