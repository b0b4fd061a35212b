"""Text-only edit records: the zsRE / CounterFact layouts through validate, TextEditDataModule, a MEND fit
from train.py's CLI, `kedit eval` and `kedit edit`, with no image metrics anywhere."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIGS, TINY_BERT, quiet_trainer

from data_modules.datamodules import TextEditDataModule, TextFactsDataModule
from data_modules.datasets import TextFactDataset
from data_modules.encoding import IGNORE_INDEX
from data_modules.records import DataError
from data_modules.text_records import read_text_records
from kedit_lightning.backbones import build_backbone, load_backbone_spec
from kedit_lightning.cli import main
from kedit_lightning.editors.mend import MEND
from kedit_lightning.evaluation import EditMetrics, evaluate_batch
from kedit_lightning.modules.mend import outer_losses
from kedit_lightning.modules.serac import ScopeEncoderSpec, SERACModule
from kedit_lightning.training_cli import main as train_main

REPO = Path(__file__).resolve().parent.parent
IMAGE_KEYS = {"i_generality", "i_locality"}

ZSRE = {
    "src": "What university did Watts Humphrey attend?",
    "rephrase": "Which university did Watts Humphrey go to?",
    "pred": "Trinity College",
    "alt": "University of Michigan",
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
}
ROME_COUNTERFACT = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": ["Danielle Darrieux, a native speaker of"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Montesquieu spoke the language"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
EASYEDIT_COUNTERFACT = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux, a native speaker of",
    "locality_prompt": "The mother tongue of Léon Blum is",
    "locality_ground_truth": "French",
}


def write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_the_three_public_text_layouts_read_as_the_same_kind_of_record(tmp_path, capsys):
    path = write(tmp_path / "text.json", [ZSRE, ROME_COUNTERFACT, EASYEDIT_COUNTERFACT])
    assert main(["validate", "--data", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: 3 text-only record(s): OK"
    zsre, rome, easyedit = read_text_records(path)
    assert (zsre.src, zsre.alt, zsre.loc_ans, zsre.pred) == (ZSRE["src"], ZSRE["alt"], ZSRE["loc_ans"], ZSRE["pred"])
    assert rome.src == "The mother tongue of Danielle Darrieux is" == easyedit.src
    assert (rome.rephrase, rome.alt, rome.loc, rome.loc_ans) == (
        "Danielle Darrieux, a native speaker of",
        "English",
        "The mother tongue of Léon Blum is",
        "French",
    )
    assert (easyedit.rephrase, easyedit.alt, easyedit.loc, easyedit.loc_ans) == (
        rome.rephrase,
        rome.alt,
        rome.loc,
        rome.loc_ans,
    )


def test_bad_text_records_are_listed_by_record_and_field(tmp_path, capsys):
    no_target = {**ZSRE, "loc_ans": 3, "rephrase": " "}
    rome = json.loads(json.dumps(ROME_COUNTERFACT))
    rome["requested_rewrite"]["prompt"] = "The mother tongue is"
    no_paraphrase = {**ROME_COUNTERFACT, "paraphrase_prompts": []}
    easyedit = {k: v for k, v in EASYEDIT_COUNTERFACT.items() if k != "locality_prompt"}
    path = write(tmp_path / "bad.json", [ZSRE, no_target, rome, no_paraphrase, easyedit, {**ZSRE, "alt": ""}])
    assert main(["validate", "--data", str(path)]) == 1
    f = str(path)
    assert capsys.readouterr().out.strip().splitlines() == [
        f"{f}: record 1: field 'loc_ans': expected a string, got int",
        f"{f}: record 1: field 'rephrase': empty or whitespace-only prompt",
        f"{f}: record 2: field 'requested_rewrite.prompt': no '{{}}' where the subject goes",
        f"{f}: record 3: field 'paraphrase_prompts': expected a non-empty list of strings, got an empty list",
        f"{f}: record 4: field 'locality_prompt': missing field",
        f"{f}: record 5: field 'alt': empty target (training skips this record)",
        f"{f}: 6 text-only record(s): 6 problem(s)",
    ]


def test_text_batches_have_no_image_sub_batches(world, tokenizer):
    data = TextEditDataModule(str(world), batch_size=4, processor=tokenizer)
    data.setup("fit")
    assert len(data.split_records("train")) == 21 and len(data.split_records("val")) == 7
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"edit_inner", "edit_outer", "loc", "neighbor", "neighbor_record", "meta"}
    for key in ("edit_inner", "edit_outer", "loc"):
        assert batch[key]["pixel_values"] is None and batch[key]["input_ids"].shape[0] == 4
    assert batch["neighbor"]["pixel_values"] is None and batch["neighbor_record"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert batch["meta"][0]["origin"].endswith("text_eval.json:0")


def test_image_records_are_refused_by_the_text_data_module_in_one_line(world, tokenizer):
    data = TextEditDataModule(str(world), val_file="vqa/vqa_eval.json", processor=tokenizer)
    with pytest.raises(DataError) as caught:
        data.setup("validate")
    assert str(caught.value) == (
        f"{world / 'vqa/vqa_eval.json'}: image edit records (E-VQA / E-IC layout), "
        "not text records (zsRE / CounterFact layout)"
    )


@pytest.fixture(scope="module")
def tokenizer(world):
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "text-tiny.yaml"), processor=str(world / "tokenizer"))
    return build_backbone(spec).processor


@pytest.fixture(scope="module")
def text_fit(world, tmp_path_factory):
    """A text base saved as a directory, and MEND fitted on it for three steps through train.py's CLI."""
    root = tmp_path_factory.mktemp("text-fit")
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "text-tiny.yaml"), processor=str(world / "tokenizer"))
    torch.manual_seed(0)
    base = root / "base"
    build_backbone(spec).save_pretrained(base)
    backbone = root / "backbone.yaml"
    # config / processor / bootstrap null: on the command line this spec is merged into the config file's.
    fields = {"family": "text", "pretrained": str(base), "config": None, "processor": None, "bootstrap": None}
    backbone.write_text(yaml.safe_dump({**fields, "edit_params": spec.edit_params}))
    runs = root / "runs"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # whatever a run writes to the working directory lands here, not in the repo
        patch.setattr(sys, "argv", ["train.py"])  # pytest's own arguments are not the run's
        train_main(
            [
                "fit",
                "--config",
                str(REPO / "configs/mend/text-tiny-facts.yaml"),
                f"--model.init_args.backbone={backbone}",
                f"--data.init_args.data_dir={world}",
                "--trainer.max_steps=3",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={runs}",
            ]
        )
    return base, runs / "mend-text-tiny-facts/version_0/editor"


def test_mend_fits_on_text_records_and_reports_no_image_metrics(text_fit):
    _, artifact = text_fit
    card = json.loads((artifact / "editor.json").read_text())
    report = card["metrics"]
    assert card["backbone_fingerprint"]["family"] == "text"
    assert {"reliability", "t_generality", "t_locality"} <= set(report)
    assert not IMAGE_KEYS & set(report) and not IMAGE_KEYS & set(report["exact_match"])
    assert report["n_edits"] == 7


def test_kedit_eval_on_text_records_prints_no_image_rows(text_fit, world, tmp_path, capsys):
    base, artifact = text_fit
    out = tmp_path / "report.json"
    args = ["eval", "--editor", str(artifact), "--backbone", str(base), "--device", "cpu", "--no-progress"]
    assert main([*args, "--data", str(world / "text/text_eval.json"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| reliability |" in printed and "| t_locality |" in printed and "i_" not in printed
    report = json.loads(out.read_text())
    assert report["n_edits"] == 7 and not IMAGE_KEYS & set(report)
    card = json.loads((artifact / "editor.json").read_text())
    for key in ("reliability", "t_generality", "t_locality"):
        assert report[key] == pytest.approx(card["metrics"][key], abs=1e-6), key


def test_image_records_with_a_text_editor_are_refused_before_any_weights_load(text_fit, world, tmp_path, capsys):
    _, artifact = text_fit
    data = world / "vqa/vqa_eval.json"
    # A backbone that does not exist: the refusal must come first, from the artifact's fingerprint.
    for command in ("eval", "edit"):
        extra = ["--out", str(tmp_path / "edited")] if command == "edit" else []
        args = [command, "--editor", str(artifact), "--backbone", str(tmp_path / "absent"), "--data", str(data)]
        assert main([*args, "--images", str(world / "images"), "--device", "cpu", *extra]) == 2
        assert capsys.readouterr().err.strip() == (
            f"kedit {command}: ValueError: {data}: vqa records carry images, but the editor in {artifact} "
            "edits a text backbone (family 'text'): give text records (zsRE / CounterFact layout)"
        )


def test_kedit_edit_applies_text_records_and_saves_a_model(text_fit, world, tmp_path, capsys):
    base, artifact = text_fit
    data, out = world / "text/text_eval.json", tmp_path / "edited"
    args = ["edit", "--editor", str(artifact), "--backbone", str(base), "--data", str(data), "--out", str(out)]
    assert main([*args, "--device", "cpu", "--force"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"applied 7 edits from {data} as one batched edit")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_serac_trains_and_validates_on_text_records(world):
    tokenizer_dir = str(world / "tokenizer")
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "text-tiny.yaml"), processor=tokenizer_dir)
    torch.manual_seed(0)
    module = SERACModule(spec, spec, ScopeEncoderSpec(config=TINY_BERT, tokenizer=tokenizer_dir), hard_negatives=True)
    trainer = quiet_trainer(
        max_steps=2,
        limit_train_batches=2,
    )
    trainer.fit(module, TextEditDataModule(str(world), batch_size=4))
    report = module.last_report["val"]
    assert report["n_edits"] == 7 and {"reliability", "t_generality", "t_locality"} <= set(report)
    assert not IMAGE_KEYS & set(report)


def test_text_records_also_edit_an_image_backbone(world):
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "blip2-tiny.yaml"), processor=str(world / "tokenizer"))
    torch.manual_seed(0)
    backbone = build_backbone(spec).eval()
    data = TextEditDataModule(str(world), batch_size=4, processor=backbone.processor)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    editor = MEND.for_backbone(backbone, rank=8)
    metrics = EditMetrics()
    evaluate_batch(editor, backbone, batch, metrics)
    assert set(metrics.compute()) == {
        "reliability",
        "t_generality",
        "t_locality",
        "n_locality",
        "n_edits",
        "exact_match",
    }
    assert set(outer_losses(editor, backbone, batch)) == {"edit", "loc"}


def test_text_facts_are_each_records_answers_before_the_edit(tmp_path):
    """A record's facts: its prompt and rephrase answered `pred`, its locality prompt, each neighbour; a record
    with an empty `pred` gives no edit-prompt fact."""
    neighbors = [{"prompt": "Which country is Marun in?", "answer": "Zandia"}]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([{**ZSRE, "neighbors": neighbors}, {**ZSRE, "pred": ""}]))
    facts = [(f.prompt, f.target, f.image, f.where) for f in TextFactDataset(read_text_records(path))]
    f = str(path)
    assert facts == [
        (ZSRE["src"], ZSRE["pred"], None, (f, 0, "src")),
        (ZSRE["rephrase"], ZSRE["pred"], None, (f, 0, "rephrase")),
        (ZSRE["loc"], ZSRE["loc_ans"], None, (f, 0, "loc")),
        ("Which country is Marun in?", "Zandia", None, (f, 0, "neighbors[0]")),
        (ZSRE["loc"], ZSRE["loc_ans"], None, (f, 1, "loc")),
    ]


def test_the_text_bootstrap_teaches_the_tiny_llama_the_facts_it_will_be_edited_on(world, tmp_path):
    """configs/backbones/text-tiny-bootstrap.yaml through train.py: the exported base answers every fact of the
    val records (the ones MEND's validation edits), where the random-weight model answers almost none."""
    export = tmp_path / "base"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(world)  # where the config's tokenizer and data paths point
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        patch.setattr(sys, "argv", ["train.py"])
        train_main(
            [
                "fit",
                "--config",
                str(REPO / "configs/backbones/text-tiny-bootstrap.yaml"),
                f"--model.init_args.export_dir={export}",
                "--trainer.max_epochs=60",
                "--trainer.enable_progress_bar=false",
            ]
        )
    data = TextFactsDataModule(str(world), batch_size=256)
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "text-tiny.yaml"), processor=str(world / "tokenizer"))
    torch.manual_seed(0)
    random_weights = build_backbone(spec).eval()
    data.processor = random_weights.processor
    data.setup("validate")
    (batch,) = list(data.val_dataloader())
    labels = batch["text_only"]["labels"]
    answers = labels != IGNORE_INDEX

    def accuracy(backbone) -> float:
        with torch.no_grad():
            return float((backbone(batch["text_only"]).argmax(-1) == labels)[answers].float().mean())

    trained = build_backbone(dataclasses.replace(spec, pretrained=str(export), config=None, processor=None)).eval()
    assert set(batch) == {"text_only"} and int(answers.sum()) > 20
    assert accuracy(trained) == 1.0
    assert accuracy(random_weights) < 0.2
