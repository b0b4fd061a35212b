"""Meta-training helps: on the synthetic world's held-out text edits, a briefly trained MEND beats the
identity-initialised MEND it started from and FT-L; the end-of-fit table shows the baselines."""

import copy
import dataclasses

import pytest
import torch
from conftest import CONFIGS, quiet_trainer
from lightning import Callback, Trainer, seed_everything

from data_modules.datamodules import TextEditDataModule
from kedit_lightning.backbones import load_backbone_spec
from kedit_lightning.baselines import load_baseline
from kedit_lightning.callbacks import CompareWithFineTuning
from kedit_lightning.evaluation import EditMetrics, evaluate_batch, headline
from kedit_lightning.modules import MENDModule


class KeepInitialEditor(Callback):
    def on_fit_start(self, trainer: Trainer, pl_module: MENDModule) -> None:
        self.editor = copy.deepcopy(pl_module.editor)


def held_out(editor, module: MENDModule, data: TextEditDataModule) -> dict[str, float]:
    metrics = EditMetrics()
    for batch in data.val_dataloader():
        evaluate_batch(editor.eval(), module.backbone, batch, metrics)
    report = metrics.compute()
    return {**{key: report[key] for key in headline(report)}, "score": sum(report[k] for k in headline(report)) / 3}


def test_a_briefly_trained_mend_beats_its_initialisation_and_ft_l(world, tmp_path, capsys):
    seed_everything(0)
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "text-tiny.yaml"), processor=str(world / "tokenizer"))
    module = MENDModule(spec, rank=16, lr=1e-3, edit_lr=1e-2, lr_lr=1e-3, cedit=0.1, cloc=10.0)
    data = TextEditDataModule(str(world), batch_size=8)  # val: the held-out entities' edits
    initial = KeepInitialEditor()
    table = CompareWithFineTuning(baselines=["unedited", "ike"])
    trainer = quiet_trainer(
        max_steps=100,
        check_val_every_n_epoch=10**6,  # no validation during the fit: the test scores held-out edits itself
        default_root_dir=tmp_path,
        callbacks=[initial, table],
    )
    trainer.fit(module, data)
    with torch.no_grad():
        trained = held_out(module.editor, module, data)
        untrained = held_out(initial.editor, module, data)
        ft_l = held_out(load_baseline("ft-l")[1], module, data)
    for other in (untrained, ft_l):
        assert trained["score"] > other["score"] + 0.05, (trained, untrained, ft_l)
        assert trained["reliability"] > other["reliability"] and trained["t_generality"] > other["t_generality"]
    assert trained["t_locality"] >= 0.5, trained  # not by answering the new target everywhere

    report = (tmp_path / "runs" / "unlogged" / "version_0" / "report.md").read_text()
    assert report.splitlines()[0] == "| metric | unedited | FT (1 step, lr 0.01) | ike |"
    assert "| t_locality | 1.000 |" in report  # the unedited model agrees with itself


def test_the_end_of_fit_table_refuses_answer_only_baselines_under_an_every_position_protocol(world, tmp_path):
    """IKE answers only at the answer positions, and protocol easyedit reads every position: the fit stops at
    setup, as `kedit eval --protocol easyedit --baseline ike` does, before any training step."""
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "text-tiny.yaml"), processor=str(world / "tokenizer"))
    module = MENDModule(spec, protocol="easyedit")
    trainer = quiet_trainer(
        max_steps=1,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        callbacks=[CompareWithFineTuning(baselines=["unedited", "lora", "ike"])],
    )
    with pytest.raises(
        ValueError, match="^CompareWithFineTuning: baselines ike answer only at the answer positions"
    ) as err:
        trainer.fit(module, TextEditDataModule(str(world), batch_size=8))
    assert "protocol easyedit reads every position" in str(err.value) and "\n" not in str(err.value)
    assert trainer.global_step == 0
