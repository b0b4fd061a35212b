"""The editing API and CLI: single, batched and sequential edits, exact restore, refusals, plain-transformers export."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import VAL_FILE
from oracle import dense_edit
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Blip2ForConditionalGeneration

import kedit_lightning.editor as editor_api
from data_modules.datamodules import VQADataModule
from data_modules.datasets import VQA_TEMPLATE
from data_modules.encoding import IGNORE_INDEX
from data_modules.records import EditRecord
from kedit_lightning.artifact import COUNTERFACTUAL_TOKENIZER, SCOPE_TOKENIZER, sha256_of
from kedit_lightning.cli import main
from kedit_lightning.editor import (
    EditedBackbone,
    Editor,
    EditRequest,
    EditSession,
    NonFiniteEdit,
    curve_points,
    evaluate,
    evaluate_sequential,
    in_force,
    loader_records,
    score,
)
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.grace import GRACE
from kedit_lightning.evaluation import HEADLINE, EditMetrics
from kedit_lightning.metrics import answer_token_accuracy


@pytest.fixture()
def editor(fitted) -> Editor:
    return Editor.from_pretrained(fitted.artifact)


@pytest.fixture()
def backbone(editor, base_dir):
    return editor.load_backbone(str(base_dir))


@pytest.fixture(scope="module")
def records(world) -> list[dict]:
    return json.loads((world / VAL_FILE).read_text())


def snapshot(backbone) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in backbone.model.named_parameters()}


def same_weights(backbone, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, weights[name]) for name, p in backbone.model.named_parameters())


def answer_ids(logits: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """Predicted token ids at the answer positions (logits aligned with labels)."""
    return logits.argmax(-1)[labels != IGNORE_INDEX].tolist()


def test_single_edit_writes_new_weights_and_restore_is_exact(editor, backbone, records, world):
    before = snapshot(backbone)
    edited = editor.edit(backbone, [records[0]], image_root=world / "images")
    assert edited.backbone is backbone and edited.n_edits == 1
    changed = {name for name, p in backbone.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(editor.fingerprint["edit_params"])
    assert edited.restore() is backbone and edited.n_edits == 0
    assert same_weights(backbone, before)


def test_request_forms_give_the_same_edit(editor, backbone, records, world):
    record, images = records[0], world / "images"
    prompt = VQA_TEMPLATE.format(record["src"])
    forms = [
        record,
        EditRecord.from_dict(record),
        {"prompt": prompt, "target": record["alt"], "image": record["image"]},
        EditRequest(prompt, record["alt"], images / record["image"]),
    ]
    roots = [images, images, images, None]
    edits = [editor.encode(backbone, [form], image_root=root)[0] for form, root in zip(forms, roots)]
    for sub_batch in edits[1:]:
        assert all(torch.equal(sub_batch[k], edits[0][k]) for k in ("input_ids", "labels", "pixel_values"))
    with pytest.raises(ValueError, match="edit request 1: field 'target' must be a non-empty string"):
        editor.encode(backbone, [record, {"prompt": "a question"}], image_root=images)
    with pytest.raises(ValueError, match="images for all requests or for none"):
        editor.encode(backbone, [record, {"prompt": "The capital of Zandia is", "target": "Velor"}], image_root=images)


def test_a_batched_edit_is_one_update_and_differs_from_sequential(editor, backbone, records, world, fitted):
    images, names = world / "images", list(editor.fingerprint["edit_params"])
    two = records[:2]
    collated = editor.encode(backbone, two, image_root=images)[0]
    assert collated["input_ids"].shape[0] == 2
    # One batched update is the trained editor's update on the collated sub-batch (the per-record oracle's).
    expected = dense_edit(editor.attach(backbone), backbone, collated)
    batched = editor.edit(backbone, two, image_root=images)
    batched_weights = {n: backbone.model.get_parameter(n).detach().clone() for n in names}
    assert all(torch.allclose(batched_weights[n], expected[n], atol=1e-6) for n in names)
    batched.restore()
    editor.edit(backbone, two, batch_size=1, image_root=images)
    assert not all(torch.allclose(backbone.model.get_parameter(n), batched_weights[n]) for n in names)


def test_sequential_calls_match_one_call_with_batch_size_one(editor, backbone, records, world):
    images, names = world / "images", list(editor.fingerprint["edit_params"])
    original = snapshot(backbone)
    in_one_call = editor.edit(backbone, records[:3], batch_size=1, image_root=images)
    final = {n: backbone.model.get_parameter(n).detach().clone() for n in names}
    in_one_call.restore()
    edited = editor.edit(backbone, records[:1], image_root=images)
    for record in records[1:3]:
        edited = editor.edit(edited, [record], image_root=images)
    assert edited.n_edits == 3
    assert all(torch.allclose(backbone.model.get_parameter(n), final[n], atol=1e-6) for n in names)
    edited.restore()
    assert same_weights(backbone, original)


def test_a_non_finite_update_is_refused_and_the_model_left_unchanged(editor, backbone, records, world):
    before = snapshot(backbone)
    editor.attach(backbone).edit_lrs.data[-1] = float("nan")
    with pytest.raises(NonFiniteEdit, match="edit group 1 of 1 gives non-finite values .* the backbone is unchanged"):
        editor.edit(backbone, records[:2], image_root=world / "images")
    assert same_weights(backbone, before)


def test_edited_model_saves_as_plain_transformers_and_gives_the_new_answer(editor, backbone, records, world, tmp_path):
    record = records[0]
    sub_batch = editor.encode(backbone, [record], image_root=world / "images")[0]
    target = sub_batch["labels"][sub_batch["labels"] != IGNORE_INDEX].tolist()
    with torch.no_grad():
        assert answer_ids(backbone(sub_batch), sub_batch["labels"]) != target  # the base model does not already say it
    edited = editor.edit(backbone, [record], image_root=world / "images")
    edited.save_pretrained(tmp_path / "edited")
    plain = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "edited").eval()
    with torch.no_grad():
        logits = plain(
            input_ids=sub_batch["input_ids"],
            attention_mask=sub_batch["attention_mask"],
            pixel_values=sub_batch["pixel_values"],
        ).logits
    shifted = torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)
    assert answer_ids(shifted, sub_batch["labels"]) == target
    assert all(
        torch.equal(plain.get_parameter(n), backbone.model.get_parameter(n)) for n in editor.fingerprint["edit_params"]
    )


def test_kedit_edit_applies_a_data_file_and_saves_the_model(
    editor, backbone, fitted, world, base_dir, tmp_path, capsys
):
    out = tmp_path / "edited"
    args = [
        "edit",
        "--editor",
        str(fitted.artifact),
        "--backbone",
        str(base_dir),
        "--data",
        str(world / VAL_FILE),
        "--images",
        str(world / "images"),
        "--out",
        str(out),
        "--sequential",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert "applied 4 edits" in capsys.readouterr().out
    plain = Blip2ForConditionalGeneration.from_pretrained(out)
    records = json.loads((world / VAL_FILE).read_text())
    editor.edit(backbone, records, batch_size=2, image_root=world / "images")
    for name in editor.fingerprint["edit_params"]:
        assert torch.allclose(plain.get_parameter(name), backbone.model.get_parameter(name), atol=1e-6)
    assert main(args) == 2  # never writes into a non-empty folder
    assert "is not empty" in capsys.readouterr().err


def edit_args(editor_dir, base_dir, world, data, out) -> list[str]:
    return [
        *("edit", "--editor", str(editor_dir), "--backbone", str(base_dir), "--data", str(data)),
        *("--images", str(world / "images"), "--out", str(out), "--device", "cpu"),
    ]


def test_kedit_edit_applies_a_twelve_record_file_as_one_batched_edit(
    editor, backbone, fitted, world, base_dir, tmp_path, capsys
):
    data = world / "vqa" / "vqa_eval.json"
    records = json.loads(data.read_text())
    assert len(records) == 12
    assert main(edit_args(fitted.artifact, base_dir, world, data, tmp_path / "edited")) == 0
    out = capsys.readouterr().out
    assert "applied 12 edits" in out and "as one batched edit" in out
    assert all(f"{name}: " in out for name in editor.fingerprint["edit_params"])  # every edited weight's norm
    plain = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "edited")
    edited = editor.edit(backbone, records, image_root=world / "images")
    assert edited.n_edits == 12 and edited.session.head == 0  # one edit group
    for name in editor.fingerprint["edit_params"]:
        assert torch.allclose(plain.get_parameter(name), backbone.model.get_parameter(name), atol=1e-6)


def test_kedit_edit_refuses_to_save_a_wrecked_model_unless_forced(fitted, world, base_dir, tmp_path, capsys):
    wrecking = tmp_path / "wrecking-editor"
    shutil.copytree(fitted.artifact, wrecking)
    weights = load_file(wrecking / "editor.safetensors")
    weights["edit_lrs"] = weights["edit_lrs"] * 5e4  # large steps, still within the range editor.json allows
    save_file(weights, wrecking / "editor.safetensors")
    card = json.loads((wrecking / "editor.json").read_text())
    card["weights"]["sha256"] = sha256_of(wrecking / "editor.safetensors")
    (wrecking / "editor.json").write_text(json.dumps(card))
    args = [*edit_args(wrecking, base_dir, world, world / "vqa" / "vqa_eval.json", tmp_path / "edited"), "--sequential"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not saved" in err and "beyond the bound x2" in err
    ratio = float(err.split("by x")[1].split()[0])
    assert ratio > 2
    assert not (tmp_path / "edited").exists() or not any((tmp_path / "edited").iterdir())
    assert main([*args, "--force"]) == 0
    assert (tmp_path / "edited" / "config.json").is_file()


def test_kedit_eval_protocol_all_reports_every_protocol_and_writes_the_curve(fitted, world, base_dir, tmp_path, capsys):
    out, curves = tmp_path / "all.json", tmp_path / "curves"
    args = [
        *("eval", "--editor", str(fitted.artifact), "--backbone", str(base_dir), "--device", "cpu", "--no-progress"),
        *("--data", str(world / "vqa" / "vqa_eval.json"), "--images", str(world / "images"), "--sequential", "3"),
        *("--probe", "all", "--protocol", "all", "--curve", str(curves), "--json", str(out)),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| metric | unedited | kedit | easyedit | vlkeb |" in printed
    report = json.loads(out.read_text())
    for protocol in ("kedit", "easyedit", "vlkeb"):
        for key in HEADLINE:
            assert 0.0 <= report[f"{protocol}/{key}"] <= 1.0 and 0.0 <= report[f"{protocol}/pre_{key}"] <= 1.0
            assert report[f"{protocol}/pre_{key}"] == report[f"pre_{key}"] or key.endswith("locality")
        assert report[f"{protocol}/pre_t_locality"] == report[f"{protocol}/pre_i_locality"] == 1.0
        # Reliability and generality have one definition in every protocol.
        assert all(report[f"{protocol}/{key}"] == report[key] for key in ("reliability", "i_generality"))
    assert report["kedit/t_locality"] == report["t_locality"]
    assert "easyedit/portability" not in report  # EasyEdit's multimodal trainer defines none
    if "portability" in report:
        assert report["vlkeb/portability"] == report["kedit/portability"] == report["portability"]
    # VLKEB's pair (argmax ids, target ids) per record: (A + agreeing ids) / 2A, a mean of 1/2 + agreement / 2.
    for key in ("t_locality", "i_locality"):
        assert report[f"vlkeb/{key}"] == pytest.approx(0.5 + 0.5 * report[f"kedit/{key}"], abs=1e-6)
    curve = report["sequential"]["curve"]
    assert report["sequential"]["probe_edits"] == 3  # --probe all: every edit so far at each point
    events = EventAccumulator(str(curves / editor_method(fitted))).Reload()
    for key in HEADLINE:
        scalars = events.Scalars(f"sequential/{key}")
        assert [s.step for s in scalars] == curve["n_edits"] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx(curve[key])
    assert main(args) == 0  # a second run is a line of its own beside the first
    assert sorted(path.name for path in curves.iterdir()) == [editor_method(fitted), f"{editor_method(fitted)}_1"]


def editor_method(fitted) -> str:
    return json.loads((Path(fitted.artifact) / "editor.json").read_text())["method"]


def test_kedit_eval_sequential_reports_the_earliest_edits_as_edits_accumulate(fitted, world, base_dir, tmp_path):
    out = tmp_path / "sequential.json"
    args = [
        "eval",
        "--editor",
        str(fitted.artifact),
        "--backbone",
        str(base_dir),
        "--data",
        str(world / "vqa" / "vqa_eval.json"),
        "--images",
        str(world / "images"),
        "--sequential",
        "6",
        "--probe",
        "2",
        "--json",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    report = json.loads(out.read_text())
    # All of one question (the city) in the world's eval records: the last edit of each subject is in force.
    subjects = {record["subject"] for record in json.loads((world / "vqa" / "vqa_eval.json").read_text())[:6]}
    assert report["n_edits"] == report["sequential"]["edits_in_force"] == len(subjects) < 6
    assert report["sequential"]["all_edits"]["n_edits"] == 6 and report["sequential"]["probe_edits"] == 2
    curve = report["sequential"]["curve"]
    # The curve tracks the first two edits while one of them is in force (no later edit of its subject).
    first = json.loads((world / "vqa" / "vqa_eval.json").read_text())[:6]
    tracked_at = {
        n: [r["subject"] not in {s["subject"] for s in first[i + 1 : n]} for i, r in enumerate(first[:2])]
        for n in curve_points(6)
    }
    assert curve["n_edits"] == [n for n in curve_points(6) if any(tracked_at[n])]
    assert curve["n_edits"][:2] == [1, 2] and not all(tracked_at[6])  # the world supersedes one of them
    for key in HEADLINE:
        assert len(curve[key]) == len(curve["n_edits"]) and all(0.0 <= value <= 1.0 for value in curve[key])
    assert all(0.0 <= report[key] <= 1.0 for key in HEADLINE)
    # The unedited model on the same records: locality is its own agreement with itself.
    assert report["pre_t_locality"] == report["pre_i_locality"] == 1.0
    assert all(0.0 <= report[f"pre_{key}"] <= 1.0 for key in HEADLINE)
    assert main([*args[:-5], "--sequential", "500", "--no-progress"]) == 2  # more edits than records


@pytest.mark.parametrize("method", ["fitted", "serac_fitted"])
def test_a_further_edit_goes_on_top_of_the_edits_in_force_and_restore_takes_all_back(
    method, request, base_dir, records, world
):
    editor = Editor.from_pretrained(request.getfixturevalue(method).artifact)
    backbone = editor.load_backbone(str(base_dir))
    first, second = editor.encode(backbone, records[:2], batch_size=1, image_root=world / "images")
    both = editor.encode(backbone, records[:2], image_root=world / "images")[0]
    state = editor.start(backbone)
    unedited = EditedBackbone(state).answer_logits(both)
    state.add(first, "edit 1", "stopped")
    after_first = EditedBackbone(state).answer_logits(both)
    state.add(second, "edit 2", "stopped")
    after_both = EditedBackbone(state).answer_logits(both)
    assert not torch.allclose(after_both, after_first, atol=1e-3)  # the second edit counts
    state.restore()
    assert torch.equal(EditedBackbone(state).answer_logits(both), unedited)
    again = editor.start(backbone)
    again.add(first, "edit 1", "stopped")
    torch.testing.assert_close(EditedBackbone(again).answer_logits(both), after_first)


def test_kedit_eval_scores_one_hop_edits_per_hop(fitted, world, base_dir, tmp_path):
    onehop = json.loads((world / "vlkeb/eval_edit_onehop.json").read_text())[:3]
    (tmp_path / "onehop.json").write_text(json.dumps(onehop))
    out = tmp_path / "onehop-report.json"
    args = [
        "eval",
        "--editor",
        str(fitted.artifact),
        "--backbone",
        str(base_dir),
        "--data",
        str(tmp_path / "onehop.json"),
        "--images",
        str(world / "images"),
        "--json",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["n_edits"] == 3 and set(report["portability"]) == {"1-hop", "all"}
    editor = Editor.from_pretrained(fitted.artifact)
    backbone = editor.load_backbone(str(base_dir))
    without, after = [], []  # the question's accuracy after the main edit alone / after both edits
    for record in onehop:
        item, image = record["port_new"][0], world / "images" / record["image"]
        ask = [
            {"prompt": VQA_TEMPLATE.format(item[f"{field}_q"]), "target": item[f"{field}_a"], "image": image}
            for field in ("port_edit", "port")
        ]
        edit, port_edit, question = editor.encode(backbone, [record, *ask], batch_size=1, image_root=world / "images")
        state = editor.start(backbone)
        state.add(edit, "the edit", "stopped")
        without.append(answer_token_accuracy(EditedBackbone(state).answer_logits(question), question["labels"]).item())
        state.add(port_edit, "the one-hop edit", "stopped")
        after.append(answer_token_accuracy(EditedBackbone(state).answer_logits(question), question["labels"]).item())
        state.restore()
    assert report["portability"]["1-hop"] == pytest.approx(sum(after) / 3, abs=1e-6)
    assert after != without  # the one-hop edit matters here
    assert main([*args, "--hops", "2", "--require-port"]) == 2  # no 2-hop question in this file


def test_sequential_evaluation_stops_at_a_non_finite_edit(editor, backbone, world):
    data = VQADataModule(str(world), train_file=VAL_FILE, val_file=VAL_FILE, batch_size=2, processor=backbone.processor)
    data.setup("validate")
    editor.attach(backbone).edit_lrs.data[:] = float("inf")
    with pytest.raises(NonFiniteEdit, match=r"sequential edit 1 \(.*val4.json:0\) .* stopped"):
        evaluate_sequential(editor, backbone, data.val_dataloader(), 3, progress=False)


def test_the_sequential_curve_says_how_far_the_edits_moved_the_weights(editor, backbone, world):
    data = VQADataModule(str(world), train_file=VAL_FILE, val_file=VAL_FILE, batch_size=2, processor=backbone.processor)
    data.setup("validate")
    report = evaluate_sequential(editor, backbone, data.val_dataloader(), 2, probe=None, progress=False)
    original = {name: w.detach().clone() for name, w in backbone.editable_parameters().items()}  # restored
    mend = editor.attach(backbone)
    first, second = list(loader_records(data.val_dataloader(), torch.device("cpu"), 2))
    after_one = dense_edit(mend, backbone, first["edit_inner"])
    after_two = dense_edit(mend, backbone, second["edit_inner"], after_one)

    def moved(weights):
        change = sum(float((weights[name] - w).double().pow(2).sum()) for name, w in original.items())
        return (change / sum(float(w.double().pow(2).sum()) for w in original.values())) ** 0.5

    curve = report["sequential"]["curve"]
    assert curve["n_edits"] == [1, 2] and curve["weight_change"] == pytest.approx(
        [moved(after_one), moved(after_two)], rel=1e-3
    )


def test_serac_artifact_edits_through_its_memory_and_reproduces_validation_from_another_directory(
    serac_fitted, world, base_dir, records, tmp_path, capsys, monkeypatch
):
    artifact = Path(shutil.copytree(serac_fitted.artifact, tmp_path / "artifacts" / "serac"))
    monkeypatch.chdir(artifact.parent)
    editor = Editor.from_pretrained("serac")
    assert editor.method == "serac" and not editor.edits_weights
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    backbone = editor.load_backbone(str(base_dir))
    processor = editor.processor(backbone)
    # The classifier's and counterfactual model's tokenizers come from inside the artifact.
    assert Path(processor.scope_tokenizer.name_or_path).resolve() == (artifact / SCOPE_TOKENIZER).resolve()
    assert (
        Path(processor.counterfactual.tokenizer.name_or_path).resolve()
        == (artifact / COUNTERFACTUAL_TOKENIZER).resolve()
    )
    data = VQADataModule(str(world), train_file=VAL_FILE, val_file=VAL_FILE, batch_size=4, processor=processor)
    data.setup("validate")
    report = evaluate(editor, backbone, data.val_dataloader(), progress=False)
    validation = serac_fitted.module.last_report["val"]
    for key in HEADLINE:
        assert report[key] == pytest.approx(validation[key], abs=1e-6), key

    before = snapshot(backbone)
    edited = editor.edit(backbone, records[:2], image_root=world / "images")
    assert edited.n_edits == 2 and len(edited.session.model) == 2 and same_weights(backbone, before)
    query = editor.encode(backbone, records[:2], image_root=world / "images")[0]
    serac = editor.attach(backbone)
    memory, inputs = serac.edited_model(backbone), StepInputs(backbone, {"query": query})
    rows = inputs.rows("query")
    with torch.no_grad():
        groups = serac(memory, inputs, rows, batched=True)
        assert torch.equal(edited.answer_logits(query), memory.answer_logits(inputs, rows, groups))
        unedited = memory.answer_logits(inputs, rows)
    assert not torch.equal(
        edited.answer_logits(query), unedited
    )  # the edits' own prompts go to the counterfactual model
    with pytest.raises(TypeError, match="no edited weights to save"):
        edited.save_pretrained(world / "never")
    edited.restore()
    assert len(edited.session.model) == 0 and torch.equal(edited.answer_logits(query), unedited)
    args = [
        "edit",
        "--editor",
        str(serac_fitted.artifact),
        "--backbone",
        str(base_dir),
        "--data",
        str(world / VAL_FILE),
        "--images",
        str(world / "images"),
        "--out",
        str(tmp_path / "edited"),
        "--device",
        "cpu",
    ]
    assert main(args) == 2
    assert "keeps edits in a memory" in capsys.readouterr().err


def test_kedit_eval_refuses_the_every_position_protocol_for_serac(serac_fitted, world, base_dir, tmp_path, capsys):
    out = tmp_path / "serac.json"
    args = [
        *("eval", "--editor", str(serac_fitted.artifact), "--backbone", str(base_dir), "--device", "cpu"),
        *("--data", str(world / VAL_FILE), "--images", str(world / "images"), "--no-progress", "--json", str(out)),
    ]
    assert main([*args, "--protocol", "easyedit"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--protocol easyedit: SERAC answers only at the answer positions" in err
    assert main([*args, "--protocol", "all"]) == 0
    assert "--protocol all: easyedit left out" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert "vlkeb/t_locality" in report and "kedit/t_locality" in report
    assert not any(key.startswith("easyedit/") for key in report)


def test_kedit_eval_applies_serac_routing_and_mend_edit_limits_it_is_given(
    serac_fitted, fitted, world, base_dir, tmp_path, capsys
):
    out = tmp_path / "serac.json"
    data = ("--data", str(world / VAL_FILE), "--images", str(world / "images"), "--no-progress", "--json", str(out))
    args = [*("eval", "--editor", str(serac_fitted.artifact), "--backbone", str(base_dir), "--device", "cpu"), *data]
    assert main(args) == 0
    default = json.loads(out.read_text())
    assert default["routing"] == {"threshold": 0.5, "recency_margin": 0.25}
    assert default["scope"]["fp_rate"] < 1.0
    # A threshold of almost 0 routes every input, the unrelated ones too; the margin is only reported.
    assert main([*args, "--threshold", "1e-300", "--recency-margin", "1"]) == 0
    everything = json.loads(out.read_text())
    assert everything["routing"] == {"threshold": 1e-300, "recency_margin": 1.0}
    assert everything["scope"]["fp_rate"] == 1.0 and everything["scope"]["recall"] == 1.0
    capsys.readouterr()
    assert main([*args, "--threshold", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--threshold: threshold must be a probability strictly between 0 and 1" in err
    mend = [*("eval", "--editor", str(fitted.artifact), "--backbone", str(base_dir), "--device", "cpu"), *data]
    assert main([*mend, "--recency-margin", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--recency-margin: only a SERAC editor routes inputs" in err
    # MEND's counterpart, the edit norm limit, is refused for SERAC and reported for MEND.
    assert main([*args, "--max-edit-ratio", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-edit-ratio: only MEND edits are limited" in err
    assert main([*mend, "--max-edit-ratio", "1e-9"]) == 0
    limited = json.loads(out.read_text())
    assert limited["max_edit_ratio"] == 1e-9 and limited["reliability"] == limited["pre_reliability"]


def test_an_edit_is_superseded_by_a_later_edit_of_the_same_fact():
    def meta(prompt, rephrase, image=None, image_rephrase=None, subject=None):
        return {
            "prompt": prompt,
            "rephrase": rephrase,
            "image": image,
            "image_rephrase": image_rephrase,
            "subject": subject,
        }

    where, city, colour = "Where is it?", "Which city is it in?", "What colour is it?"
    # Subjects given: the first edit of Kepo's city is superseded, the colour edit is another fact.
    given = [
        meta(where, city, "kepo/0.png", "kepo/1.png", "Kepo"),
        meta(colour, colour, "kepo/2.png", "kepo/3.png", "Kepo"),
        meta(city, where, "kepo/4.png", "kepo/5.png", "Kepo"),
    ]
    assert in_force(given) == [False, True, True]
    # No subjects: pictures linked through the records' image/image_rephrase pairs (0-1, 1-2), another subject apart.
    linked = [
        meta(where, city, "a/0.png", "a/1.png"),
        meta(where, city, "b/0.png", "b/1.png"),
        meta(city, where, "a/1.png", "a/2.png"),
        None,
    ]
    assert in_force(linked) == [False, True, True, True]
    # Text edits: the question alone (prompt/rephrase linked) is the fact.
    text = [
        {"prompt": "The capital of Zandia is", "rephrase": "Zandia's capital is"},
        {"prompt": "Zandia's capital is", "rephrase": "Zandia has its capital in"},
    ]
    assert in_force(text) == [False, True]


def test_sequential_evaluation_scores_the_edits_in_force_and_keeps_all_edits(editor, backbone, world, tmp_path):
    records = json.loads((world / "vqa" / "vqa_eval.json").read_text())
    first = records[0]
    later = next(r for r in records[1:] if r["subject"] == first["subject"] and r["alt"] != first["alt"])
    other = next(r for r in records if r["subject"] != first["subject"])
    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "seq.json").write_text(json.dumps([first, other, later]))
    shutil.copytree(world / "images", tmp_path / "images")
    data = VQADataModule(
        str(tmp_path), train_file="vqa/seq.json", val_file="vqa/seq.json", batch_size=2, processor=backbone.processor
    )
    data.setup("validate")
    report = evaluate_sequential(editor, backbone, data.val_dataloader(), 3, progress=False)
    assert report["n_edits"] == 2 and report["sequential"]["edits_in_force"] == 2
    assert report["sequential"]["all_edits"]["n_edits"] == 3


def test_a_sequence_leaves_out_image_locality_it_edited_itself(backbone, world, tmp_path, monkeypatch):
    """The first record's image-locality input is the second record's edit question on its picture: after both
    edits it is left out, and I-Locality is that of the second record's row alone. GRACE: its edits reach only
    inputs near the edited ones, so the second record's own locality row keeps its answer."""
    records = json.loads((world / "vqa" / "vqa_eval.json").read_text())
    second = records[1]
    first = next(r for r in records if r["subject"] != second["subject"])
    first = {**first, "m_loc_q": second["src"], "m_loc": second["image"]}
    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "seq.json").write_text(json.dumps([first, second]))
    shutil.copytree(world / "images", tmp_path / "images")
    data = VQADataModule(
        str(tmp_path), train_file="vqa/seq.json", val_file="vqa/seq.json", batch_size=2, processor=backbone.processor
    )
    data.setup("validate")
    report = evaluate_sequential(GRACE(n_iter=30), backbone, data.val_dataloader(), 2, progress=False)
    assert report["sequential"]["locality_edited"] == {"t_locality": 0, "i_locality": 1, "n_locality": 0}
    # By hand: both edits in force, the second record scored alone.
    session = EditSession(GRACE(n_iter=30), backbone)
    edits = list(loader_records(data.val_dataloader(), torch.device("cpu"), 2))
    for edit in edits:
        session.add(edit["edit_inner"], "edit", "stopped")
    alone = score(session, edits[1:], EditMetrics())
    session.restore()
    assert report["i_locality"] == pytest.approx(alone["i_locality"]) == 1.0
    assert report["sequential"]["all_edits"]["i_locality"] == report["i_locality"]
    monkeypatch.setattr(editor_api.EditedFacts, "asks", lambda self, prompt, picture=None: False)
    counted = evaluate_sequential(GRACE(n_iter=30), backbone, data.val_dataloader(), 2, progress=False)
    assert counted["i_locality"] < report["i_locality"]  # the edited question now answers the second edit
