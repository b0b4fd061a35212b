"""MENDModule: meta-training steps, per-record evaluation, non-finite steps, save and resume."""

import dataclasses
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from oracle import evaluate_batch as oracle_evaluate_batch
from torch.utils.data import DataLoader

from data_modules.datamodules import VQADataModule
from data_modules.encoding import SUB_BATCH_KEYS
from data_modules.vlkeb import VLKEBDataModule
from kedit_lightning.backbones import load_backbone_spec
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.evaluation import EditMetrics, evaluate_batch, flatten_report, record_batches
from kedit_lightning.modules import MENDModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "backbones"


def make_module(world: Path, backbone: str = "blip2-tiny.yaml", dtype: str = "float32", **hparams) -> MENDModule:
    """MEND (small rank) on a tiny backbone config of configs/backbones with the world's tokenizer, built."""
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / backbone), processor=str(world / "tokenizer"), dtype=dtype)
    torch.manual_seed(0)
    module = MENDModule(spec, **{"rank": 8, "lr": 1e-3, "edit_lr": 1e-2, "cedit": 1.0, "iedit": 1.0, **hparams})
    module.configure_model()
    return module


def make_data(world: Path, module: MENDModule, batch_size: int = 2) -> VQADataModule:
    data = VQADataModule(
        str(world), train_file="vqa/vqa_train.json", val_file="vqa/vqa_eval.json", batch_size=batch_size
    )
    data.processor = module.backbone.processor
    data.setup("fit")
    return data


def trainer(root: Path, steps: int, **kwargs) -> Trainer:
    return Trainer(
        max_steps=steps,
        accelerator="cpu",
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        **kwargs,
    )


def one_batch(batch: dict) -> DataLoader:
    return DataLoader([batch], batch_size=None, collate_fn=lambda item: item)


def editor_state(module: MENDModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.editor.state_dict().items()}


def test_training_steps_change_only_the_editor(world, tmp_path):
    module = make_module(world)
    backbone_before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    editor_before = editor_state(module)
    fit = trainer(tmp_path, 3)
    fit.fit(module, datamodule=make_data(world, module))
    assert fit.global_step == 3
    assert all(torch.equal(v, module.backbone.state_dict()[k]) for k, v in backbone_before.items())
    after = module.editor.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in editor_before.items() if v.is_floating_point())
    assert {"train/loss", "train/loss_edit", "train/loss_image_edit", "train/loss_loc"} <= set(fit.callback_metrics)
    assert int(module.skipped_steps) == 0


def test_an_edit_raises_the_target_probability_and_leaves_the_backbone_as_it_was(world):
    module = make_module(world)
    record = next(record_batches(next(iter(make_data(world, module).val_dataloader()))))
    before_state = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    inputs = StepInputs(module.backbone, {"edit": record["edit_inner"]})
    model = module.editor.edited_model(module.backbone)
    group = module.editor(model, inputs, inputs.rows("edit"))
    labels = record["edit_inner"]["labels"]
    with torch.no_grad():
        before = model.answer_logits(inputs, inputs.rows("edit")).log_softmax(-1)
        after = model.answer_logits(inputs, inputs.rows("edit"), group).log_softmax(-1)
    label_ids = labels[labels != -100].unsqueeze(-1)
    assert (after.gather(-1, label_ids) - before.gather(-1, label_ids)).sum() > 0
    assert all(torch.equal(v, module.backbone.state_dict()[k]) for k, v in before_state.items())


def test_edits_of_one_record_never_leak_into_the_next(world):
    module = make_module(world).eval()  # as in validation: the editor's running statistics stay fixed
    batch = next(iter(make_data(world, module, batch_size=3).val_dataloader()))
    third = list(record_batches(batch))[2]
    alone = evaluate_batch(module.editor, module.backbone, third, EditMetrics())
    together = evaluate_batch(module.editor, module.backbone, batch, EditMetrics())
    for key, logits in alone.items():
        torch.testing.assert_close(together[key][-len(logits) :], logits, rtol=1e-4, atol=1e-5)


def test_validation_scores_one_hop_edits_after_both_edits(world):
    """Validation (the batched loop) scores VLKEB's one-hop variant as the per-record oracle does:
    each record's edit, then its one-hop edit on top, before its question is answered."""
    module = make_module(world).eval()
    data = VLKEBDataModule(
        str(world),
        train_file="vlkeb/train.json",
        val_file="vlkeb/eval_edit_onehop.json",
        batch_size=2,
        processor=module.backbone.processor,
    )
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    assert "port_edit" in batch
    calls = []
    handle = module.editor.register_forward_pre_hook(
        lambda editor, args, kwargs: calls.append(
            None if kwargs.get("on_top_of") is None else kwargs["on_top_of"].tolist()
        ),
        with_kwargs=True,
    )
    module.validation_step(batch, 1)
    handle.remove()
    assert calls == [None, [0, 1]]  # the records' edits, then each one-hop edit on top of its record's
    oracle = EditMetrics()
    oracle_evaluate_batch(module.editor, module.backbone, batch, oracle)
    assert flatten_report(module.val_metrics.compute()) == pytest.approx(flatten_report(oracle.compute()))
    assert int(module.val_metrics.portability.count.sum()) == 2


def test_sharded_validation_refuses_ranks_whose_records_need_different_forwards(world):
    module = make_module(world).eval()
    module._device_mesh = object()  # as under ModelParallelStrategy (two ranks, all_gather faked below)

    def first_batch(val_file):
        data = VLKEBDataModule(
            str(world),
            train_file="vlkeb/train.json",
            val_file=val_file,
            batch_size=2,
            processor=module.backbone.processor,
        )
        data.setup("validate")
        return next(iter(data.val_dataloader()))

    digests = []
    module.all_gather = lambda digest: digests.append(digest) or torch.stack([digest, digest])
    module.validation_step(first_batch("vlkeb/eval_edit_onehop.json"), 1)  # both ranks with the same work: scored
    assert int(module.val_metrics.portability.count.sum()) == 2
    module.all_gather = lambda digest: torch.stack([digest, digests[0]])
    with pytest.raises(RuntimeError, match="needs every rank's batch to run the same forwards"):
        module.validation_step(
            first_batch("vlkeb/eval_multihop.json"), 1
        )  # 4 port rows per record here, one-hop edits there


def test_a_non_finite_step_is_skipped_and_counted(world, tmp_path):
    module = make_module(world)
    data = make_data(world, module)
    good = next(iter(data.train_dataloader()))
    poisoned = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
    # NaN images make the edit's own factors NaN: nothing of that step may reach the editor.
    poisoned["edit_inner"]["pixel_values"] = torch.full_like(good["edit_inner"]["pixel_values"], float("nan"))
    before = editor_state(module)
    fit = trainer(tmp_path, 1)
    fit.fit(module, train_dataloaders=one_batch(poisoned))
    assert int(module.skipped_steps) == 1
    assert all(torch.equal(v, module.editor.state_dict()[k]) for k, v in before.items())
    fit = trainer(tmp_path, 2)
    fit.fit(module, train_dataloaders=one_batch(good))
    assert int(module.skipped_steps) == 1
    after = module.editor.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if v.is_floating_point())


def test_resuming_mid_training_continues_where_it_stopped(world, tmp_path):
    # Three batches an epoch, a checkpoint after the second: the resumed run must continue with
    # the third batch of that epoch and then shuffle the next epoch as the uninterrupted run did.
    straight = make_module(world)
    trainer(tmp_path / "straight", 5, limit_train_batches=3).fit(straight, datamodule=make_data(world, straight))

    interrupted = make_module(world)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    first = trainer(tmp_path / "first", 2, limit_train_batches=3, callbacks=[checkpoint])
    first.fit(interrupted, datamodule=make_data(world, interrupted))
    saved = torch.load(checkpoint.best_model_path, weights_only=True)
    assert saved["global_step"] == 2
    assert not any(key.startswith("backbone.") for key in saved["state_dict"])

    resumed = make_module(world)
    second = trainer(tmp_path / "second", 5, limit_train_batches=3)
    second.fit(resumed, datamodule=make_data(world, resumed), ckpt_path=checkpoint.best_model_path)
    assert second.global_step == 5
    adam = second.optimizers[0].state_dict()["state"]
    assert all(int(state["step"]) == 5 for state in adam.values())
    for key, value in straight.editor.state_dict().items():
        assert torch.allclose(value, resumed.editor.state_dict()[key], atol=1e-6), key


def test_locality_targets_are_cached_per_record_bounded_and_optional(world):
    """The unedited locality answers are computed once per record and reused: the loss is the same
    as without the cache; the cache stops growing at its bound; `cache_locality: false` keeps none."""
    module = make_module(world).eval()
    batch = next(iter(make_data(world, module, batch_size=3).train_dataloader()))
    module.trainer = Trainer(accelerator="cpu", logger=False)  # `_cached_targets` asks the strategy under sharding only
    first = module.step_losses(batch)
    assert len(module.locality_targets.entries) == 3
    calls = []
    handle = module.backbone.model.get_output_embeddings().register_forward_hook(
        lambda head, args, out: calls.append(out.shape[0])
    )
    again = module.step_losses(batch)
    handle.remove()
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=1e-5, atol=1e-7)
    answers = {k: int((batch[k]["labels"] != -100).sum()) for k in SUB_BATCH_KEYS}
    # The head ran for the edit capture (edit_inner) and the post-edit answers (the four others) only:
    # the unedited locality answers came from the cache.
    assert sum(calls) == sum(answers.values())
    assert module.locality_targets.bytes == sum(
        t.numel() * 4 for e in module.locality_targets.entries.values() for t in e
    )

    small = make_module(world, locality_cache_mb=0)
    small.trainer = module.trainer
    small.step_losses(batch)
    assert not small.locality_targets.entries
    off = make_module(world, cache_locality=False)
    off.trainer = module.trainer
    off.step_losses(batch)
    assert not off.locality_targets.entries
