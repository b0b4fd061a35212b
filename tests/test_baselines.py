"""Baselines in the evaluation harness: FT-L and LoRA against a plain dense Adam loop (tests/oracle.py), the
prompt_last loss by hand, IKE's context against the same text run through the whole model, and the
`kedit eval --baseline` surface."""

import ast
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIGS, VAL_FILE
from oracle import answers, optimized_weights
from oracle import evaluate_batch as oracle_evaluate_batch
from test_backbones import make_tokenizer, tiny_backbone
from test_edited_model import PROMPTS, TARGETS, make_batch

from data_modules.encoding import IGNORE_INDEX
from data_modules.text_records import TextRecord
from kedit_lightning.backbones import load_backbone_spec
from kedit_lightning.cli import main
from kedit_lightning.editors.edited_model import StepInputs, WeightEditedModel
from kedit_lightning.editors.ike import IKE
from kedit_lightning.editors.losses import per_example_prompt_last_nll
from kedit_lightning.editors.tuning import FTL, LoRA
from kedit_lightning.evaluation import EditMetrics, evaluate_batch, flatten_report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def first_record(sub_batch):
    return {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in sub_batch.items()}


def test_prompt_last_reads_every_answer_token_at_the_last_prompt_position():
    labels = torch.tensor([[IGNORE_INDEX, 0, 2], [IGNORE_INDEX, IGNORE_INDEX, 0]])
    logits = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]])
    # Example 0 reads both tokens at its first answer row (uniform: ln 3 each); example 1: p = 2 / 4.
    expected = torch.tensor([math.log(3), math.log(2)])
    torch.testing.assert_close(per_example_prompt_last_nll(logits, labels), expected)


@pytest.mark.parametrize("family", ["text", "blip2"])
@pytest.mark.parametrize("objective", ["prompt_last", "target_new"])
def test_ftl_metrics_match_a_dense_adam_loop(tokenizer, family, objective):
    torch.manual_seed(3)
    backbone = tiny_backbone(family, tokenizer).eval()
    batch = make_batch(backbone)
    editor = FTL(lr=2e-2, steps=3, norm_constraint=3e-2, objective=objective)
    fast, slow = EditMetrics(), EditMetrics()
    evaluate_batch(editor, backbone, batch, fast)
    oracle_evaluate_batch(editor, backbone, batch, slow)
    fast, slow = flatten_report(fast.compute()), flatten_report(slow.compute())
    assert fast == pytest.approx(slow)
    assert slow["reliability"] > 0 and slow["t_locality"] < 1  # the edits did something


@pytest.mark.parametrize("editor", [FTL(lr=1e-2, steps=4, norm_constraint=2e-2), LoRA(rank=4, lr=1e-2, steps=4)])
def test_batched_edit_folds_into_the_dense_adam_weights(tokenizer, editor):
    torch.manual_seed(4)
    backbone = tiny_backbone("text", tokenizer).eval()
    edit = make_batch(backbone)["edit_inner"]
    inputs = StepInputs(backbone, {"edit": edit})
    model = WeightEditedModel(backbone)
    editor(model, inputs, inputs.rows("edit"), batched=True)
    got = model.weights()
    expected = optimized_weights(editor, backbone, edit)
    for name, w in backbone.editable_parameters().items():
        change, expected_change = got[name] - w, expected[name] - w
        assert expected_change.abs().max() > 0
        torch.testing.assert_close(change, expected_change, rtol=1e-3, atol=1e-3 * float(expected_change.abs().max()))
    if isinstance(editor, FTL):  # 4 Adam steps of 1e-2 reach the 2e-2 bound, and no element passes it
        bound = max(float((got[n] - w).abs().max()) for n, w in backbone.editable_parameters().items())
        assert bound == pytest.approx(editor.norm_constraint, rel=1e-4)


def test_an_edit_under_the_stop_loss_takes_no_step(tokenizer):
    backbone = tiny_backbone("text", tokenizer).eval()
    edit = make_batch(backbone)["edit_inner"]
    inputs = StepInputs(backbone, {"edit": edit})
    model = WeightEditedModel(backbone)
    FTL(stop_loss=1e6)(model, inputs, inputs.rows("edit"))
    for name, w in backbone.editable_parameters().items():
        assert torch.equal(model.weights()[name], w)


def test_ike_answers_each_prompt_after_the_new_fact(tokenizer):
    """With no demonstrations the context is "New Fact: {prompt} {target}\\nPrompt: ": the same text through
    the whole model gives the same answer logits."""
    torch.manual_seed(6)
    backbone = tiny_backbone("text", tokenizer).eval()
    batch = make_batch(backbone)
    inputs = StepInputs(backbone, {"edit": first_record(batch["edit_inner"]), "loc": batch["loc"]})
    editor = IKE(k=0)
    model = editor.edited_model(backbone)
    group = editor(model, inputs, inputs.rows("edit"))
    loc = inputs.rows("loc")
    got = model.answer_logits(inputs, loc, group.expand(len(loc)))
    fact = f"New Fact: {PROMPTS['edit_inner'][0]} {TARGETS['edit_inner'][0]}\nPrompt: "
    whole = backbone.processor([fact + p for p in PROMPTS["loc"]], TARGETS["loc"])
    with torch.no_grad():
        expected = answers(backbone(whole), whole["labels"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with model.unedited(), torch.no_grad():  # no edit in force: the plain model
        torch.testing.assert_close(
            model.answer_logits(inputs, loc), answers(backbone(batch["loc"]), batch["loc"]["labels"])
        )


def test_ike_picks_the_most_similar_demonstrations(tokenizer):
    backbone = tiny_backbone("text", tokenizer).eval()
    batch = make_batch(backbone)
    inputs = StepInputs(backbone, {"edit": first_record(batch["edit_inner"])})
    near = TextRecord(src="Where is this object located?", rephrase="Where is it?", alt="Velor", loc="x", loc_ans="y")
    far = TextRecord(src="Question: colour?", rephrase="colour?", alt="blue", loc="z", loc_ans="w")
    editor = IKE(k=1).demonstrate([far, near])
    model = editor.edited_model(backbone)
    group = editor(model, inputs, inputs.rows("edit"))
    text = backbone.processor.tokenizer.decode(model.context(int(group[0])))
    # The copy sentence of the identical fact (its fact twice), then the new fact itself.
    assert text.lower().count("where is this object located ? velor") == 3, text


def test_kedit_eval_scores_baselines_beside_the_editor(fitted, world, base_dir, tmp_path):
    quick = tmp_path / "ft-l-quick.yaml"
    quick.write_text(yaml.safe_dump({"class_path": "kedit_lightning.editors.tuning.FTL", "init_args": {"steps": 2}}))
    out = tmp_path / "eval.json"
    common = ["--data", str(world / VAL_FILE), "--images", str(world / "images"), "--device", "cpu", "--no-progress"]
    args = ["eval", "--editor", str(fitted.artifact), "--backbone", str(base_dir), *common, "--json", str(out)]
    demos = ["--demonstrations", str(world / "vqa" / "vqa_train.json")]
    assert main([*args, "--baseline", "unedited", "--baseline", str(quick), "--baseline", "ike", *demos]) == 0
    report = json.loads(out.read_text())
    assert "reliability" in report and set(report["baselines"]) == {"unedited", "ft-l-quick", "ike"}
    unedited = report["baselines"]["unedited"]
    assert unedited["t_locality"] == unedited["i_locality"] == 1.0  # the pre-edit model agrees with itself
    assert all(r["n_edits"] == report["n_edits"] for r in report["baselines"].values())


def test_kedit_eval_runs_baselines_on_a_backbone_yaml_without_an_editor(world, tmp_path, capsys):
    spec = dataclasses.asdict(load_backbone_spec(CONFIGS / "blip2-tiny.yaml"))
    backbone_yaml = tmp_path / "blip2.yaml"
    backbone_yaml.write_text(yaml.safe_dump({**spec, "processor": str(world / "tokenizer")}))
    out = tmp_path / "eval.json"
    common = ["--data", str(world / VAL_FILE), "--images", str(world / "images"), "--no-progress", "--device", "cpu"]
    assert main(["eval", "--backbone", str(backbone_yaml), *common, "--baseline", "unedited", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {"baselines"}
    assert "| unedited |" in capsys.readouterr().out
    # Sequential editing compares baselines too: each gets its curve, the unedited one flat at 1.0 locality.
    sequential = ["--baseline", "unedited", "--baseline", "grace", "--sequential", "2", "--json", str(out)]
    assert main(["eval", "--backbone", str(backbone_yaml), *common, *sequential]) == 0
    curves = {name: r["sequential"]["curve"] for name, r in json.loads(out.read_text())["baselines"].items()}
    assert set(curves) == {"unedited", "grace"} and curves["grace"]["n_edits"] == [1, 2]
    assert curves["unedited"]["t_locality"] == [1.0, 1.0]
    assert "grace: the first 2 edits as more edits accumulate" in capsys.readouterr().out
    refusals = {
        "--baseline nope: not a known baseline": ["--baseline", "nope"],
        "--baseline ike: IKE needs --demonstrations FILE": ["--baseline", "ike"],
        "--editor: required": [],
    }
    for message, extra in refusals.items():
        assert main(["eval", "--backbone", str(backbone_yaml), *common, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines


def test_named_baselines_come_with_the_installed_wheel(tmp_path):
    """Built and installed outside the checkout, `load_baseline("lora")` finds its config in the package."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "kedit_lightning", "data_modules"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel")],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(tmp_path / "site"), str(wheel)],
        check=True,
        capture_output=True,
    )
    script = "from kedit_lightning.baselines import load_baseline; print(load_baseline('lora')[1].config)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    loaded = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    expected = yaml.safe_load((ROOT / "kedit_lightning" / "configs" / "editors" / "lora.yaml").read_text())["init_args"]
    assert ast.literal_eval(loaded.stdout) == expected


def test_lora_edits_do_not_depend_on_the_global_rng(tokenizer):
    backbone = tiny_backbone("text", tokenizer).eval()
    batch = make_batch(backbone)
    reports = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # anything else drawing from the global RNG between runs
        metrics = EditMetrics()
        evaluate_batch(LoRA(rank=4, lr=1e-2, steps=3), backbone, batch, metrics)
        reports.append(flatten_report(metrics.compute()))
    assert reports[0] == reports[1]
    inputs = StepInputs(backbone, {"edit": batch["edit_inner"]})
    changes = []
    for seed in (0, 0, 1):
        model = WeightEditedModel(backbone)
        LoRA(rank=4, lr=1e-2, steps=3, seed=seed)(model, inputs, inputs.rows("edit"))
        changes.append(torch.cat([w.flatten() for w in model.weights().values()]))
    assert torch.equal(changes[0], changes[1]) and not torch.equal(changes[0], changes[2])  # the seed picks A


def test_kedit_eval_protocol_all_keeps_easyedit_for_the_weight_editors(world, tmp_path, capsys):
    spec = dataclasses.asdict(load_backbone_spec(CONFIGS / "blip2-tiny.yaml"))
    backbone_yaml = tmp_path / "blip2.yaml"
    backbone_yaml.write_text(yaml.safe_dump({**spec, "processor": str(world / "tokenizer")}))
    quick = tmp_path / "ft-l-quick.yaml"
    quick.write_text(yaml.safe_dump({"class_path": "kedit_lightning.editors.tuning.FTL", "init_args": {"steps": 2}}))
    out = tmp_path / "eval.json"
    args = [
        "eval",
        "--backbone",
        str(backbone_yaml),
        "--data",
        str(world / VAL_FILE),
        "--images",
        str(world / "images"),
    ]
    baselines = ["--baseline", str(quick), "--baseline", "grace", "--protocol", "all", "--json", str(out)]
    assert main([*args, "--no-progress", "--device", "cpu", *baselines]) == 0
    printed = capsys.readouterr().out
    assert printed.count("easyedit left out") == 1 and "--protocol all: easyedit left out for grace:" in printed
    report = json.loads(out.read_text())["baselines"]
    for protocol in ("kedit", "vlkeb"):
        assert f"{protocol}/t_locality" in report["ft-l-quick"] and f"{protocol}/t_locality" in report["grace"]
    assert "easyedit/t_locality" in report["ft-l-quick"] and "easyedit/i_locality" in report["ft-l-quick"]
    assert not any(key.startswith("easyedit/") for key in report["grace"])
    unedited = {key: value for key, value in report["ft-l-quick"].items() if "/pre_" in key}
    assert {key.split("/")[0] for key in unedited} == {"kedit", "easyedit", "vlkeb"}
    # GRACE first: the unedited model is scored beside it, under easyedit too, by a pass of its own.
    reordered = ["--baseline", "grace", "--baseline", str(quick), "--protocol", "all", "--json", str(out)]
    assert main([*args, "--no-progress", "--device", "cpu", *reordered]) == 0
    report = json.loads(out.read_text())["baselines"]
    assert {key: value for key, value in report["grace"].items() if "/pre_" in key} == pytest.approx(unedited)
    assert not any(key.startswith("easyedit/") and "/pre_" not in key for key in report["grace"])
