"""The llava_onevision family at tiny size: images, videos and views at the base view, against transformers'
own multi-image and video forward, through the frozen-prefix split, save / load, refusals, real-size shapes.
Its MEND and SERAC steps run with the Qwen families' (tests/test_qwen2_vl.py)."""

import pytest
import torch
from test_backbones import CONFIGS, PROMPTS, draw_images, make_tokenizer
from test_qwen2_vl import (  # noqa: F401 (the visual-kind split test runs here on this family's fixture)
    frames,
    mixed_sub_batches,
    test_prefix_then_resume_equals_the_full_forward_for_every_visual_kind,
)
from transformers import LlavaOnevisionImageProcessorPil

from data_modules.encoding import IGNORE_INDEX
from kedit_lightning.backbones import FAMILIES, LlavaOnevisionBackbone, expand_braces, load_backbone_spec

TOKENS_PER_IMAGE = 17  # 32 px in 8 px patches: 4 x 4 features, then the image_newline
TOKENS_PER_FRAME = 4  # the 4 x 4 features pooled to 2 x 2
PIXELS = 3 * 32 * 32


def onevision(tokenizer) -> LlavaOnevisionBackbone:
    spec = load_backbone_spec(CONFIGS / "llava-onevision-tiny.yaml")
    torch.manual_seed(0)
    return LlavaOnevisionBackbone.from_config(spec.config, edit_params=spec.edit_params, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def backbone(tokenizer):
    return onevision(tokenizer)


def test_placeholders_count_images_pooled_frames_and_views(backbone):
    sub_batch = mixed_sub_batches(backbone)["visual"]
    ids, pixels = sub_batch["input_ids"], sub_batch["pixel_values"]
    images = (ids == backbone.image_token_id).sum(1).tolist()
    videos = (ids == backbone.video_token_id).sum(1).tolist()
    # An image, 3 frames pooled then one newline, two views of an image each.
    assert images == [TOKENS_PER_IMAGE, 0, 2 * TOKENS_PER_IMAGE] and videos == [0, 3 * TOKENS_PER_FRAME + 1, 0]
    assert pixels.shape == (3, 3, 1 + PIXELS)
    assert (~pixels[..., 0].isnan()).sum(1).tolist() == [1, 3, 2]
    assert pixels[:, 0, 0].tolist() == [0.0, 1.0, 0.0]  # the kind column: only the video's rows are frames


def test_logits_match_transformers_multi_image_and_video_forward(backbone):
    """Rows of two views and of a 3-frame video: our logits equal the model's own forward given the
    processor's multi-image pixels (each image padded square and resized, no tiles) and the frames."""
    red, blue = draw_images()
    video = frames(3)
    sub_batch = backbone.processor([PROMPTS[0], PROMPTS[1]], ["red", "blue"], [{"a": red, "b": blue}, video])
    size = {"height": 32, "width": 32}
    processor = LlavaOnevisionImageProcessorPil(size=size)
    views = processor(images=[[red, blue]], return_tensors="pt")
    # The video processor (it needs torchvision) resizes each frame to the square size and normalises alike.
    square = [f.resize((32, 32), resample=3) for f in video]
    frame_pixels = processor(images=[square], return_tensors="pt")["pixel_values"][:, 0].unsqueeze(0)
    expected = backbone.model(
        input_ids=sub_batch["input_ids"],
        attention_mask=sub_batch["attention_mask"],
        pixel_values=views["pixel_values"],  # [image, its one view, C, H, W]
        image_sizes=views["image_sizes"],
        batch_num_images=views["batch_num_images"],
        pixel_values_videos=frame_pixels,
    ).logits
    logits = backbone(sub_batch)
    labels = sub_batch["labels"]
    torch.testing.assert_close(logits[labels != IGNORE_INDEX], expected[:, :-1][labels[:, 1:] != IGNORE_INDEX])


def test_one_image_is_read_at_its_base_view_without_tiles(backbone):
    """A row's single image gives the features it gives as one of two views (transformers tiles it otherwise)."""
    red, blue = draw_images()
    one = backbone.processor.row_pixels(red)
    two = backbone.processor.row_pixels({"a": red, "b": blue})
    torch.testing.assert_close(one, two[:1])
    features = backbone.image_features(torch.stack([torch.cat([one, one]), two]))
    torch.testing.assert_close(features[0, :TOKENS_PER_IMAGE], features[1, :TOKENS_PER_IMAGE])
    assert features[0, TOKENS_PER_IMAGE:].abs().sum() > 0 and features.shape[1] == 2 * TOKENS_PER_IMAGE


def test_long_videos_keep_evenly_spread_frames(backbone):
    sub_batch = backbone.processor([PROMPTS[0]], ["red"], [frames(20)])
    assert int((sub_batch["input_ids"] == backbone.video_token_id).sum()) == 8 * TOKENS_PER_FRAME + 1
    assert backbone.processor.frames(list(range(20))) == [0, 2, 5, 7, 10, 12, 15, 17]


def test_save_and_load_round_trip(backbone, tmp_path):
    backbone.save_pretrained(tmp_path)
    loaded = FAMILIES["llava_onevision"].from_pretrained(str(tmp_path))
    assert loaded.processor.tokens_per_image == TOKENS_PER_IMAGE
    sub_batch = mixed_sub_batches(backbone)["visual"]
    reloaded = mixed_sub_batches(loaded)["visual"]
    assert torch.equal(sub_batch["input_ids"], reloaded["input_ids"])
    torch.testing.assert_close(sub_batch["pixel_values"], reloaded["pixel_values"], equal_nan=True)
    torch.testing.assert_close(loaded(sub_batch), backbone(sub_batch))
    assert loaded.edit_param_names == [
        f"model.language_model.layers.{i}.mlp.{p}_proj.weight" for i in (1, 2, 3) for p in ("up", "down")
    ]


def test_a_directory_of_another_family_is_refused(tmp_path, tokenizer):
    from test_qwen2_vl import qwen

    qwen("qwen2_vl", tokenizer).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="qwen2_vl"):
        LlavaOnevisionBackbone.from_pretrained(str(tmp_path))


def test_a_tokenizer_that_disagrees_with_the_config_is_refused(tokenizer):
    spec = load_backbone_spec(CONFIGS / "llava-onevision-tiny.yaml")
    with pytest.raises(ValueError, match=r"config.video_token_index is 3 but the tokenizer maps '<video>'"):
        LlavaOnevisionBackbone.from_config({**spec.config, "video_token_index": 3}, tokenizer=tokenizer)


def test_the_real_size_config_builds_on_the_meta_device():
    spec = load_backbone_spec(CONFIGS / "llava-onevision-7b.yaml")
    with torch.device("meta"):
        model = FAMILIES[spec.family].build_model(spec.config)
    params = dict(model.named_parameters())
    # Qwen2-7B untied (7.62B), SigLIP so400m without its head (0.40B), the 2-layer projector (17M).
    assert 8.0e9 < sum(p.numel() for p in params.values()) < 8.06e9
    edited = [n for pattern in spec.edit_params for n in expand_braces(pattern)]
    assert len(edited) == 6 and all(any(f".{layer}." in n for layer in (25, 26, 27)) for n in edited)
    assert {tuple(params[n].shape) for n in edited} == {(18944, 3584), (3584, 18944)}
    assert model.config.vision_config.image_size // model.config.vision_config.patch_size == 27
