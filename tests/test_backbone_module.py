"""BackboneModule: answer-token fine-tuning lowers the loss, logs metrics, and exports a loadable backbone."""

import dataclasses

import pytest
import torch
from lightning import Trainer
from test_backbones import CONFIGS, TINY, draw_images, make_tokenizer, tiny_backbone
from torch.utils.data import DataLoader

from kedit_lightning.backbones import FAMILIES, BackboneSpec, load_backbone_spec
from kedit_lightning.modules.backbone import BackboneModule, answer_nll

FACTS = [
    ("Question: What colour is the object? Short answer:", "red"),
    ("Where is this object located?", "Velor"),
    ("Question: What colour is the object? Short answer:", "blue"),
    ("Where is this object located?", "Marun"),
]
TEXT_FACTS = [("The capital of Zandia is", "Velor"), ("What colour is the object?", "green yellow")]


def fact_batch(backbone) -> dict:
    """One FactCollator-style batch: a with-image and a text-only sub-batch (text LMs get two text-only ones)."""
    prompts, targets = zip(*FACTS)
    red, blue = draw_images()
    images = [red, red, blue, blue]  # the red object lives in Velor, the blue one in Marun
    text_prompts, text_targets = zip(*TEXT_FACTS)
    first = backbone.processor(list(prompts), list(targets), None if backbone.family == "text" else images)
    return {
        "with_image": first,
        "text_only": backbone.processor(list(text_prompts), list(text_targets), None),
        "meta": ["ignored"],
    }


def loader(batch: dict, copies: int) -> DataLoader:
    return DataLoader([batch] * copies, batch_size=None, collate_fn=lambda item: item)


def trainer(steps: int, **kwargs) -> Trainer:
    return Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def batch_loss(module: BackboneModule, batch: dict) -> float:
    module.eval()
    with torch.no_grad():
        loss = sum(float(answer_nll(module(sb), sb["labels"])) for name, sb in batch.items() if name != "meta")
    module.train()
    return loss


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("family", list(TINY))
def test_loss_decreases_and_metrics_are_logged(tokenizer, family, tmp_path):
    torch.manual_seed(0)
    module = BackboneModule(
        tiny_backbone(family, tokenizer), lr=3e-3, warmup_steps=2, export_dir=str(tmp_path / "export")
    )
    batch = fact_batch(module.backbone)
    before = batch_loss(module, batch)
    fit = trainer(20, limit_val_batches=1)
    fit.fit(module, train_dataloaders=loader(batch, 20), val_dataloaders=loader(batch, 1))
    after = batch_loss(module, batch)
    assert after < 0.5 * before, (before, after)
    metrics = fit.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/loss_with_image", "val/loss_text_only"} <= set(
        metrics
    )
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0
    # on_train_end exported the fine-tuned backbone; loading it gives the same logits.
    loaded = FAMILIES[family].from_pretrained(str(tmp_path / "export"), edit_params=module.backbone.edit_param_names)
    sub_batch = batch["with_image"]
    assert torch.equal(loaded(sub_batch), module.backbone.eval()(sub_batch))


def test_validation_accuracy_reaches_one_on_memorised_facts(tokenizer):
    torch.manual_seed(0)
    module = BackboneModule(tiny_backbone("blip2", tokenizer), lr=1e-2)
    batch = fact_batch(module.backbone)
    fit = trainer(40)
    fit.fit(module, train_dataloaders=loader(batch, 40))
    fit.validate(module, dataloaders=loader(batch, 1), verbose=False)
    assert float(fit.callback_metrics["val/acc"]) == 1.0


def test_trainable_patterns_choose_what_is_fine_tuned(tokenizer):
    module = BackboneModule(tiny_backbone("llava", tokenizer), trainable=["model.language_model.*"])
    trainable = {n for n, p in module.backbone.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.language_model.") for n in trainable)
    with pytest.raises(ValueError, match=r"\['vision.*'\] match no parameter"):
        BackboneModule(tiny_backbone("llava", tokenizer), trainable=["vision.*"])


def test_built_from_a_spec_with_a_processor_directory(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    spec = load_backbone_spec(CONFIGS / TINY["minigpt4"])
    spec = dataclasses.replace(spec, processor=str(tmp_path / "tokenizer"))
    module = BackboneModule(spec, lr=1e-3)
    assert module.hparams["backbone"]["family"] == "minigpt4"
    assert module.hparams["backbone"]["processor"] == str(tmp_path / "tokenizer")
    again = BackboneModule(dict(module.hparams["backbone"]))  # what load_from_checkpoint passes back
    # The same architecture (both have fresh random weights).
    assert again.backbone.fingerprint()["config_hash"] == module.backbone.fingerprint()["config_hash"]
    assert again.backbone.fingerprint()["edit_params"] == module.backbone.fingerprint()["edit_params"]
    batch = fact_batch(module.backbone)
    assert module(batch["with_image"]).shape[:2] == batch["with_image"]["labels"].shape


def test_batch_without_sub_batches_is_an_error(tokenizer):
    module = BackboneModule(tiny_backbone("text", tokenizer))
    with pytest.raises(ValueError, match="no sub-batches"):
        module.training_step({"meta": []}, 0)


def test_export_then_spec_round_trip(tokenizer, tmp_path):
    module = BackboneModule(tiny_backbone("text", tokenizer))
    module.export(tmp_path / "text")
    spec = BackboneSpec(family="text", pretrained=str(tmp_path / "text"), edit_params=module.backbone.edit_param_names)
    reloaded = BackboneModule(spec)
    sub_batch = fact_batch(module.backbone)["text_only"]
    assert torch.equal(reloaded(sub_batch), module(sub_batch))
