"""Fixtures shared by the export and editor-API tests: a tiny synthetic world, a saved tiny BLIP-2,
short MEND and SERAC fits.

Imported by test_export.py and test_editor_api.py (each module builds its own copies: a few seconds).
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from data_modules.datamodules import VQADataModule
from data_modules.synthetic import write_synthetic_world
from data_modules.word_tokenizer import save_world_tokenizer
from kedit_lightning.backbones import BackboneSpec, build_backbone, load_backbone_spec
from kedit_lightning.export import ExportEditor
from kedit_lightning.modules import MENDModule
from kedit_lightning.modules.serac import ScopeEncoderSpec, SERACModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "backbones"
VAL_FILE = "vqa/val4.json"
VAL_RECORDS = 4  # one validation batch: `kedit eval` on this file scores exactly what validation scored

# Tiny models on a 2-core machine: one thread avoids oversubscription, which makes a tiny
# forward pass orders of magnitude slower.
torch.set_num_threads(1)


@dataclass
class Fitted:
    module: MENDModule
    artifact: Path
    best_checkpoint: Path | None


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_synthetic_world(root, entities=8)
    save_world_tokenizer(root)
    records = json.loads((root / "vqa" / "vqa_eval.json").read_text())
    (root / VAL_FILE).write_text(json.dumps(records[:VAL_RECORDS]))
    return root


@pytest.fixture(scope="session")
def base_dir(world, tmp_path_factory) -> Path:
    """A tiny random-weight BLIP-2 saved as a transformers directory: the backbone every test edits."""
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "blip2-tiny.yaml"), processor=str(world / "tokenizer"))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base") / "blip2-tiny"
    build_backbone(spec).save_pretrained(out)
    return out


def quiet_trainer(**options) -> Trainer:
    """A CPU Trainer for tests: gradients in evaluation (editing needs them), no logger, checkpoints, progress
    bar, model summary or sanity validation; `options` add to or override these."""
    return Trainer(
        **{
            "accelerator": "cpu",
            "inference_mode": False,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **options,
        }
    )


def base_spec(base_dir: Path) -> BackboneSpec:
    return BackboneSpec(
        family="blip2",
        pretrained=str(base_dir),
        edit_params=["language_model.model.decoder.layers.{1,2,3}.fc{1,2}.weight"],
    )


@pytest.fixture(scope="session")
def fitted(world, base_dir, tmp_path_factory) -> Fitted:
    """Two MEND training steps, one validation, the end-of-fit export (from the best checkpoint)."""
    torch.manual_seed(0)
    runs = tmp_path_factory.mktemp("runs")
    module = MENDModule(base_spec(base_dir), rank=16, lr=1e-3, edit_lr=1e-3)
    data = VQADataModule(str(world), train_file="vqa/vqa_train.json", val_file=VAL_FILE, batch_size=VAL_RECORDS)
    export = ExportEditor(dirpath=str(runs / "checkpoints"), name="mend-tiny")
    best = ModelCheckpoint(dirpath=runs / "ckpt", monitor="val/score", mode="max")
    trainer = Trainer(
        max_steps=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        inference_mode=False,
        accelerator="cpu",
        logger=False,
        callbacks=[export, best],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=runs,
    )
    trainer.fit(module, data)
    return Fitted(module, export.exported, Path(best.best_model_path))


TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


@pytest.fixture(scope="session")
def serac_fitted(world, base_dir, tmp_path_factory) -> Fitted:
    """Two SERAC training steps, one validation, the end-of-fit export (no ModelCheckpoint: the final editor)."""
    torch.manual_seed(0)
    runs = tmp_path_factory.mktemp("serac-runs")
    tokenizer = str(world / "tokenizer")
    counterfactual = dataclasses.replace(load_backbone_spec(CONFIGS / "text-tiny.yaml"), processor=tokenizer)
    module = SERACModule(
        base_spec(base_dir),
        counterfactual,
        ScopeEncoderSpec(config=TINY_BERT, tokenizer=tokenizer),
        lr=3e-3,
        classifier_lr=3e-3,
    )
    data = VQADataModule(str(world), train_file="vqa/vqa_train.json", val_file=VAL_FILE, batch_size=VAL_RECORDS)
    export = ExportEditor(dirpath=str(runs / "checkpoints"), name="serac-tiny")
    trainer = Trainer(
        max_steps=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        inference_mode=False,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[export],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=runs,
    )
    trainer.fit(module, data)
    return Fitted(module, export.exported, None)
