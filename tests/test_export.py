"""The editor artifact: what export writes, `kedit export`, the fresh-process round trip, loading without Lightning,
and every refusal on load."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import VAL_FILE, VAL_RECORDS, base_spec
from lightning.pytorch.loggers import TensorBoardLogger
from oracle import dense_edit
from safetensors.torch import load_file
from test_backbones import make_tokenizer

import kedit_lightning
from kedit_lightning.artifact import (
    CARD_FILE,
    COUNTERFACTUAL_TOKENIZER,
    FORMAT_VERSION,
    SCOPE_TOKENIZER,
    WEIGHTS_FILE,
    ArtifactError,
    FingerprintMismatch,
    fingerprint_problems,
)
from kedit_lightning.backbones import BackboneSpec, Blip2Backbone, load_backbone_spec
from kedit_lightning.cli import main
from kedit_lightning.editor import Editor
from kedit_lightning.export import ExportEditor, export_module, jsonable, method_of_checkpoint
from kedit_lightning.modules import FTModule, MENDModule

REPORT_KEYS = {"reliability", "t_generality", "i_generality", "t_locality", "i_locality", "n_edits", "exact_match"}
REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "backbones"
# Loads each artifact given on the command line and applies one edit, in a process where importing
# Lightning or jsonargparse fails: the load path of an artifact must need neither.
WITHOUT_LIGHTNING = """
import json
import sys

import torch


class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"lightning", "pytorch_lightning", "lightning_fabric", "jsonargparse"}:
            raise ModuleNotFoundError(f"{name} is blocked: loading an artifact must not import it")


sys.meta_path.insert(0, Blocked())
from kedit_lightning.editor import Editor

base, records, images, *artifacts = sys.argv[1:]
record = json.loads(open(records).read())[:1]
for artifact in artifacts:
    editor = Editor.from_pretrained(artifact)
    backbone = editor.load_backbone(base)
    query = editor.encode(backbone, record, image_root=images)[0]
    with torch.no_grad():
        before = backbone(query)[query["labels"] != -100]
    after = editor.edit(backbone, record, image_root=images).answer_logits(query)
    assert not torch.equal(after, before), editor.method
    print("edited with", editor.method)
"""


def card_of(artifact: Path) -> dict:
    return json.loads((artifact / CARD_FILE).read_text())


@pytest.fixture()
def artifact_copy(fitted, tmp_path) -> Path:
    return Path(shutil.copytree(fitted.artifact, tmp_path / "artifact"))


def test_fit_end_export_writes_the_documented_artifact(fitted):
    module, artifact = fitted.module, fitted.artifact
    assert artifact.name == "version_0" and artifact.parent.name == "mend-tiny"
    assert sorted(p.name for p in artifact.iterdir()) == [CARD_FILE, WEIGHTS_FILE]  # no pickle anywhere
    card = card_of(artifact)
    assert card["format_version"] == FORMAT_VERSION and card["method"] == "mend"
    assert card["editor"] == {"class": "MEND", "config": json.loads(json.dumps(module.editor.config))}
    assert card["package_version"] == kedit_lightning.__version__
    assert card["backbone_fingerprint"] == module.backbone.fingerprint()
    assert set(card["backbone_fingerprint"]["edit_params"]) == set(module.backbone.edit_param_names)
    assert card["module_class"] == "kedit_lightning.modules.mend.MENDModule"
    assert card["hyper_parameters"]["rank"] == 16 and card["hyper_parameters"]["backbone"]["family"] == "blip2"
    assert card["metrics"] == module.last_report["val"] and card["metrics"]["n_edits"] == VAL_RECORDS
    assert card["training_config"]["model"]["class_path"].endswith("MENDModule")
    assert card["training_config"]["data"]["init_args"]["val_file"] == VAL_FILE
    assert card["source"]["checkpoint"] == str(fitted.best_checkpoint) and card["source"]["global_step"] == 2
    # The best checkpoint is the last one here, so the exported tensors are the trained editor's.
    saved = load_file(artifact / WEIGHTS_FILE)
    assert saved.keys() == module.editor.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in module.editor.state_dict().items())


def test_run_folder_follows_the_logger_and_never_reuses_a_version(fitted, tmp_path):
    module = fitted.module
    logger = TensorBoardLogger(save_dir=str(tmp_path / "runs"), name="mend-blip2-tiny-synthetic-vqa", version=3)
    assert ExportEditor().run_dir(SimpleNamespace(logger=logger), module) == Path(logger.log_dir) / "editor"
    logged = ExportEditor(dirpath=str(tmp_path))
    assert (
        logged.run_dir(SimpleNamespace(logger=logger), module)
        == tmp_path / "mend-blip2-tiny-synthetic-vqa" / "version_3"
    )
    unlogged = ExportEditor(dirpath=str(tmp_path))
    assert unlogged.run_dir(SimpleNamespace(logger=None), module) == tmp_path / "mend-blip2" / "version_0"
    (tmp_path / "mend-blip2" / "version_0").mkdir(parents=True)
    assert unlogged.run_dir(SimpleNamespace(logger=None), module) == tmp_path / "mend-blip2" / "version_1"


def test_kedit_export_of_the_checkpoint_matches_the_fit_end_export(fitted, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(fitted.best_checkpoint), "--out", str(out), "--method", "mend"]) == 0
    assert (out / WEIGHTS_FILE).read_bytes() == (fitted.artifact / WEIGHTS_FILE).read_bytes()
    mine, theirs = card_of(out), card_of(fitted.artifact)
    for key in ("method", "module_class", "backbone_fingerprint", "hyper_parameters", "metrics", "weights", "source"):
        assert mine[key] == theirs[key], key
    # An existing artifact is not overwritten by accident.
    assert main(["export", str(fitted.best_checkpoint), "--out", str(out), "--method", "mend"]) == 2
    assert "already holds an exported editor" in capsys.readouterr().err
    # A checkpoint not written through train.py does not say its method.
    assert main(["export", str(fitted.best_checkpoint), "--out", str(tmp_path / "other")]) == 2
    assert "name the method" in capsys.readouterr().err


def test_method_comes_from_the_class_path_lightning_cli_records():
    assert (
        method_of_checkpoint({"hyper_parameters": {"_class_path": "kedit_lightning.modules.MENDModule"}}, "x.ckpt")
        == "mend"
    )
    with pytest.raises(ValueError, match="does not train a known editing method"):
        method_of_checkpoint({"hyper_parameters": {"_class_path": "kedit_lightning.modules.BackboneModule"}}, "x.ckpt")


def test_round_trip_in_a_fresh_process_reproduces_validation(fitted, world, base_dir, tmp_path):
    out = tmp_path / "eval.json"
    command = [
        sys.executable,
        "-m",
        "kedit_lightning.cli",
        "eval",
        "--editor",
        str(fitted.artifact),
        "--backbone",
        str(base_dir),
        "--data",
        str(world / VAL_FILE),
        "--images",
        str(world / "images"),
        "--batch-size",
        str(VAL_RECORDS),
        "--json",
        str(out),
        "--device",
        "cpu",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "| reliability |" in done.stdout
    report = json.loads(out.read_text())
    validation = fitted.module.last_report["val"]
    scores = REPORT_KEYS - {"n_edits", "exact_match"}
    unedited = {f"pre_{key}" for key in scores}  # the same metrics of the unedited model
    assert set(report) == REPORT_KEYS | unedited and set(report["exact_match"]) == scores | unedited
    assert report["n_edits"] == validation["n_edits"] == VAL_RECORDS
    for key in REPORT_KEYS - {"n_edits", "exact_match"}:
        assert report[key] == pytest.approx(validation[key], abs=1e-6), key
        assert report["exact_match"][key] == pytest.approx(validation["exact_match"][key], abs=1e-6), key


def test_truncated_weights_are_refused(artifact_copy):
    weights = artifact_copy / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="not a readable safetensors file .truncated"):
        Editor.from_pretrained(artifact_copy)


def test_changed_weights_are_refused(artifact_copy):
    weights = artifact_copy / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: still valid safetensors, different numbers
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 .* differs .* changed or truncated after export"):
        Editor.from_pretrained(artifact_copy)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda card: card.pop("backbone_fingerprint"), r"missing field\(s\) \['backbone_fingerprint'\]"),
        (lambda card: card.update(format_version=FORMAT_VERSION + 1), "reads up to"),
        (lambda card: card.update(method="rome"), "unknown method 'rome'"),
    ],
)
def test_an_inconsistent_editor_json_is_refused_on_load(artifact_copy, change, message):
    card = card_of(artifact_copy)
    change(card)
    (artifact_copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match=message):
        Editor.from_pretrained(artifact_copy)


def test_a_version_1_artifact_is_refused_with_a_one_line_hint_to_re_export(artifact_copy, world, base_dir, capsys):
    card = card_of(artifact_copy)
    del card["editor"]
    (artifact_copy / CARD_FILE).write_text(json.dumps({**card, "format_version": 1}))
    with pytest.raises(ArtifactError, match="format version 1 does not record the editor's own config; re-export"):
        Editor.from_pretrained(artifact_copy)
    args = ["eval", "--editor", str(artifact_copy), "--backbone", str(base_dir), "--data", str(world / VAL_FILE)]
    assert main([*args, "--images", str(world / "images"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "kedit export" in error


def test_each_step_size_stays_on_its_weight_when_the_weights_are_not_in_name_order(base_dir, tmp_path):
    # Llama-style MLPs list up_proj before down_proj: name order differs from the backbone's order.
    layers = "language_model.model.decoder.layers"
    spec = BackboneSpec(
        family="blip2", pretrained=str(base_dir), edit_params=[f"{layers}.3.fc2.weight", f"{layers}.1.fc1.weight"]
    )
    module = MENDModule(spec, rank=4)
    module.configure_model()
    with torch.no_grad():
        module.editor.edit_lrs.copy_(torch.tensor([1e-3, 5e-3]))
    artifact = export_module(module, tmp_path / "artifact")
    editor = Editor.from_pretrained(artifact)
    backbone = editor.load_backbone(str(base_dir))
    assert backbone.edit_param_names == spec.edit_params
    assert dict(zip(editor.editor.param_names, editor.editor.edit_lrs.tolist())) == pytest.approx(
        {f"{layers}.3.fc2.weight": 1e-3, f"{layers}.1.fc1.weight": 5e-3}
    )


def test_an_editor_trained_under_an_edit_limit_keeps_it_in_its_artifact(base_dir, tmp_path, artifact_copy):
    spec = BackboneSpec(
        family="blip2", pretrained=str(base_dir), edit_params=["language_model.model.decoder.layers.3.fc2.weight"]
    )
    module = MENDModule(spec, rank=4, max_edit_ratio=0.05)
    module.configure_model()
    assert module.editor.max_edit_ratio == 0.05
    assert Editor.from_pretrained(export_module(module, tmp_path / "limited")).editor.max_edit_ratio == 0.05
    assert Editor.from_pretrained(artifact_copy).editor.max_edit_ratio is None  # trained without one
    card = card_of(artifact_copy)
    card["editor"]["config"]["max_edit_ratio"] = -1.0
    (artifact_copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(
        ArtifactError, match="editor.config.max_edit_ratio is -1.0; it must be null or a finite number > 0"
    ):
        Editor.from_pretrained(artifact_copy)


def test_a_version_2_mend_artifact_is_refused_its_weights_order_is_lost(artifact_copy):
    card = card_of(artifact_copy)
    (artifact_copy / CARD_FILE).write_text(json.dumps({**card, "format_version": 2}))
    with pytest.raises(ArtifactError, match="format version 2 lists the edited weights sorted by name.*kedit export"):
        Editor.from_pretrained(artifact_copy)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda editor: editor.clear(), "no `editor` section"),
        (lambda editor: editor.update({"class": "SERAC"}), "names class 'SERAC'; a mend editor is a MEND"),
    ],
)
def test_an_editor_section_that_does_not_fit_the_method_is_refused(artifact_copy, change, message):
    card = card_of(artifact_copy)
    change(card["editor"])
    (artifact_copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match=message):
        Editor.from_pretrained(artifact_copy)


@pytest.mark.parametrize("method", ["fitted", "serac_fitted"])
def test_the_rebuilt_editor_equals_the_exported_one_bitwise(method, request):
    fitted = request.getfixturevalue(method)
    rebuilt = Editor.from_pretrained(fitted.artifact).editor
    assert type(rebuilt) is type(fitted.module.editor) and not rebuilt.training
    assert jsonable(rebuilt.config) == card_of(fitted.artifact)["editor"]["config"]
    mine, theirs = rebuilt.state_dict(), fitted.module.editor.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(mine[k].dtype == v.dtype and torch.equal(mine[k], v) for k, v in theirs.items())
    assert not any(p.requires_grad for p in rebuilt.parameters())


def test_a_serac_artifact_holds_its_config_and_its_tokenizers(serac_fitted):
    artifact = serac_fitted.artifact
    assert sorted(p.name for p in artifact.iterdir()) == sorted(
        [CARD_FILE, WEIGHTS_FILE, SCOPE_TOKENIZER, COUNTERFACTUAL_TOKENIZER]
    )
    config = card_of(artifact)["editor"]["config"]
    assert card_of(artifact)["editor"]["class"] == "SERAC"
    assert config["scope_encoder"]["model_type"] == "bert" and config["language_model"]["model_type"] == "llama"
    assert (config["kind"], config["image_scope"], config["counterfactual_image"]) == ("distance", True, True)
    assert config["scope_target"] is False  # the classifier's entries are the edit prompts


def test_artifacts_load_and_edit_with_lightning_and_jsonargparse_blocked(fitted, serac_fitted, world, base_dir):
    command = [sys.executable, "-c", WITHOUT_LIGHTNING, str(base_dir), str(world / VAL_FILE), str(world / "images")]
    done = subprocess.run(
        [*command, str(fitted.artifact), str(serac_fitted.artifact)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["edited with mend", "edited with serac"]


@pytest.mark.parametrize(
    "rank,message",
    [
        (8, "the weights do not fit the MEND its config in editor.json describes"),
        ("wide", r"editor.json: editor.config.rank is 'wide'; it must be an integer >= 1"),
    ],
)
def test_an_editor_config_that_does_not_match_the_weights_is_refused(artifact_copy, rank, message):
    card = card_of(artifact_copy)
    card["editor"]["config"]["rank"] = rank
    (artifact_copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match=message):
        Editor.from_pretrained(artifact_copy)


def test_unreadable_artifacts_name_the_problem(artifact_copy, tmp_path):
    (artifact_copy / CARD_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Editor.from_pretrained(artifact_copy)
    with pytest.raises(ArtifactError, match="no editor.json"):
        Editor.from_pretrained(tmp_path)


def test_a_backbone_of_another_size_is_refused_naming_shape_and_config_hash(fitted, world):
    editor = Editor.from_pretrained(fitted.artifact)
    spec = load_backbone_spec(CONFIGS / "blip2-tiny.yaml")
    config = {**spec.config, "text_config": {**spec.config["text_config"], "ffn_dim": 128}}
    wider = Blip2Backbone.from_config(config, edit_params=spec.edit_params, tokenizer=make_tokenizer())
    with pytest.raises(FingerprintMismatch) as refused:
        editor.attach(wider)
    message = str(refused.value)
    assert "config hash" in message
    assert (
        "shape of language_model.model.decoder.layers.1.fc1.weight: "
        "the editor expects [256, 64], the backbone has [128, 64]" in message
    )
    expected = editor.fingerprint
    assert fingerprint_problems(expected, {**expected, "family": "llava"}) == [
        "family: the editor was trained on 'blip2', the backbone is 'llava'"
    ]


def test_kedit_eval_refuses_a_mismatched_backbone(fitted, world, tmp_path, capsys):
    spec = load_backbone_spec(CONFIGS / "blip2-tiny.yaml")
    config = {**spec.config, "text_config": {**spec.config["text_config"], "num_hidden_layers": 5}}
    Blip2Backbone.from_config(config, edit_params=spec.edit_params, tokenizer=make_tokenizer()).save_pretrained(
        tmp_path / "deeper"
    )
    args = [
        "eval",
        "--editor",
        str(fitted.artifact),
        "--backbone",
        str(tmp_path / "deeper"),
        "--data",
        str(world / VAL_FILE),
        "--images",
        str(world / "images"),
    ]
    assert main(args) == 2
    assert "FingerprintMismatch" in capsys.readouterr().err


def test_a_second_method_plugs_in_through_the_registry(base_dir, tmp_path):
    baseline = FTModule(base_spec(base_dir), lr=0.5, steps=2)
    baseline.configure_model()
    editor = Editor.from_pretrained(export_module(baseline, tmp_path / "ft"))
    rebuilt = editor.attach(baseline.backbone)
    assert editor.method == "ft" and (rebuilt.lr, rebuilt.steps) == (0.5, 2)
    sub_batch = baseline.backbone.processor(["Question: What colour is the object? Short answer:"], ["red"], None)
    expected = dense_edit(baseline.editor, baseline.backbone, sub_batch)  # two plain gradient steps
    state = editor.start(baseline.backbone)
    state.add(sub_batch, "the edit", "")
    weights = baseline.backbone.editable_parameters()
    for name, w in expected.items():
        torch.testing.assert_close(weights[name].detach(), w, rtol=1e-4, atol=1e-6)


def test_kedit_eval_refuses_an_overlong_prompt_and_an_empty_file_in_one_line(fitted, world, base_dir, tmp_path, capsys):
    records = json.loads((world / VAL_FILE).read_text())
    records[1]["src"] = " ".join(["word"] * 20_000)
    long_file, empty_file = tmp_path / "long.json", tmp_path / "empty.json"
    long_file.write_text(json.dumps(records))
    empty_file.write_text("[]")
    args = ["eval", "--editor", str(fitted.artifact), "--backbone", str(base_dir), "--images", str(world / "images")]
    assert main([*args, "--data", str(long_file), "--device", "cpu", "--no-progress"]) == 2
    error = capsys.readouterr().err  # after transformers' weight-loading progress bar
    assert "Traceback" not in error
    assert error.splitlines()[-1].startswith(
        f"kedit eval: DataError: {long_file}: record 1: field 'src': prompt + answer is 200"
    )
    assert "more than the backbone's 128 positions" in error.splitlines()[-1]
    assert main([*args, "--data", str(empty_file), "--device", "cpu", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.splitlines()[-1] == f"kedit eval: DataError: {empty_file}: no records (the file is an empty list)"
    assert "Traceback" not in error


def test_kedit_eval_takes_images_outside_the_root_only_from_a_named_extra_root(
    fitted, world, base_dir, tmp_path, capsys
):
    records = json.loads((world / VAL_FILE).read_text())
    for record in records:  # the layout of ADS-Edit's multi-view files: paths that leave the image root
        for field in ("image", "image_rephrase", "m_loc"):
            record[field] = f"../images/{record[field]}"
    data = tmp_path / "outside.json"
    data.write_text(json.dumps(records))
    root = world / "vqa"  # the image root: a sibling of the folder the paths lead to
    args = ["eval", "--editor", str(fitted.artifact), "--backbone", str(base_dir), "--data", str(data)]
    args += ["--images", str(root), "--device", "cpu", "--no-progress"]
    assert main(args) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert f"{data}: record 0: field 'image'" in error and "outside the image root" in error
    assert main([*args, "--extra-image-root", str(world / "images")]) == 0
