"""Quiet, clear runs: known-harmless warnings filtered (and nothing else), the editor exported into the
run's folder, TensorBoard showing each logged edit's greedy answers and image."""

import re
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
from conftest import VAL_FILE
from lightning.fabric.utilities.warnings import PossibleUserWarning
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_modules.encoding import IGNORE_INDEX
from kedit_lightning.cli import main as kedit_main
from kedit_lightning.generation import greedy_answers
from kedit_lightning.known_warnings import KNOWN_HARMLESS, quiet_known_warnings
from kedit_lightning.training_cli import main as train_main

REPO = Path(__file__).resolve().parent.parent
RUN = "mend-blip2-tiny-synthetic-vqa"


def known(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        for message, category in KNOWN_HARMLESS
        if issubclass(w.category, category) and re.match(message, str(w.message))
    ]


@pytest.fixture(scope="module")
def quick_fit(world, base_dir, tmp_path_factory):
    """The quick start's config, two steps on the test world, through train.py's CLI, every warning recorded."""
    root = tmp_path_factory.mktemp("quick")
    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        patch.chdir(root)
        train_main(
            [
                "fit",
                "--config",
                str(REPO / "configs/quickstart.yaml"),
                f"--model.init_args.backbone.pretrained={base_dir}",
                "--model.init_args.backbone.bootstrap=null",
                f"--data.init_args.data_dir={world}",
                f"--data.init_args.val_file={VAL_FILE}",
                "--data.init_args.synthesize=false",
                "--trainer.max_steps=2",
                "--trainer.limit_train_batches=2",
                "--trainer.limit_val_batches=1",
                "--trainer.log_every_n_steps=1",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={root / 'runs'}",
            ]
        )
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    return root, caught


def test_a_fit_shows_no_known_harmless_warning_but_others_still_show(quick_fit):
    _, caught = quick_fit
    assert known(caught) == []
    assert "an unrelated warning" in [str(w.message) for w in caught]


def test_kedit_eval_shows_no_known_harmless_warning(quick_fit, world, base_dir, capsys):
    root, _ = quick_fit
    args = ["eval", "--editor", str(root / "runs" / RUN / "version_0" / "editor"), "--backbone", str(base_dir)]
    args += ["--data", str(world / VAL_FILE), "--images", str(world / "images")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kedit_main(args) == 0
    assert known(caught) == []
    assert "reliability" in capsys.readouterr().out


def test_the_editor_is_exported_into_the_run_folder(quick_fit):
    root, _ = quick_fit
    run = root / "runs" / RUN / "version_0"
    assert (run / "editor" / "editor.json").is_file() and (run / "config.yaml").is_file()
    assert not (root / "checkpoints").exists()


def test_tensorboard_shows_greedy_answers_images_and_grouped_gradient_norms(quick_fit):
    root, _ = quick_fit
    events = EventAccumulator(str(root / "runs" / RUN / "version_0"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    texts = [t for t in tags["tensors"] if t.startswith("val_edits/")]
    images = [t for t in tags["images"] if t.startswith("val_edit_images/")]
    assert len(texts) == len(images) == 4
    text = events.Tensors(texts[0])[0].tensor_proto.string_val[0].decode()
    assert "**pre-edit (greedy)**" in text and "**post-edit (greedy)**" in text and "**target**" in text
    image = events.Images(images[0])[0]
    assert image.width > 1 and image.height > 1
    scalars = tags["scalars"]
    assert "grad_norm/total" in scalars and any(t.startswith("grad_norm/transforms.") for t in scalars)
    assert any(t.startswith("edit_lr/language_model.") for t in scalars)
    assert not any(t.startswith("editor/") for t in scalars)


def test_greedy_answer_starts_with_the_argmax_of_the_first_answer_position(fitted):
    backbone = fitted.module.backbone
    row = backbone.processor(
        ["Question: Where is this object located? Short answer:"], ["Velor"], [Image.new("RGB", (32, 32))]
    )
    with torch.no_grad():
        first = int(backbone(row)[row["labels"] != IGNORE_INDEX][0].argmax())
    answer = greedy_answers(fitted.module.editor.edited_model(backbone), backbone, {"row": row})[0].strip()
    tokenizer = backbone.processor.tokenizer
    assert answer == "" if first == tokenizer.eos_token_id else answer.startswith(tokenizer.decode([first]).strip())


def test_only_the_editor_modules_epoch_metrics_skip_the_sync_dist_warning():
    def sync_dist_warning(key: str) -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_known_warnings()
            warnings.warn(
                f"It is recommended to use `self.log({key!r}, ..., sync_dist=True)` when ...",
                PossibleUserWarning,
                stacklevel=1,
            )
        return caught

    assert sync_dist_warning("val/score") == [] and sync_dist_warning("v_relia") == []
    assert len(sync_dist_warning("val/loss")) == 1  # the base model's loss is a per-rank mean: genuine


def test_pytest_filters_the_same_warnings_as_the_command_lines():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    filters = config["tool"]["pytest"]["ini_options"]["filterwarnings"]
    for message, category in KNOWN_HARMLESS:
        assert f"ignore:{message}:{category.__name__}" in filters
