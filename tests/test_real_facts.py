"""The real-facts example at reduced size: `kedit facts` on SmolLM2 (pred / loc_ans from its own greedy answers,
split by subject), a few MEND steps from configs/mend/smollm2-135m-facts.yaml, and greedy generation after an
edit with the exported editor. Skipped without the optional SmolLM2 weights (as in CI)."""

import json
from pathlib import Path

import pytest
import torch
from test_gguf import needs_smollm2

from data_modules.text_records import read_text_records
from kedit_lightning.cli import main
from kedit_lightning.commands.facts_cmd import (
    FACT_TABLE,
    FILES,
    first_answer,
    generation_success,
    greedy_answers,
    read_fact_table,
)
from kedit_lightning.editor import Editor
from kedit_lightning.training_cli import main as train_main

REPO = Path(__file__).resolve().parent.parent
N_FACTS = 12


def test_the_fact_table_has_about_200_facts_with_a_different_counterfactual_each():
    table = read_fact_table(FACT_TABLE)
    facts = table["facts"]
    assert len(facts) >= 190 and table["unrelated"]
    assert all(fact["counterfactual"] != fact["answer"] for fact in facts)
    assert all(fact["neighbour"] != fact["subject"] for fact in facts)
    assert all(len(fact["counterfactual"].split()) <= 3 for fact in facts)


def test_a_fact_with_an_unknown_relation_is_named(tmp_path):
    table = read_fact_table(FACT_TABLE)
    table["facts"][3]["relation"] = "mayor"
    (tmp_path / "bad.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match=r"bad\.json: facts\[3\]\.relation: unknown relation 'mayor'"):
        read_fact_table(tmp_path / "bad.json")


def test_the_answer_is_the_continuation_up_to_punctuation():
    assert first_answer(" Paris. It is the largest city") == "Paris"
    assert first_answer(" Buenos Aires, the city") == "Buenos Aires"
    assert first_answer("\nThe capital") == ""


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-facts")
    assert main(["facts", "--out", str(root / "data"), "--limit", str(N_FACTS), "--eval-fraction", "0.3"]) == 0
    return root


@needs_smollm2
def test_kedit_facts_takes_answers_from_the_model_and_splits_by_subject(facts):
    train, held_out = (read_text_records(facts / "data" / FILES[split]) for split in ("train", "eval"))
    assert train and held_out and len(train) + len(held_out) <= N_FACTS
    france = next(record for record in train + held_out if record.src == "The capital of France is")
    assert (france.pred, france.alt) == ("Paris", "Madrid")
    assert france.neighbors[0].prompt == "The capital of Germany is" and france.neighbors[0].answer == "Berlin"
    table = read_fact_table(FACT_TABLE)
    subject = {table["relations"][f["relation"]]["prompt"].format(f["subject"]): f["subject"] for f in table["facts"]}
    assert not {subject[record.src] for record in train} & {subject[record.src] for record in held_out}
    # The unrelated locality prompts are split too: no eval locality prompt is seen in training.
    assert {record.loc for record in train} <= set(table["unrelated"])
    assert not {record.loc for record in train} & {record.loc for record in held_out}


@needs_smollm2
def test_mend_fits_on_real_facts_and_the_edit_is_generated_then_restored(facts):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(facts)
        train_main(
            [
                "fit",
                "--config",
                str(REPO / "configs/mend/smollm2-135m-facts.yaml"),
                f"--data.init_args.data_dir={facts / 'data'}",
                "--data.init_args.batch_size=4",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=2",
                "--trainer.num_sanity_val_steps=0",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={facts / 'runs'}",
            ]
        )
    artifact = facts / "runs/mend-smollm2-135m-facts/version_0/editor"  # ExportEditor: into the run's folder
    report = json.loads((artifact / "editor.json").read_text())["metrics"]
    assert {"reliability", "t_generality", "t_locality"} <= set(report)
    assert not {"i_generality", "i_locality"} & set(report)
    editor = Editor.from_pretrained(artifact)
    backbone = editor.load_backbone("smollm2.gguf")
    before = {name: p.detach().clone() for name, p in backbone.editable_parameters().items()}
    record = read_text_records(facts / "data" / FILES["eval"])[0]
    answer = greedy_answers(backbone, [record.src])
    shares = generation_success(editor, backbone, [record])
    assert set(shares) == {"src", "rephrase"} and all(share in (0.0, 1.0) for share in shares.values())
    assert all(torch.equal(p, before[name]) for name, p in backbone.editable_parameters().items())
    assert greedy_answers(backbone, [record.src]) == answer  # restored: the model's own answer again
