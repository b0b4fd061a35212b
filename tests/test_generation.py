"""Greedy generation on the edited model (kedit_lightning/generation.py) against the plain token-by-token
oracle (full forward per token, dense edited weights), and the answer matching of `gen_*` metrics."""

import json

import pytest
import torch
from conftest import VAL_FILE, VAL_RECORDS
from oracle import dense_edit
from oracle import greedy_tokens as oracle_greedy_tokens
from test_backbones import TINY, draw_images, make_tokenizer, tiny_backbone
from test_edited_model import trained_like

from data_modules.datamodules import VQADataModule
from data_modules.encoding import IGNORE_INDEX
from kedit_lightning.cli import main
from kedit_lightning.commands.facts_cmd import first_answer
from kedit_lightning.commands.facts_cmd import greedy_answers as facts_greedy_answers
from kedit_lightning.editor import Editor
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.mend import MEND
from kedit_lightning.evaluation import record_batches
from kedit_lightning.generation import answer_matches, answer_token_counts, greedy_tokens, same_answer

PROMPTS = ["Where is this object located?", "What colour is the object?", "Question: Short answer:"]
TARGETS = ["Velor", "green yellow", "red"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _row(sub_batch, i):
    return {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in sub_batch.items()}


@pytest.mark.parametrize("family", TINY)
def test_greedy_decoding_under_each_rows_edit_matches_the_token_by_token_oracle(tokenizer, family):
    torch.manual_seed(3)
    backbone = tiny_backbone(family, tokenizer).eval()
    images = None if family == "text" else [draw_images()[r % 2] for r in range(3)]
    edits = backbone.processor(PROMPTS, TARGETS, images)
    editor = trained_like(MEND.for_backbone(backbone, rank=8, edit_lr=1.0)).eval()
    model = editor.edited_model(backbone)
    inputs = StepInputs(backbone, {"edit": edits})
    groups = editor(model, inputs, inputs.rows("edit"))
    limits = answer_token_counts(edits) + 2
    fast = greedy_tokens(model, backbone, {"edit": edits}, groups, limits)
    unedited = greedy_tokens(model, backbone, {"edit": edits}, None, limits)
    for i in range(3):
        row = _row(edits, i)
        assert fast[i] == oracle_greedy_tokens(backbone, row, int(limits[i]), dense_edit(editor, backbone, row))
        assert unedited[i] == oracle_greedy_tokens(backbone, row, int(limits[i]))
    assert fast != unedited  # the edits change what is generated: not a trivial comparison


def test_answers_match_on_normalised_leading_words():
    assert answer_matches("la  Paz, the capital", "La Paz")
    assert answer_matches("VELOR.", "Velor")
    assert not answer_matches("Velorian", "Velor")
    assert not answer_matches("Paris", "La Paz")
    assert not answer_matches("", "")
    assert same_answer("Marun is", "marun!", "Marun") and not same_answer("Velor", "Marun", "Marun")
    assert same_answer("", "", "Marun")  # both say nothing: the edit changed nothing


def test_kedit_eval_generate_reports_generated_exact_match_as_the_oracle_decodes_it(
    fitted, world, base_dir, tmp_path, capsys
):
    out = tmp_path / "report.json"
    args = ["eval", "--editor", str(fitted.artifact), "--backbone", str(base_dir), "--data", str(world / VAL_FILE)]
    args += ["--images", str(world / "images"), "--generate", "--json", str(out), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    keys = ["gen_reliability", "gen_t_generality", "gen_i_generality", "gen_t_locality", "gen_i_locality"]
    assert all(f"| {key} |" in table for key in keys) and "reliability" in report
    # Independently: each record edited alone into dense weights, decoded one full forward per token.
    editor = Editor.from_pretrained(fitted.artifact)
    backbone = editor.load_backbone(str(base_dir))
    data = VQADataModule(str(world), val_file=VAL_FILE, batch_size=VAL_RECORDS, processor=editor.processor(backbone))
    data.setup("validate")
    tokenizer = backbone.processor.tokenizer
    reliable, local = [], []
    for record in record_batches(next(iter(data.val_dataloader()))):
        weights = dense_edit(editor.editor, backbone, record["edit_inner"])
        for name, hits in (("edit_inner", reliable), ("loc", local)):
            row = record[name]
            target = tokenizer.decode(row["labels"][0][row["labels"][0] != IGNORE_INDEX].tolist()).strip()
            limit = int(answer_token_counts(row)[0]) + 2
            post = tokenizer.decode(oracle_greedy_tokens(backbone, row, limit, weights), skip_special_tokens=True)
            if name == "loc":
                pre = tokenizer.decode(oracle_greedy_tokens(backbone, row, limit), skip_special_tokens=True)
                hits.append(same_answer(post, pre, target))
            else:
                hits.append(answer_matches(post, target))
    assert report["gen_reliability"] == pytest.approx(sum(reliable) / len(reliable))
    assert report["gen_t_locality"] == pytest.approx(sum(local) / len(local))


def test_generate_with_sequential_is_refused_in_one_line(fitted, world, base_dir, capsys):
    args = ["eval", "--editor", str(fitted.artifact), "--backbone", str(base_dir), "--data", str(world / VAL_FILE)]
    args += ["--images", str(world / "images"), "--generate", "--sequential", "2", "--no-progress"]
    assert main(args) == 2
    assert "--generate scores records edited one at a time; it does not combine with --sequential" in (
        capsys.readouterr().err
    )


def test_kedit_facts_answers_are_what_transformers_generate_greedily(tokenizer):
    """`kedit facts` decodes with the same decoder; one prompt at a time, unedited, it is greedy search."""
    torch.manual_seed(4)
    backbone = tiny_backbone("text", tokenizer).eval()
    prompts = ["Where is Zandia?", "The capital of Zandia is", "Question: what colour is blue?"]
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = backbone.model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=1, pad_token_id=0)
        expected.append(first_answer(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    assert facts_greedy_answers(backbone, prompts) == expected
    assert any(expected)  # the tiny model says something: not a trivial comparison


def test_serac_generates_through_its_routing(serac_fitted, world, base_dir, tmp_path):
    """SERAC's edits live in its memory: generation reads its counterfactual tokens too, extended each step."""
    out = tmp_path / "serac.json"
    args = ["eval", "--editor", str(serac_fitted.artifact), "--backbone", str(base_dir)]
    args += ["--data", str(world / VAL_FILE), "--images", str(world / "images"), "--generate", "--json", str(out)]
    args += ["--no-progress", "--device", "cpu"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    keys = {"gen_reliability", "gen_t_generality", "gen_i_generality", "gen_t_locality", "gen_i_locality"}
    assert keys <= set(report) and all(0.0 <= report[key] <= 1.0 for key in keys)
