"""Datasets, collators and DataModules: prompts, label masking per sub-batch, lazy images, loaders."""

import ast
import copy
import pickle
import traceback
from pathlib import Path

import jsonargparse
import pytest
import torch
from test_records import MULTIHOP_PORT, ONEHOP_EDIT_PORT, make_record, write_split
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BlipImageProcessorPil, PreTrainedTokenizerFast

import data_modules
from data_modules.datamodules import CaptionDataModule, FactsDataModule, VQADataModule
from data_modules.datasets import EditCollator, EditDataset, FactCollator, FactDataset
from data_modules.encoding import IGNORE_INDEX, PromptFormat, SubBatchEncoder
from data_modules.records import DataError, EditRecord, read_records

TEXTS = [
    "Question: Short answer:",
    "what colour is it ? which colour is shown ? who wrote hamlet ? shakespeare what shape is it ? square",
    "red blue green yellow where does it live ? sea what colour is the sea ? desert",
    "a photo of a picture of a red square",
]
IMAGE_PREFIX = ["<s>", "<image>", "<image>"]


@pytest.fixture(scope="module")
def encoder():
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + sorted({w for text in TEXTS for w in text.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    images = BlipImageProcessorPil(size={"height": 32, "width": 32})
    return SubBatchEncoder(fast, images, PromptFormat(with_image="{image} {prompt}", num_image_tokens=2))


def split_tokens(encoder, sub_batch):
    """Per row: (prompt tokens, supervised tokens), padding dropped."""
    rows = []
    for ids, labels, mask in zip(sub_batch["input_ids"], sub_batch["labels"], sub_batch["attention_mask"]):
        tokens = encoder.tokenizer.convert_ids_to_tokens(ids[mask == 1].tolist())
        supervised = labels[mask == 1] != IGNORE_INDEX
        rows.append(([t for t, s in zip(tokens, supervised) if not s], [t for t, s in zip(tokens, supervised) if s]))
    assert (sub_batch["labels"][sub_batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    return rows


@pytest.fixture()
def vqa_dir(tmp_path):
    train = [make_record(i) for i in range(6)]
    train[0]["port_new"] = MULTIHOP_PORT
    train[2]["port_new"] = ONEHOP_EDIT_PORT
    write_split(tmp_path, "vqa_train.json", train)
    write_split(tmp_path, "vqa_eval.json", [make_record(i, image=f"img/e{i}.png") for i in range(3)])
    return tmp_path


def test_edit_batch_supervises_only_the_answers_of_each_sub_batch(vqa_dir, encoder):
    records = [
        EditRecord.from_dict(make_record(i, port_new=port))
        for i, port in enumerate([MULTIHOP_PORT, None, ONEHOP_EDIT_PORT])
    ]
    dataset = EditDataset(records, vqa_dir / "images", "vqa")
    batch = EditCollator(encoder)([dataset[i] for i in range(3)])
    question = ["Question:", "what", "colour", "is", "it", "?", "Short", "answer:"]
    alts = [[r.alt] for r in records]
    assert split_tokens(encoder, batch["edit_inner"]) == [(IMAGE_PREFIX + question, alt) for alt in alts]
    rephrased = ["Question:", "which", "colour", "is", "shown", "?", "Short", "answer:"]
    assert split_tokens(encoder, batch["edit_outer"]) == [(IMAGE_PREFIX + rephrased, alt) for alt in alts]
    assert split_tokens(encoder, batch["edit_outer_image"]) == [(IMAGE_PREFIX + question, alt) for alt in alts]
    assert split_tokens(encoder, batch["loc"]) == [(["<s>", "who", "wrote", "hamlet", "?"], ["shakespeare"])] * 3
    shape = ["Question:", "what", "shape", "is", "it", "?", "Short", "answer:"]
    assert split_tokens(encoder, batch["loc_image"]) == [(IMAGE_PREFIX + shape, ["square"])] * 3
    assert split_tokens(encoder, batch["port"]) == [
        (IMAGE_PREFIX + ["Question:", "where", "does", "it", "live", "?", "Short", "answer:"], ["sea"]),
        (IMAGE_PREFIX + ["Question:", "what", "colour", "is", "the", "sea", "?", "Short", "answer:"], ["blue"]),
        (IMAGE_PREFIX + ["Question:", "where", "does", "it", "live", "?", "Short", "answer:"], ["desert"]),
    ]
    assert batch["port_hops"] == ["1-hop", "2-hop", "1-hop"]
    assert batch["port_record"].tolist() == [0, 0, 2]
    # Images: the edit image for inner/outer/port, the other view for outer_image, none for loc.
    inner = batch["edit_inner"]["pixel_values"]
    assert inner.shape == (3, 3, 32, 32)
    assert torch.equal(batch["edit_outer"]["pixel_values"], inner)
    assert not torch.equal(batch["edit_outer_image"]["pixel_values"], inner)
    assert not torch.equal(batch["loc_image"]["pixel_values"], inner)
    assert torch.equal(batch["port"]["pixel_values"], inner[[0, 0, 2]])
    assert batch["loc"]["pixel_values"] is None
    assert batch["meta"][1] == {
        "prompt": "Question: what colour is it ? Short answer:",
        "rephrase": "Question: which colour is shown ? Short answer:",
        "pred": records[1].pred,
        "alt": records[1].alt,
        "image": "img/1.png",
        "image_rephrase": "img/1_view.png",
        "subject": None,
        "loc": records[1].loc,
        "loc_image": ["Question: what shape is it ? Short answer:", records[1].m_loc],
        "origin": "<dict>:0",
        "file": "<dict>",
        "index": 0,
    }


def test_batch_without_port_questions_has_no_port_keys(vqa_dir, encoder):
    dataset = EditDataset([EditRecord.from_dict(make_record(1))], vqa_dir / "images", "vqa")
    assert not {"port", "port_hops", "port_record"} & set(EditCollator(encoder)([dataset[0]]))


def test_caption_prompts_are_used_as_they_are_and_the_template_is_configurable(vqa_dir, encoder):
    record = EditRecord.from_dict(make_record(0, src="a photo of", rephrase="a picture of", alt="a red square"))
    batch = EditCollator(encoder)(
        [EditDataset([record], vqa_dir / "images", "caption", vqa_template="Question: {} answer:")[0]]
    )
    assert split_tokens(encoder, batch["edit_inner"]) == [(IMAGE_PREFIX + ["a", "photo", "of"], ["a", "red", "square"])]
    assert split_tokens(encoder, batch["edit_outer"]) == [
        (IMAGE_PREFIX + ["a", "picture", "of"], ["a", "red", "square"])
    ]
    # The multimodal locality question is still a question.
    assert split_tokens(encoder, batch["loc_image"])[0][0] == IMAGE_PREFIX + [
        "Question:",
        "what",
        "shape",
        "is",
        "it",
        "?",
        "answer:",
    ]
    with pytest.raises(ValueError, match="kind must be one of"):
        EditDataset([record], vqa_dir, "vqa-captions")


def test_facts_are_the_pre_edit_truths_and_never_portability(vqa_dir, encoder):
    records = [
        EditRecord.from_dict(make_record(0, port_new=MULTIHOP_PORT)),
        EditRecord.from_dict(make_record(1, pred="")),
    ]
    dataset = FactDataset(records, vqa_dir / "images", "vqa")
    assert len(dataset) == 5 + 2  # the second record has no pre-edit answer: only its locality facts
    batch = FactCollator(encoder)([dataset[i] for i in range(5)])
    pred = records[0].pred
    question = ["Question:", "what", "colour", "is", "it", "?", "Short", "answer:"]
    assert split_tokens(encoder, batch["with_image"]) == [
        (IMAGE_PREFIX + question, [pred]),
        (IMAGE_PREFIX + ["Question:", "which", "colour", "is", "shown", "?", "Short", "answer:"], [pred]),
        (IMAGE_PREFIX + question, [pred]),
        (IMAGE_PREFIX + ["Question:", "what", "shape", "is", "it", "?", "Short", "answer:"], ["square"]),
    ]
    assert split_tokens(encoder, batch["text_only"]) == [(["<s>", "who", "wrote", "hamlet", "?"], ["shakespeare"])]
    assert batch["with_image"]["pixel_values"].shape == (4, 3, 32, 32) and batch["text_only"]["pixel_values"] is None
    assert set(FactCollator(encoder)([dataset[5]])) == {"text_only"}


def test_a_broken_image_at_load_time_names_file_record_and_field(vqa_dir):
    records = VQADataModule(str(vqa_dir)).read_split("train")
    (vqa_dir / "images/img/3_view.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"vqa_train.json: record 3: field 'image_rephrase': cannot load image"):
        EditDataset(records, vqa_dir / "images", "vqa")[3]


def origins(batches):
    return [m["origin"].rsplit(":", 1)[1] for batch in batches for m in batch["meta"]]


def test_datamodule_iterates_shuffles_with_its_seed_and_keeps_val_order(vqa_dir, encoder):
    def loaded(seed):
        dm = VQADataModule(str(vqa_dir), batch_size=4, seed=seed, processor=encoder)
        dm.setup("fit")
        return dm

    dm = loaded(seed=1)
    train = list(dm.train_dataloader())
    assert [len(b["meta"]) for b in train] == [4, 2]
    assert sorted(origins(train)) == [str(i) for i in range(6)]
    assert origins(train) == origins(loaded(seed=1).train_dataloader())
    assert origins(train) != origins(loaded(seed=2).train_dataloader())
    assert origins(dm.val_dataloader()) == ["0", "1", "2"]
    # Train has port questions in some records; the loader carries them.
    assert any("port" in b for b in train)


def test_workers_decode_images_lazily_and_match_the_main_process(vqa_dir, encoder):
    dm = VQADataModule(str(vqa_dir), batch_size=2, num_workers=2, seed=3, processor=encoder)
    dm.setup("fit")
    in_main = VQADataModule(str(vqa_dir), batch_size=2, num_workers=0, seed=3, processor=encoder)
    in_main.setup("fit")
    # What travels to a worker is the records, not pixels (18 decoded 48x48 images would be ~124 kB).
    assert len(pickle.dumps(dm.train_dataloader().dataset)) < 8_000
    for worker_loader, main_loader in [
        (dm.train_dataloader(), in_main.train_dataloader()),
        (dm.val_dataloader(), in_main.val_dataloader()),
    ]:
        for from_workers, from_main in zip(worker_loader, main_loader, strict=True):
            assert from_workers["meta"] == from_main["meta"]
            assert torch.equal(
                from_workers["edit_outer_image"]["pixel_values"], from_main["edit_outer_image"]["pixel_values"]
            )
            assert torch.equal(from_workers["loc_image"]["labels"], from_main["loc_image"]["labels"])


def test_an_image_broken_after_setup_fails_in_a_worker_naming_file_record_and_field(vqa_dir, encoder):
    (vqa_dir / "images/img/1_view.png").write_bytes(b"garbage")
    broken = VQADataModule(str(vqa_dir), batch_size=2, num_workers=2, processor=encoder)
    broken.setup("validate")
    with pytest.raises(
        DataError, match=r"vqa_eval.json: record 1: field 'image_rephrase': cannot load image"
    ) as caught:
        list(broken.val_dataloader())
    # PyTorch's re-raise leaves the loader iterator in a reference cycle (exception <-> frame) whose
    # garbage-collected shutdown waits 5 s per worker; clearing the frames frees it at once.
    traceback.clear_frames(caught.tb)


def test_setup_reports_bad_data_before_any_epoch(vqa_dir, encoder):
    (vqa_dir / "images/img/other4.png").unlink()
    dm = VQADataModule(str(vqa_dir), processor=encoder)
    with pytest.raises(DataError, match=r"vqa_train.json: record 4: field 'm_loc': missing image"):
        dm.setup("fit")
    (vqa_dir / "vqa_eval.json").write_text("[\n{]")
    with pytest.raises(DataError, match=r"vqa_eval.json: invalid JSON at line 2, column 2"):
        VQADataModule(str(vqa_dir)).setup("validate")
    with pytest.raises(ValueError, match="no test_file configured"):
        VQADataModule(str(vqa_dir)).setup("test")


def test_loaders_refuse_to_start_without_a_processor(vqa_dir):
    dm = VQADataModule(str(vqa_dir))
    dm.setup("fit")
    with pytest.raises(RuntimeError, match=r"VQADataModule.processor is not set"):
        dm.train_dataloader()


def test_facts_datamodule_trains_on_train_and_val_facts(vqa_dir, encoder):
    dm = FactsDataModule(str(vqa_dir), batch_size=5, processor=encoder)
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 5 * (6 + 3)
    assert len(dm.val_dataloader().dataset) == 5 * 3
    first = next(iter(dm.val_dataloader()))
    assert set(first) == {"with_image", "text_only"}
    assert first["with_image"]["input_ids"].shape[0] == 4 and first["text_only"]["input_ids"].shape[0] == 1


def test_datamodules_configure_from_yaml(tmp_path):
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(CaptionDataModule, "data")
    config = parser.parse_string(
        f"data:\n  data_dir: {tmp_path}\n  image_root: /abs/images\n  batch_size: 3\n  num_workers: 2\n"
    )
    dm = parser.instantiate(config).data
    assert isinstance(dm, CaptionDataModule) and dm.kind == "caption" and dm.processor is None
    assert dm.files == {"train": "caption_train_edit.json", "val": "caption_eval_edit.json", "test": None}
    assert (dm.batch_size, dm.num_workers) == (3, 2)
    assert str(dm.image_root) == "/abs/images"  # absolute image roots are not joined to data_dir
    assert VQADataModule(str(tmp_path)).image_root == tmp_path / "images"


def test_data_modules_import_nothing_from_kedit_lightning():
    """The data layer stands alone: kedit_lightning imports it, never the other way round."""
    offenders = []
    for path in sorted(Path(data_modules.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "kedit_lightning"]
    assert offenders == []


LONG_QUESTION = " ".join(["what colour is it ?"] * 5)


@pytest.fixture()
def long_dir(tmp_path):
    write_split(tmp_path, "vqa_train.json", [make_record(0), make_record(1, src=LONG_QUESTION)])
    write_split(tmp_path, "vqa_eval.json", [make_record(2)])
    return tmp_path


def bounded(encoder, max_length):
    """The module's encoder with a backbone of `max_length` positions."""
    short = copy.copy(encoder)
    short.max_length = max_length
    return short


def test_a_row_longer_than_the_backbone_names_file_record_and_field(long_dir, encoder):
    dm = VQADataModule(str(long_dir), processor=bounded(encoder, 12), batch_size=2)
    dm.setup("fit")
    with pytest.raises(DataError) as err:
        next(iter(dm.train_dataloader()))
    assert str(err.value) == (
        f"{long_dir / 'vqa_train.json'}: record 1: field 'src': prompt + answer is 32 tokens, more than the "
        "backbone's 12 positions (shorten it, or set truncate_prompts to cut the prompt from the left)"
    )
    # The collators, which meet rows the up-front check does not build (facts), name them the same way.
    records = read_records(long_dir / "vqa_train.json")
    for collate, dataset in [
        (EditCollator, EditDataset(records, long_dir / "images", "vqa")),
        (FactCollator, FactDataset(records, long_dir / "images", "vqa")),
    ]:
        with pytest.raises(DataError, match=r"vqa_train.json: record 1: field 'src': prompt \+ answer is 32 tokens"):
            collate(bounded(encoder, 12))([dataset[i] for i in range(len(dataset))])


def test_truncate_prompts_keeps_the_answer_and_cuts_the_prompt_from_the_left(long_dir, encoder):
    dm = VQADataModule(str(long_dir), processor=bounded(encoder, 12), batch_size=2, truncate_prompts=True)
    dm.setup("fit")
    batch = next(iter(dm.loader("train", shuffle=False)))
    rows = split_tokens(encoder, batch["edit_inner"])
    question = ["Question:", *LONG_QUESTION.split(), "Short", "answer:"]
    assert rows[1] == (IMAGE_PREFIX + question[-8:], ["green"])
    assert rows[0] == (IMAGE_PREFIX + ["Question:", "what", "colour", "is", "it", "?", "Short", "answer:"], ["blue"])
    assert batch["edit_inner"]["input_ids"].shape[1] == 12
    assert not dm.processor.truncate_prompts  # the backbone's own encoder still refuses long rows


def test_datamodules_refuse_empty_files_outside_paths_and_huge_images(tmp_path, encoder):
    write_split(tmp_path, "vqa_train.json", [])
    write_split(tmp_path, "vqa_eval.json", [make_record(0, image="../nuscenes/cam.png")])
    with pytest.raises(DataError) as err:
        VQADataModule(str(tmp_path)).setup("fit")
    assert str(err.value) == f"{tmp_path / 'vqa_train.json'}: no records (the file is an empty list)"
    with pytest.raises(
        DataError, match=r"vqa_eval.json: record 0: field 'image': image path .* outside the image root"
    ):
        VQADataModule(str(tmp_path)).setup("validate")
    dm = VQADataModule(str(tmp_path), extra_image_roots=["nuscenes"], max_image_pixels=100, processor=encoder)
    dm.setup("validate")
    with pytest.raises(DataError) as err:
        next(iter(dm.val_dataloader()))
    assert str(err.value) == (
        f"{tmp_path / 'vqa_eval.json'}: record 0: field 'image': image {tmp_path / 'images/../nuscenes/cam.png'} "
        "is 48x48 = 2304 pixels, more than the limit of 100"
    )


def test_a_world_written_by_kedit_synth_gets_its_tokenizer_when_a_fit_prepares_data(tmp_path):
    from data_modules.synthetic import write_synthetic_world

    write_synthetic_world(tmp_path, entities=4)  # what `kedit synth --out DIR` writes: no tokenizer
    assert not (tmp_path / "tokenizer").exists()
    VQADataModule(str(tmp_path), synthesize=True).prepare_data()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tokenizer")
    record = read_records(tmp_path / "vqa" / "vqa_train.json")[0]
    assert tokenizer.unk_token_id not in tokenizer(f"{record.src} {record.alt}")["input_ids"]
