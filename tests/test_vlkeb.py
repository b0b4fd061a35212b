"""VLKEBDataModule: per-hop `port` sub-batches, hop choice, records without portability questions
(kept or left out as VLKEB's runs do), the one-hop-edit variant, and the same batches from shards."""

import json

import jsonargparse
import pytest
from test_records import MULTIHOP_PORT, ONEHOP_EDIT_PORT, make_record, write_split
from test_shards import assert_same_batches, word_encoder

from data_modules.encoding import IGNORE_INDEX
from data_modules.records import DataError
from data_modules.shards import write_shards
from data_modules.synthetic import write_synthetic_world
from data_modules.vlkeb import VLKEBDataModule
from kedit_lightning.evaluation import record_batches

SYNTHETIC = {"train_file": "vlkeb/train.json", "val_file": "vlkeb/eval_multihop.json"}


def supervised(encoder, sub_batch):
    """Per row, the supervised (answer) tokens."""
    return [
        encoder.tokenizer.convert_ids_to_tokens(ids[labels != IGNORE_INDEX].tolist())
        for ids, labels in zip(sub_batch["input_ids"], sub_batch["labels"])
    ]


def prompts(encoder, sub_batch):
    """Per row, the prompt tokens (neither answer, image placeholder nor padding)."""
    rows = []
    for ids, labels, mask in zip(sub_batch["input_ids"], sub_batch["labels"], sub_batch["attention_mask"]):
        keep = (labels == IGNORE_INDEX) & (mask == 1)
        rows.append(
            [t for t in encoder.tokenizer.convert_ids_to_tokens(ids[keep].tolist()) if t not in ("<s>", "<image>")]
        )
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_synthetic_world(root, entities=8)
    records = [r for name in ("train", "eval_multihop") for r in json.loads((root / f"vlkeb/{name}.json").read_text())]
    return root, word_encoder(records)


def test_synthetic_vlkeb_batches_carry_every_hop_with_its_answer(world):
    root, encoder = world
    dm = VLKEBDataModule(str(root), **SYNTHETIC, batch_size=4, processor=encoder)
    dm.setup("fit")
    raw = json.loads((root / "vlkeb/eval_multihop.json").read_text())
    batches = list(dm.val_dataloader())
    assert sum(len(b["meta"]) for b in batches) == len(raw) == 12
    for batch in batches:
        rows = len(batch["meta"])
        assert batch["port_hops"] == ["1-hop", "2-hop", "3-hop", "4-hop"] * rows
        assert batch["port_record"].tolist() == [r for r in range(rows) for _ in range(4)]
        answers = [item["Q&A"]["Answer"].split() for m in batch["meta"] for item in raw[m["index"]]["port_new"]]
        assert supervised(encoder, batch["port"]) == answers
        assert batch["port"]["pixel_values"].shape[0] == 4 * rows
    assert not any("port" in b for b in dm.train_dataloader())  # train.json has no portability questions


@pytest.fixture()
def mixed(tmp_path):
    """Eval records: 0, 3: 1- and 2-hop; 1: none; 2: 2-hop only; 4: one-hop edit. Train: none."""
    port = {0: MULTIHOP_PORT, 2: MULTIHOP_PORT[1:], 3: MULTIHOP_PORT, 4: ONEHOP_EDIT_PORT}
    write_split(
        tmp_path,
        "eval_multihop.json",
        [make_record(i, **({"port_new": port[i]} if i in port else {})) for i in range(5)],
    )
    write_split(tmp_path, "train.json", [make_record(i, image=f"train/{i}.png") for i in range(3)])
    return tmp_path


def loaded(root, encoder, **options):
    dm = VLKEBDataModule(str(root), batch_size=8, processor=encoder, **options)
    dm.setup("fit")
    return dm


def test_records_without_the_chosen_hops_are_kept_or_left_out_as_vlkeb_does(mixed):
    encoder = word_encoder([make_record(0, port_new=MULTIHOP_PORT + ONEHOP_EDIT_PORT)])
    everything = next(iter(loaded(mixed, encoder).val_dataloader()))
    assert [m["index"] for m in everything["meta"]] == [0, 1, 2, 3, 4]
    assert everything["port_hops"] == ["1-hop", "2-hop", "2-hop", "1-hop", "2-hop", "1-hop"]
    assert everything["port_record"].tolist() == [0, 0, 2, 3, 3, 4]
    second = next(iter(loaded(mixed, encoder, hops=[2]).val_dataloader()))
    assert [m["index"] for m in second["meta"]] == [0, 1, 2, 3, 4]  # edited and scored on the other metrics
    assert second["port_hops"] == ["2-hop"] * 3 and second["port_record"].tolist() == [0, 2, 3]
    assert supervised(encoder, second["port"]) == [["blue"]] * 3
    only = loaded(mixed, encoder, hops=[2], require_port=True)
    batch = next(iter(only.val_dataloader()))
    assert [m["index"] for m in batch["meta"]] == [0, 2, 3] and batch["port_record"].tolist() == [0, 1, 2]
    assert len(only.split_records("train")) == 3  # train is never filtered
    assert [r.origin.index for r in loaded(mixed, encoder, require_port=True).split_records("val")] == [0, 2, 3, 4]
    with pytest.raises(
        DataError, match=r"eval_multihop.json: no record has a portability question at \('3-hop', '4-hop'\)"
    ):
        loaded(mixed, encoder, hops=[4, 3], require_port=True)
    with pytest.raises(ValueError, match=r"hops must be 'all' or a non-empty list of \[1, 2, 3, 4\], got \[0, 2\]"):
        VLKEBDataModule(str(mixed), hops=[0, 2])


def test_one_hop_edits_come_with_their_port_rows(mixed):
    encoder = word_encoder([make_record(0, port_new=MULTIHOP_PORT + ONEHOP_EDIT_PORT)])
    batch = next(iter(loaded(mixed, encoder).val_dataloader()))
    assert prompts(encoder, batch["port_edit"]) == [["Question:", "what", "does", "it", "eat", "?", "Short", "answer:"]]
    assert supervised(encoder, batch["port_edit"]) == [["sand"]]
    row = batch["port_edit_row"].tolist()
    assert row == [5] and batch["port_record"][row].tolist() == [4]  # the port row of record 4's question
    assert supervised(encoder, batch["port"])[5] == ["desert"]
    assert prompts(encoder, batch["port"])[5] == ["Question:", "where", "does", "it", "live", "?", "Short", "answer:"]
    no_edits = next(iter(loaded(mixed, encoder, hops=[2]).val_dataloader()))
    assert "port_edit" not in no_edits and "port_edit_row" not in no_edits


def test_a_one_hop_edit_is_applied_before_its_question_is_scored(mixed):
    encoder = word_encoder([make_record(0, port_new=MULTIHOP_PORT + ONEHOP_EDIT_PORT)])
    records = list(record_batches(next(iter(loaded(mixed, encoder).val_dataloader()))))
    assert ["port_edit" in r for r in records] == [False] * 4 + [True]
    assert records[4]["port_edit_row"].tolist() == [0] and supervised(encoder, records[4]["port_edit"]) == [["sand"]]


@pytest.mark.parametrize("options", [{}, {"hops": [2], "require_port": True}], ids=["all-hops", "2-hop-only"])
def test_shards_give_the_same_vlkeb_batches(mixed, options):
    encoder = word_encoder([make_record(0, port_new=MULTIHOP_PORT + ONEHOP_EDIT_PORT)])
    write_shards(mixed / "eval_multihop.json", mixed / "images", mixed / "shards", 2)
    from_json = VLKEBDataModule(str(mixed), batch_size=2, processor=encoder, **options)
    from_json.setup("validate")
    from_shards = VLKEBDataModule(str(mixed), batch_size=2, processor=encoder, val_shards="shards", **options)
    from_shards.setup("validate")
    assert_same_batches(list(from_shards.val_dataloader()), list(from_json.val_dataloader()))
    if options.get("require_port"):
        with pytest.raises(TypeError, match="number of batches is not known before reading"):
            len(from_shards.val_dataloader())
        write_shards(mixed / "train.json", mixed / "images", mixed / "train_shards", 2)
        train = VLKEBDataModule(str(mixed), batch_size=1, processor=encoder, train_shards="train_shards", **options)
        train.setup("fit")
        assert len(list(train.train_dataloader())) == len(train.train_dataloader()) == 3  # train is never filtered


def test_vlkeb_datamodule_configures_from_yaml(mixed):
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(VLKEBDataModule, "data")
    dm = parser.instantiate(
        parser.parse_string(f"data:\n  data_dir: {mixed}\n  hops: [3, 1]\n  require_port: true\n")
    ).data
    assert dm.hops == ("1-hop", "3-hop") and dm.require_port and dm.files["val"] == "eval_multihop.json"
    assert parser.instantiate(parser.parse_string(f"data:\n  data_dir: {mixed}\n  hops: all\n")).data.hops is None
