"""webdataset shards: `kedit shard`, the same batches as the JSON layout, rank/worker splitting,
flat host RAM while streaming, and clear errors for broken shards.

`word_encoder`, `assert_same_batches` and `dataset` are also used by test_vlkeb.py.
"""

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from test_records import MULTIHOP_PORT, ONEHOP_EDIT_PORT, make_record, write_split
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BlipImageProcessorPil, PreTrainedTokenizerFast

from data_modules.datamodules import FactsDataModule, VQADataModule
from data_modules.datasets import VQA_TEMPLATE
from data_modules.encoding import PromptFormat, SubBatchEncoder
from data_modules.records import IMAGE_FIELDS, DataError
from data_modules.shards import ShardStream, StreamLoader, UnevenShardsWarning, read_index, resolve_shards, write_shards
from data_modules.word_tokenizer import record_strings
from kedit_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]


def word_encoder(records) -> SubBatchEncoder:
    """A whitespace word-level encoder whose vocabulary covers `records` and the VQA template."""
    words = sorted({w for text in [VQA_TEMPLATE.format(""), *record_strings(list(records))] for w in text.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
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
    return SubBatchEncoder(
        fast,
        BlipImageProcessorPil(size={"height": 32, "width": 32}),
        PromptFormat(with_image="{image} {prompt}", num_image_tokens=2),
    )


def dataset(root: Path, count: int, name: str = "vqa_eval.json", image: str = "img/{i}.png") -> list[dict]:
    """`count` records (some with portability questions) written as `root/name` with their images."""
    records = [make_record(i, image=image.format(i=i)) for i in range(count)]
    for i in range(0, count, 3):
        records[i]["port_new"] = MULTIHOP_PORT
    for i in range(1, count, 5):
        records[i]["port_new"] = ONEHOP_EDIT_PORT
    write_split(root, name, records)
    return records


def assert_same_batches(left, right) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], dict):
                assert a[key].keys() == b[key].keys(), key
                for name, value in a[key].items():
                    assert (value is None and b[key][name] is None) or torch.equal(value, b[key][name]), (key, name)
            elif isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


@pytest.fixture(scope="module")
def ten(tmp_path_factory):
    """Ten VQA eval records and their shards (3 per shard: 3, 3, 3, 1)."""
    root = tmp_path_factory.mktemp("ten")
    records = dataset(root, 10)
    write_split(root, "vqa_train.json", [make_record(i, image=f"train/{i}.png") for i in range(8)])
    assert (
        main(
            [
                "shard",
                "--data",
                str(root / "vqa_eval.json"),
                "--images",
                str(root / "images"),
                "--out",
                str(root / "shards"),
                "--shard-size",
                "3",
            ]
        )
        == 0
    )
    return root, word_encoder(records)


def test_kedit_shard_writes_self_contained_reproducible_shards_and_an_index(ten, tmp_path, capsys):
    root, _ = ten
    index = json.loads((root / "shards/vqa_eval.shards.json").read_text())
    assert index["samples"] == 10 and index["source"] == str(root / "vqa_eval.json")
    assert [(s["url"], s["nsamples"]) for s in index["shardlist"]] == [
        (f"vqa_eval-{i:06d}.tar", n) for i, n in enumerate([3, 3, 3, 1])
    ]
    with tarfile.open(root / "shards/vqa_eval-000003.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert set(members) == {
        "000000009.json",
        "000000009.image.png",
        "000000009.image_rephrase.png",
        "000000009.m_loc.png",
    }
    assert (
        members["000000009.image_rephrase.png"] == (root / "images/img/9_view.png").read_bytes()
    )  # the file's bytes, not re-encoded
    assert json.loads(members["000000009.json"])["origin"] == {"file": str(root / "vqa_eval.json"), "index": 9}
    write_shards(root / "vqa_eval.json", root / "images", tmp_path / "again", 3)
    assert (tmp_path / "again/vqa_eval-000001.tar").read_bytes() == (root / "shards/vqa_eval-000001.tar").read_bytes()
    # Validation first, as `kedit validate`: nothing is written for bad data; existing shards are kept.
    (tmp_path / "bad.json").write_text(json.dumps([make_record(0), make_record(1, alt="", m_loc="img/none.png")]))
    assert (
        main(
            [
                "shard",
                "--data",
                str(tmp_path / "bad.json"),
                "--images",
                str(root / "images"),
                "--out",
                str(tmp_path / "bad"),
                "--shard-size",
                "2",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert (
        "bad.json: record 1: field 'alt': empty target" in err
        and "bad.json: record 1: field 'm_loc': missing image" in err
    )
    assert not (tmp_path / "bad").exists()
    assert (
        main(
            [
                "shard",
                "--data",
                str(root / "vqa_eval.json"),
                "--images",
                str(root / "images"),
                "--out",
                str(tmp_path / "again"),
                "--shard-size",
                "3",
            ]
        )
        == 1
    )
    assert "already holds shards named 'vqa_eval'" in capsys.readouterr().err


def test_shards_stream_the_same_edit_batches_as_the_json_layout(ten):
    root, encoder = ten

    def val_batches(**shards):
        dm = VQADataModule(str(root), batch_size=4, processor=encoder, **shards)
        dm.setup("validate")
        loader = dm.val_dataloader()
        batches = list(loader)
        assert len(loader) == len(batches)
        return batches

    from_json = val_batches()
    assert [len(b["meta"]) for b in from_json] == [4, 4, 2] and "port" in from_json[0]
    assert_same_batches(val_batches(val_shards="shards"), from_json)
    assert_same_batches(val_batches(val_shards="shards/vqa_eval.shards.json"), from_json)
    assert_same_batches(val_batches(val_shards=str(root / "shards/vqa_eval-{000000..000003}.tar")), from_json)


class IndexOf:
    """A cheap example builder for the counting tests: a record's index in its file."""

    skips_records = False

    def __call__(self, record, images):
        return [f"{record.origin.index}"]


@pytest.fixture(scope="module")
def twenty_four(tmp_path_factory):
    root = tmp_path_factory.mktemp("twenty_four")
    dataset(root, 24, name="data.json")
    write_shards(root / "data.json", root / "images", root / "by3", 3)
    write_shards(root / "data.json", root / "images", root / "by5", 5)
    return root


def read_all(shards, *, even, world_size=2, num_workers=2, batch=3, shuffle=False):
    """Per rank: (reported length, batches of record indices)."""
    out = []
    for rank in range(world_size):
        stream = ShardStream(
            shards,
            IndexOf(),
            batch,
            even=even,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            shuffle=shuffle,
        )
        loader = StreamLoader(stream, list)
        out.append((len(loader), list(loader)))
    return out


@pytest.mark.parametrize("even", [True, False], ids=["train", "val"])
def test_two_ranks_of_two_workers_see_every_record_exactly_once(twenty_four, even):
    # 8 shards of 3: each of the 4 readers gets 2 shards = 6 records = 2 full batches of 3.
    per_rank = read_all(resolve_shards(twenty_four / "by3"), even=even, shuffle=even)
    seen = Counter(i for _, batches in per_rank for batch in batches for i in batch)
    assert seen == Counter(str(i) for i in range(24))
    assert [length for length, _ in per_rank] == [len(batches) for _, batches in per_rank] == [4, 4]
    assert all(len(batch) == 3 for _, batches in per_rank for batch in batches)


def test_uneven_shards_give_equal_batch_counts_in_training_and_every_record_in_validation(twenty_four):
    shards = resolve_shards(twenty_four / "by5")  # 5, 5, 5, 5, 4: readers hold 9, 5 | 5, 5 records
    with pytest.warns(UnevenShardsWarning, match="12 record\\(s\\) per epoch do not fit the 2 full batch\\(es\\) of 3"):
        train = read_all(shards, even=True, shuffle=True)
    assert [length for length, _ in train] == [len(batches) for _, batches in train] == [2, 2]
    seen = Counter(i for _, batches in train for batch in batches for i in batch)
    assert len(seen) == 12 and set(seen.values()) == {1} and all(len(b) == 3 for _, bs in train for b in bs)
    val = read_all(shards, even=False)
    assert [length for length, _ in val] == [len(batches) for _, batches in val] == [5, 4]
    assert Counter(i for _, batches in val for batch in batches for i in batch) == Counter(str(i) for i in range(24))
    with pytest.raises(DataError, match="rank 0 cannot fill one batch of 10"):
        read_all(shards, even=True, batch=10)
    with pytest.raises(
        DataError, match="rank 5 gets no record \\(shards are never split\\); write at least 8 non-empty shards"
    ):
        read_all(shards, even=False, world_size=8)


def test_training_reshuffles_each_epoch_reproducibly(twenty_four):
    shards = resolve_shards(twenty_four / "by3")

    def epochs(seed, count=2):
        loader = StreamLoader(
            ShardStream(shards, IndexOf(), 4, even=True, shuffle=True, seed=seed, shuffle_buffer=6), list
        )
        return [[i for batch in loader for i in batch] for _ in range(count)]

    first, second = epochs(seed=0)
    assert sorted(first) == sorted(second) == sorted(str(i) for i in range(24))
    assert first != second and first != sorted(first, key=int)
    assert epochs(seed=0) == [first, second] and epochs(seed=1)[0] != first
    # The epoch can come from the Trainer instead of counting passes.
    by_epoch = StreamLoader(
        ShardStream(shards, IndexOf(), 4, even=True, shuffle=True, shuffle_buffer=6), list, epoch=lambda: 1
    )
    assert [i for batch in by_epoch for i in batch] == second


def test_facts_stream_from_train_and_val_shards(ten, tmp_path):
    root, encoder = ten
    write_shards(root / "vqa_train.json", root / "images", tmp_path / "train", 3)
    write_shards(root / "vqa_eval.json", root / "images", tmp_path / "val", 4)
    dm = FactsDataModule(
        str(root),
        batch_size=10,
        processor=encoder,
        train_shards=str(tmp_path / "train"),
        val_shards=str(tmp_path / "val"),
    )
    dm.setup("fit")
    train = list(dm.train_dataloader())
    facts = sum(b[kind]["input_ids"].shape[0] for b in train for kind in b)
    assert facts == 5 * 2 * 9  # 2 records (10 facts) per batch, full batches only, of the 18 train + val records
    val = list(dm.val_dataloader())
    assert sum(b[kind]["input_ids"].shape[0] for b in val for kind in b) == 5 * 10
    with pytest.raises(ValueError, match="give both train_shards and val_shards"):
        FactsDataModule(str(root), train_shards=str(tmp_path / "train"))


def test_finding_shards_names_what_is_wrong(ten, tmp_path):
    root, _ = ten
    assert [s.samples for s in resolve_shards(root / "shards/vqa_eval-{000001..000003}.tar")] == [3, 3, 1]
    write_shards(root / "vqa_train.json", root / "images", tmp_path, 4)
    write_shards(root / "vqa_eval.json", root / "images", tmp_path, 4)
    with pytest.raises(
        DataError,
        match="expected exactly one \\*.shards.json shard index, found vqa_eval.shards.json, vqa_train.shards.json",
    ):
        resolve_shards(tmp_path)
    (tmp_path / "stray-000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="stray-000000.tar: not listed in any \\*.shards.json index"):
        resolve_shards(tmp_path / "stray-000000.tar")
    (tmp_path / "vqa_train-000001.tar").unlink()
    with pytest.raises(DataError, match="vqa_train-000001.tar: shard file not found"):
        resolve_shards(tmp_path / "vqa_train.shards.json")
    (tmp_path / "other.shards.json").write_text('{"shardlist": []}')
    with pytest.raises(DataError, match="other.shards.json: not a kedit shard index"):
        read_index(tmp_path / "other.shards.json")


def _rewrite_shard(path: Path, change) -> None:
    """Rewrite a shard with `change(sample)` applied to each sample (keys and bytes as read)."""
    samples = [dict(s) for s in wds.tarfile_samples([{"url": str(path)}])]
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write({k: v for k, v in change(sample).items() if k == "__key__" or not k.startswith("__")})


def test_a_broken_shard_names_the_shard_and_sample(ten, tmp_path):
    root, encoder = ten
    write_shards(root / "vqa_eval.json", root / "images", tmp_path, 3)
    shards = resolve_shards(tmp_path)

    def stream(index):
        return list(StreamLoader(ShardStream([shards[index]], IndexOf(), 2, even=False), list))

    _rewrite_shard(
        Path(shards[1].url), lambda s: {k: v for k, v in s.items() if not (s["__key__"] == "000000004" and k == "json")}
    )
    with pytest.raises(
        DataError,
        match=r"vqa_eval-000001.tar: sample 000000004: no 000000004.json member "
        r"\(members: image.png, image_rephrase.png, m_loc.png\)",
    ):
        stream(1)
    _rewrite_shard(
        Path(shards[2].url), lambda s: {**s, "image_rephrase.png": b"not a png"} if s["__key__"] == "000000007" else s
    )
    with pytest.raises(
        DataError,
        match=r"vqa_eval-000002.tar: sample 000000007: field 'image_rephrase': "
        r"cannot decode image 000000007.image_rephrase.png \(img/7_view.png\)",
    ):
        stream(2)
    _rewrite_shard(Path(shards[0].url), lambda s: {**s, "json": s["json"].replace(b'"alt": "blue"', b'"alt": 3')})
    with pytest.raises(
        DataError, match=r"vqa_eval-000000.tar: sample 000000000: record 0: field 'alt': expected a string, got int"
    ):
        stream(0)
    Path(shards[3].url).write_bytes(b"\0" * 100 + b"garbage")
    with pytest.raises(DataError, match=r"vqa_eval-000003.tar: not a readable shard"):
        stream(3)
    index = tmp_path / "vqa_eval.shards.json"
    index.write_text(index.read_text().replace('"nsamples": 1', '"nsamples": 2'))
    write_shards(root / "vqa_eval.json", root / "images", tmp_path / "fresh", 9)
    Path(shards[3].url).write_bytes((tmp_path / "fresh/vqa_eval-000001.tar").read_bytes())  # the 1-record last shard
    with pytest.raises(DataError, match=r"vqa_eval-000003.tar: holds 1 sample\(s\) but its index says 2"):
        list(StreamLoader(ShardStream(resolve_shards(tmp_path)[3:], IndexOf(), 2, even=False), list))
    # Through a DataModule with workers: the worker's error reaches the main process, still naming shard and sample.
    dm = VQADataModule(
        str(root),
        batch_size=2,
        num_workers=2,
        processor=encoder,
        val_shards=str(tmp_path / "vqa_eval-{000001..000002}.tar"),
    )
    dm.setup("validate")
    with pytest.raises(DataError, match=r"vqa_eval-000001.tar: sample 000000004: no 000000004.json member") as caught:
        list(dm.val_dataloader())
    traceback.clear_frames(caught.tb)


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, sys.argv[3])
    from test_records import make_record
    from test_shards import word_encoder
    from data_modules.datamodules import EditExamples
    from data_modules.datasets import VQA_TEMPLATE, EditCollator
    from data_modules.shards import ShardStream, StreamLoader, resolve_shards

    def epoch(folder):
        stream = ShardStream(
            resolve_shards(folder), EditExamples("vqa", VQA_TEMPLATE), 8, even=True, shuffle=True, shuffle_buffer=8
        )
        return sum(1 for _ in StreamLoader(stream, EditCollator(word_encoder([make_record(0)]))))

    def peak_kb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    small = epoch(sys.argv[1])  # the 1x run, which also warms up every allocation a batch needs
    after_small = peak_kb()
    large = epoch(sys.argv[2])
    print(small, large, after_small, peak_kb())
""")
RSS_BOUND_KB = 8 * 1024  # streaming 10x the data may raise the process's peak RSS by at most 8 MB over the 1x run


def test_streaming_ten_times_the_data_keeps_host_ram_flat(tmp_path):
    # 32 records with 160 px noise images (77 kB each as PNG and decoded): 1x is 7 MB of shards,
    # 10x 75 MB, over eight times the bound, so holding the data (encoded or decoded) would fail.
    records = [make_record(i) for i in range(32)]
    write_split(tmp_path, "big.json", records)
    noise = torch.Generator().manual_seed(0)
    for record in records:
        for field in IMAGE_FIELDS:
            pixels = torch.randint(0, 256, (160, 160, 3), generator=noise, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / record[field])
    one = write_shards(tmp_path / "big.json", tmp_path / "images", tmp_path / "x1", 4)
    ten = tmp_path / "x10"
    ten.mkdir()
    entries = []
    for copy in range(10):  # 10x the data without 10x the disk: hard links to the same tar files
        for n, shard in enumerate(read_index(one)):
            name = f"big-{copy * 8 + n:06d}.tar"
            os.link(shard.url, ten / name)
            entries.append({"url": name, "nsamples": shard.samples})
    (ten / "big.shards.json").write_text(
        json.dumps({**json.loads(one.read_text()), "samples": 320, "shardlist": entries})
    )
    assert sum(Path(s.url).stat().st_size for s in resolve_shards(ten)) > 8 * RSS_BOUND_KB * 1024
    run = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "x1"), str(ten), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    small, large, after_small, after_large = map(int, run.stdout.split())
    assert (small, large) == (4, 40)
    assert after_large - after_small <= RSS_BOUND_KB, (
        f"peak RSS grew {(after_large - after_small) / 1024:.1f} MB streaming 10x the data"
    )


def test_kedit_shard_takes_extra_image_roots_explicitly(tmp_path, capsys):
    data = write_split(tmp_path, "ads.json", [make_record(0, image="../nuscenes/cam.png")])
    args = ["shard", "--data", str(data), "--images", str(tmp_path / "images"), "--shard-size", "2"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert f"{data}: record 0: field 'image': image path " in err and "outside the image root" in err
    assert not (tmp_path / "refused").exists()
    assert main([*args, "--out", str(tmp_path / "shards"), "--extra-image-root", str(tmp_path / "nuscenes")]) == 0
    assert read_index(tmp_path / "shards/ads.shards.json")[0].samples == 1
