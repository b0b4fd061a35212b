"""Video and multi-view inputs, ADS-Edit records: validation, loading, shards, refusal, per-group metrics."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import Trainer
from PIL import Image
from test_backbones import make_tokenizer
from test_llava_onevision import onevision
from test_qwen2_vl import qwen

from data_modules.ads import ADSEditDataModule
from data_modules.ads_records import ADSRecord, parse_ads_record, scan_ads_records
from data_modules.ads_synth import CAMERAS, FRAMES, write_ads_set
from data_modules.datamodules import EditExamples
from data_modules.datasets import EditDataset
from data_modules.records import DataError, parse_record
from data_modules.shards import ShardStream, resolve_shards, write_shards
from data_modules.visual import image_file
from kedit_lightning.backbones import Blip2Backbone, LlavaBackbone, load_backbone_spec
from kedit_lightning.backbones.minigpt4 import MiniGPT4Backbone
from kedit_lightning.cli import main
from kedit_lightning.editor import evaluate
from kedit_lightning.editors.ft import FineTune
from kedit_lightning.evaluation import EditMetrics, flatten_report
from kedit_lightning.modules import MENDModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "backbones"


@pytest.fixture(scope="module")
def ads(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ads")
    write_ads_set(root)
    return root


def raw_records(ads: Path, split: str = "train") -> list[dict]:
    return json.loads((ads / "ads" / f"{split}.json").read_text())


def by_type(records: list[dict], image_type: str) -> dict:
    return next(r for r in records if r["image_type"] == image_type)


def test_image_file_reads_a_coda_lm_annotation_name_as_its_image():
    assert image_file("test_3391.json") == "test/images/3391.jpg"
    assert image_file("coda/val_0007.json") == "coda/val/images/0007.jpg"
    assert image_file("val2014/COCO_val2014_000000028343.jpg") == "val2014/COCO_val2014_000000028343.jpg"


@pytest.mark.parametrize(
    "image, field, message",
    [
        ([], "image", "empty list of frames"),
        (["a.png", 3], "image[1]", "expected a non-empty frame path, got int 3"),
        (["a.png", " "], "image[1]", "expected a non-empty frame path"),
        ({}, "image", "empty object of views"),
        ({"CAM.FRONT": "a.png"}, "image.CAM.FRONT", "view name must be letters"),
        ({"CAM_FRONT": ""}, "image.CAM_FRONT", "expected a non-empty image path"),
        (7, "image", "expected an image path, a list of frame paths or an object of views, got int"),
    ],
)
def test_each_malformed_visual_input_is_named_by_record_and_field(ads, image, field, message):
    raw = dict(by_type(raw_records(ads), "video"), image=image)
    record, problems = parse_ads_record(raw, "f.json", 4)
    assert record is None
    assert [p.field for p in problems] == [field]
    assert str(problems[0]).startswith(f"f.json: record 4: field {field!r}: {message}")
    assert "\n" not in str(problems[0])


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"image_type": "panorama"}, "image_type", "unknown image type 'panorama'"),
        ({"image_type": "multi-image"}, "image", "a video input in an 'multi-image' record (expected an object"),
        ({"data_type": 3}, "data_type", "expected a string, got int"),
        ({"data_type": " "}, "data_type", "empty scenario name"),
        ({"original_gr": None}, "original_gr", "expected a string, got NoneType"),
        ({"original_gr": "a\u202eb"}, "original_gr", "control character U+202E"),
    ],
)
def test_each_malformed_ads_field_is_named(ads, change, field, message):
    raw = {**by_type(raw_records(ads), "video"), **change}
    if field == "image":  # only `image` changes kind; keep the rephrase consistent with the new type
        raw["image_rephrase"] = {"CAM_FRONT": "x.png"}
    _, problems = parse_ads_record(raw, "f.json", 0)
    assert [p.field for p in problems] == [field]
    assert message in str(problems[0])


def test_missing_ads_field_and_plain_layout_records_take_frames_too(ads):
    raw = dict(by_type(raw_records(ads), "multi-image"))
    del raw["source"]
    assert [str(p) for p in parse_ads_record(raw, "f.json", 2)[1]] == [
        "f.json: record 2: field 'source': missing field"
    ]
    plain = {**{k: "x" for k in ("src", "pred", "alt", "rephrase", "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")}}
    record, problems = parse_record(
        {**plain, "image": ["a.png", "b.png"], "image_rephrase": {"CAM_BACK": "c.png"}}, "p", 0
    )
    assert problems == []
    assert record.image == ("a.png", "b.png")
    assert record.to_dict()["image"] == ["a.png", "b.png"]


def test_kedit_validate_checks_frame_counts_and_roots(ads, capsys):
    data, images = str(ads / "ads" / "train.json"), str(ads / "ads" / "images")
    extra = ["--extra-image-root", str(ads / "ads" / "nuscenes")]
    assert main(["validate", "--data", data, "--images", images, *extra]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    assert main(["validate", "--data", data, "--images", images, *extra, "--max-frames", str(FRAMES - 1)]) == 1
    lines = capsys.readouterr().out.splitlines()
    video = next(i for i, r in enumerate(raw_records(ads)) if r["image_type"] == "video")
    assert f"{data}: record {video}: field 'image': {FRAMES} frames, more than the limit of {FRAMES - 1}" in lines[0]
    assert any(f"{len(CAMERAS)} views, more than the limit" in line for line in lines)
    assert main(["validate", "--data", data, "--images", images]) == 1  # the views are outside the image root
    assert "outside the image root" in capsys.readouterr().out


def test_ads_records_round_trip_and_load_every_kind(ads):
    records = scan_ads_records(ads / "ads" / "train.json").records
    assert [r.to_dict() for r in records] == raw_records(ads)
    assert all(isinstance(r, ADSRecord) and r.pred == raw["original_gr"] for r, raw in zip(records, raw_records(ads)))
    data = ADSEditDataModule(str(ads))
    data.setup("fit")
    dataset = EditDataset(data.split_records("train"), data.image_root, "vqa")
    kinds = {}
    for position, record in enumerate(data.split_records("train")):
        example = dataset[position]
        kinds[record.image_type] = example
        assert example.meta["groups"] == [f"data_type/{record.data_type}", f"image_type/{record.image_type}"]
        assert isinstance(example.m_loc_image, Image.Image)
    assert len(kinds["video"].image) == FRAMES and all(isinstance(f, Image.Image) for f in kinds["video"].image)
    assert list(kinds["multi-image"].image) == list(CAMERAS)
    assert isinstance(kinds["single-image"].image, Image.Image)
    assert data.metric_groups("val") == sorted(
        {f"data_type/{r['data_type']}" for r in raw_records(ads, "test")}
        | {f"image_type/{r['image_type']}" for r in raw_records(ads, "test")}
    )


def pixels(visual) -> list:
    if isinstance(visual, Image.Image):
        return [np.asarray(visual)]
    return [np.asarray(v) for v in (visual.values() if isinstance(visual, dict) else visual)]


def test_shards_hold_every_frame_and_view_and_stream_what_json_loads(ads, tmp_path):
    data_file = ads / "ads" / "test.json"
    index = write_shards(
        data_file, ads / "ads" / "images", tmp_path, shard_size=4, extra_roots=[str(ads / "ads" / "nuscenes")]
    )
    meta = json.loads(index.read_text())
    assert meta["visual_kinds"] == ["image", "video", "views"]
    assert "image_type/multi-image" in meta["groups"]
    stream = ShardStream(resolve_shards(index), EditExamples("vqa", "Question: {} Short answer:"), 2, even=False)
    streamed = [e for batch in stream for e in batch]
    data = ADSEditDataModule(str(ads), val_file="ads/test.json")
    data.setup("validate")
    dataset = EditDataset(data.split_records("val"), data.image_root, "vqa")
    assert len(streamed) == len(dataset) == len(raw_records(ads, "test"))
    for position, example in enumerate(streamed):
        expected = dataset[position]
        assert example.meta == expected.meta
        for field in ("image", "image_rephrase", "m_loc_image"):
            got, want = pixels(getattr(example, field)), pixels(getattr(expected, field))
            assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    sharded = ADSEditDataModule(str(ads), val_shards=str(index))
    sharded.setup("validate")
    assert sharded.metric_groups("val") == data.metric_groups("val")


@pytest.mark.parametrize("family", [Blip2Backbone, MiniGPT4Backbone, LlavaBackbone])
def test_existing_families_take_single_images_only(family):
    assert family.visual_inputs == {"image"}


def test_an_image_only_family_refuses_video_and_views_before_loading(ads, world):
    spec = dataclasses.replace(load_backbone_spec(CONFIGS / "blip2-tiny.yaml"), processor=str(world / "tokenizer"))
    module = MENDModule(spec, rank=8)
    data = ADSEditDataModule(str(ads), val_file="ads/test.json")
    trainer = Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(DataError) as err:
        trainer.fit(module, datamodule=data)
    assert module.backbone is None
    lines = str(err.value).splitlines()
    video = next(i for i, r in enumerate(raw_records(ads)) if r["image_type"] == "video")
    expected = f"{ads / 'ads' / 'train.json'}: record {video}: field 'image': a video input, which the blip2 backbone"
    assert any(line.strip().startswith(expected) for line in lines)
    assert any("a views input, which the blip2 backbone does not encode" in line for line in lines)


def test_metrics_are_also_reported_per_group():
    # Two records, one answer token each: record 0 (group A) answered right, record 1 (group B) wrong.
    labels = torch.tensor([[-100, 1], [-100, 2]])
    right, wrong = torch.tensor([[0.0, 5.0, 0.0]]), torch.tensor([[5.0, 0.0, 0.0]])
    post = {"edit_inner": torch.cat([right, wrong]), "loc": torch.cat([right, right])}
    pre = {"loc": torch.cat([right, wrong])}
    meta = [{"groups": ["data_type/A", "image_type/video"]}, {"groups": ["data_type/B", "image_type/video"]}]
    metrics = EditMetrics(groups=["data_type/A", "data_type/B", "data_type/C", "image_type/video"])
    metrics.update({"edit_inner": labels, "loc": labels}, post, pre, meta=meta)
    flat = flatten_report(metrics.compute())
    assert flat["reliability"] == 0.5
    assert flat["data_type/A/reliability"] == 1.0 and flat["data_type/B/reliability"] == 0.0
    assert flat["data_type/A/t_locality"] == 1.0 and flat["data_type/B/t_locality"] == 0.0
    assert flat["image_type/video/reliability"] == 0.5 and flat["image_type/video/n_edits"] == 2
    assert flat["exact_match/data_type/A/reliability"] == 1.0
    assert not any(key.startswith("data_type/C") for key in flat)  # a group with no edits is left out


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_an_ads_set_is_edited_and_scored_end_to_end_per_group_on_a_video_family(ads, family):
    # Every kind of visual input (frames, camera views, one image) through a family that encodes them all,
    # the one evaluation loop, and the per-data_type / per-image_type report.
    tokenizer = make_tokenizer()
    backbone = (qwen("qwen2_vl", tokenizer) if family == "qwen2_vl" else onevision(tokenizer)).eval()
    data = ADSEditDataModule(str(ads), val_file="ads/test.json", batch_size=3, processor=backbone.processor)
    data.setup("validate")
    assert data.visual_problems(backbone.visual_inputs, backbone.family) == []
    report = evaluate(
        FineTune(lr=1e-2), backbone, data.val_dataloader(), progress=False, groups=data.metric_groups("val")
    )
    records = raw_records(ads, "test")
    assert report["n_edits"] == len(records)
    for image_type in ("video", "multi-image", "single-image"):
        group = report["image_type"][image_type]
        assert group["n_edits"] == sum(r["image_type"] == image_type for r in records)
        assert all(0.0 <= group[key] <= 1.0 for key in ("reliability", "t_generality", "i_generality", "t_locality"))
    assert sum(group["n_edits"] for group in report["data_type"].values()) == len(records)
