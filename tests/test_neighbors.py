"""Near-neighbour locality: the text records' `neighbors` field (kedit synth writes it, kedit validate checks
it, CounterFact's neighbourhood prompts map to it), its `neighbor` sub-batch and the `n_locality` score."""

import dataclasses
import json

import pytest
import torch
from conftest import CONFIGS, TINY_BERT, quiet_trainer
from oracle import dense_edit, run_with
from test_backbones import make_tokenizer, tiny_backbone
from test_edited_model import trained_like

import kedit_lightning.editor as editor_api
from data_modules.datamodules import TextEditDataModule
from data_modules.datasets import TextEditCollator, text_edit_example
from data_modules.encoding import IGNORE_INDEX
from data_modules.synthetic import FACT_QUESTIONS, TEXT_NEIGHBORS
from data_modules.text_records import Neighbor, TextRecord, read_text_records
from kedit_lightning.backbones import load_backbone_spec
from kedit_lightning.cli import main
from kedit_lightning.commands.facts_cmd import FACT_TABLE, build_records, read_fact_table
from kedit_lightning.editor import evaluate_sequential
from kedit_lightning.editors.ft import FineTune
from kedit_lightning.editors.grace import GRACE
from kedit_lightning.editors.mend import MEND
from kedit_lightning.evaluation import EditMetrics, evaluate_batch
from kedit_lightning.generation import GenerationMetrics
from kedit_lightning.modules.mend import outer_losses
from kedit_lightning.modules.serac import ScopeEncoderSpec, SERACModule

ZSRE = {
    "src": "Which country is Velor in?",
    "rephrase": "In which country is the city of Velor?",
    "alt": "Kestra",
    "loc": "Which ocean borders Arvenia?",
    "loc_ans": "Thalmar",
}


def test_synth_writes_near_neighbours_that_validate_and_hold_the_worlds_answers(world, capsys):
    geography = json.loads((world / "world.json").read_text())["geography"]
    relation_of, answer_of = {}, {}
    for relation, key in (("country", "cities"), ("continent", "countries"), ("ocean", "continents")):
        for subject, answer in geography[key].items():
            for template in FACT_QUESTIONS[relation]:
                relation_of[template.format(subject)] = relation
                answer_of[template.format(subject)] = answer
    for name in ("text_train", "text_eval"):
        path = world / "text" / f"{name}.json"
        assert main(["validate", "--data", str(path)]) == 0
        for record in read_text_records(path):
            assert len(record.neighbors) == TEXT_NEIGHBORS
            for neighbor in record.neighbors:
                assert relation_of[neighbor.prompt] == relation_of[record.src]  # the edit's relation
                assert neighbor.answer == answer_of[neighbor.prompt] and neighbor.prompt != record.src
    capsys.readouterr()


def test_malformed_neighbours_are_named_by_record_and_field(tmp_path, capsys):
    records = [
        {**ZSRE, "neighbors": {"prompt": "Which country is Marun in?", "answer": "Zandia"}},
        {**ZSRE, "neighbors": ["Which country is Marun in?"]},
        {**ZSRE, "neighbors": [{"prompt": "Which country is Marun in?"}]},
        {
            **ZSRE,
            "neighbors": [{"prompt": "Which country is Marun in?", "answer": "Zandia"}, {"prompt": " ", "answer": "x"}],
        },
        {**ZSRE, "neighbors": [{"prompt": "Which country is Marun in?", "answer": ""}]},
        {**ZSRE, "neighbors": [{"prompt": "Which country is Marun in?", "answer": "Zandia"}]},
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    assert main(["validate", "--data", str(path)]) == 1
    f = str(path)
    assert capsys.readouterr().out.strip().splitlines() == [
        f"{f}: record 0: field 'neighbors': expected a list, got dict",
        f"{f}: record 1: field 'neighbors[0]': expected an object, got str",
        f"{f}: record 2: field 'neighbors[0].answer': missing field",
        f"{f}: record 3: field 'neighbors[1].prompt': empty or whitespace-only prompt",
        f"{f}: record 4: field 'neighbors[0].answer': empty target",
        f"{f}: 6 text-only record(s): 5 problem(s)",
    ]


def test_counterfacts_neighbourhood_prompts_are_the_neighbours_answered_with_the_true_object(tmp_path):
    rome = {
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
        },
        "paraphrase_prompts": ["Danielle Darrieux, a native speaker of"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Montesquieu spoke the language"],
    }
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rome]))
    (record,) = read_text_records(path)
    assert record.neighbors == (
        Neighbor("The mother tongue of Léon Blum is", "French"),
        Neighbor("Montesquieu spoke the language", "French"),
    )


def test_n_locality_drops_when_an_edit_damages_a_neighbour():
    tokenizer = make_tokenizer()
    torch.manual_seed(5)
    backbone = tiny_backbone("text", tokenizer).eval()
    with_neighbors = [
        (Neighbor("Where is Zandia?", "Velor"), Neighbor("The capital of Zandia is", "Marun")),
        (Neighbor("Where is Velor?", "Marun blue"),),
    ]
    prompts = [("Where is this object located?", "Velor"), ("What colour is the object?", "green yellow")]
    examples = []
    for position, ((src, alt), neighbors) in enumerate(zip(prompts, with_neighbors)):
        record = read_record(src, alt, neighbors)
        examples.append(text_edit_example(record, position))
    batch = TextEditCollator(backbone.processor)(examples)
    assert batch["neighbor_record"].tolist() == [0, 0, 1]
    scores = {}
    for lr in (0.0, 50.0):
        metrics = EditMetrics()
        evaluate_batch(FineTune(lr=lr), backbone, batch, metrics)
        scores[lr] = metrics.compute()["n_locality"]
    assert scores[0.0] == 1.0  # no change: every neighbour keeps its answer
    # By hand: each neighbour row under its own record's dense fine-tuned weights, full forwards.
    expected = []
    for row, record in enumerate(batch["neighbor_record"].tolist()):
        edit = {k: v[record : record + 1] if isinstance(v, torch.Tensor) else v for k, v in batch["edit_inner"].items()}
        neighbor = {k: v[row : row + 1] if isinstance(v, torch.Tensor) else v for k, v in batch["neighbor"].items()}
        with torch.no_grad():
            post = run_with(backbone, neighbor, dense_edit(FineTune(lr=50.0), backbone, edit)).argmax(-1)
            pre = run_with(backbone, neighbor, None).argmax(-1)
        answer = neighbor["labels"] != IGNORE_INDEX
        expected.append(float((post == pre)[answer].float().mean()))
    assert scores[50.0] == pytest.approx(sum(expected) / len(expected))
    assert scores[50.0] < 1.0  # the edit damaged a neighbour


def read_record(src: str, alt: str, neighbors) -> TextRecord:
    return TextRecord(src, src, alt, "Where is Velor?", "Marun", neighbors=tuple(neighbors))


def test_generation_scores_neighbours_as_gen_n_locality(tmp_path):
    tokenizer = make_tokenizer()
    torch.manual_seed(6)
    backbone = tiny_backbone("text", tokenizer).eval()
    records = [read_record("Where is this object located?", "Velor", [Neighbor("Where is Zandia?", "Velor")])]
    batch = TextEditCollator(backbone.processor)([text_edit_example(records[0])])
    generation = GenerationMetrics()
    evaluate_batch(FineTune(lr=0.0), backbone, batch, EditMetrics(), generation)
    report = generation.compute()
    assert report["gen_n_locality"] == 1.0 and report["gen_t_locality"] == 1.0  # nothing changed
    assert set(report) == {"gen_reliability", "gen_t_generality", "gen_t_locality", "gen_n_locality"}


def test_mend_neighbour_locality_adds_the_neighbours_kl_to_the_outer_locality_loss():
    """Neighbours that repeat each record's `loc` row: the locality loss must double exactly, and only with the flag."""
    tokenizer = make_tokenizer()
    torch.manual_seed(7)
    backbone = tiny_backbone("text", tokenizer).eval()
    records = [
        read_record("Where is this object located?", "Velor", []),
        TextRecord("What colour is the object?", "Colour of object?", "red", "Where is Zandia?", "Marun"),
    ]
    batch = TextEditCollator(backbone.processor)([text_edit_example(r, i) for i, r in enumerate(records)])
    batch["neighbor"], batch["neighbor_record"] = batch["loc"], torch.arange(2)
    editor = trained_like(MEND.for_backbone(backbone, rank=8, edit_lr=1.0)).eval()
    plain = outer_losses(editor, backbone, batch)["loc"].detach()
    with_neighbors = outer_losses(editor, backbone, batch, neighbors=True)["loc"].detach()
    assert float(plain) > 0 and float(with_neighbors) == pytest.approx(2 * float(plain), rel=1e-5)


def test_serac_trains_with_neighbours_as_classifier_negatives(world):
    tokenizer_dir = str(world / "tokenizer")
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "text-tiny.yaml"), processor=tokenizer_dir)
    torch.manual_seed(0)
    scope = ScopeEncoderSpec(config=TINY_BERT, tokenizer=tokenizer_dir)
    module = SERACModule(spec, spec, scope, neighbor_locality=True)
    data = TextEditDataModule(str(world), batch_size=4)
    trainer = quiet_trainer(
        max_steps=1,
        limit_train_batches=1,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    batch = next(iter(data.train_dataloader()))
    inputs = module.read_step(batch)
    assert inputs["neighbor"].query.text.ids.shape[0] == batch["neighbor_record"].shape[0] > 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def prompt_of(table, fact, subject_key):
    return table["relations"][fact["relation"]]["prompt"].format(fact[subject_key])


def test_kedit_facts_gives_each_fact_its_neighbour_with_the_models_answer():
    tokenizer = make_tokenizer()
    torch.manual_seed(8)
    backbone = tiny_backbone("text", tokenizer).eval()
    table = read_fact_table(FACT_TABLE)
    splits = build_records(table, backbone, eval_fraction=0.5, seed=0, limit=6)
    records = splits["train"] + splits["eval"]
    assert records
    for record in records:
        (fact,) = [fact for fact in table["facts"][:6] if record["src"] == prompt_of(table, fact, "subject")]
        (neighbor,) = record["neighbors"]
        assert neighbor["prompt"] == prompt_of(table, fact, "neighbour")
        assert record["loc"] in table["unrelated"]  # locality prompts are about nothing edited


def test_a_sequence_leaves_out_the_neighbours_it_edited_itself(monkeypatch):
    """Record 0's first neighbour is record 1's edit prompt: after both edits its answer is meant to change, so
    N-Locality is what it is on records that never listed it (and counting it would lower the score). GRACE:
    its edits reach only inputs near the edited prompt, so the other neighbours keep their answers."""
    tokenizer = make_tokenizer()
    torch.manual_seed(5)
    backbone = tiny_backbone("text", tokenizer).eval()
    second = ("What colour is the object?", "green yellow")
    kept = Neighbor("Where is Zandia?", "Velor")

    def batches(first_neighbors):
        records = [
            read_record("Where is this object located?", "Velor", first_neighbors),
            read_record(*second, (Neighbor("Where is Velor?", "Marun blue"),)),
        ]
        collate = TextEditCollator(backbone.processor)
        return [collate([text_edit_example(record, position)]) for position, record in enumerate(records)]

    def sequence(first_neighbors):
        return evaluate_sequential(GRACE(n_iter=30), backbone, batches(first_neighbors), 2, progress=False)

    edited_neighbor = Neighbor(second[0], "Marun")
    report = sequence((edited_neighbor, kept))
    assert report["sequential"]["locality_edited"] == {"t_locality": 0, "i_locality": 0, "n_locality": 1}
    assert report["n_locality"] == sequence((kept,))["n_locality"] == 1.0
    assert report["sequential"]["all_edits"]["n_locality"] == report["n_locality"]
    monkeypatch.setattr(editor_api.EditedFacts, "asks", lambda self, prompt, picture=None: False)
    assert sequence((edited_neighbor, kept))["n_locality"] < report["n_locality"]
