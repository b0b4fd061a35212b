"""The qwen2_vl family (Qwen2-VL, Qwen2.5-VL) at tiny size: images, videos and views, M-RoPE through the
frozen-prefix split, save / load, refusals, real-size shapes, and one MEND and one SERAC step on it."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_BERT
from PIL import Image
from test_backbones import CONFIGS, PROMPTS, TARGETS, draw_images, make_tokenizer, tiny_backbone
from test_mend_module import make_data, one_batch, trainer
from test_mend_module import make_module as make_mend
from test_serac import edit_batch

from data_modules.encoding import IGNORE_INDEX
from kedit_lightning.backbones import FAMILIES, Qwen2VLBackbone, expand_braces, load_backbone_spec
from kedit_lightning.backbones.base import answer_read_mask
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.evaluation import record_batches
from kedit_lightning.modules.serac import ScopeEncoderSpec, SERACModule

TINY_QWEN = {"qwen2_vl": "qwen2-vl-tiny.yaml", "qwen2_5_vl": "qwen2.5-vl-tiny.yaml"}
# The families taking videos and views: their MEND and SERAC cells are tested here together.
MULTI_IMAGE_TINY = [*TINY_QWEN.values(), "llava-onevision-tiny.yaml"]
TOKENS_PER_IMAGE = 16  # 32 px in 4 px patches: 8 x 8 patches, merged 2 x 2


def qwen(name: str, tokenizer) -> Qwen2VLBackbone:
    spec = load_backbone_spec(CONFIGS / TINY_QWEN[name])
    torch.manual_seed(0)
    return Qwen2VLBackbone.from_config(spec.config, edit_params=spec.edit_params, tokenizer=tokenizer)


def frames(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (40, 24), (30 * i, 200 - 20 * i, 90)) for i in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module", params=list(TINY_QWEN))
def backbone(request, tokenizer):
    return qwen(request.param, tokenizer)


def mixed_sub_batches(backbone):
    """Two sub-batches of other widths and patch counts: an image, a 3-frame video, two views; a text-only row."""
    red, blue = draw_images()
    visual = backbone.processor(
        [PROMPTS[0], PROMPTS[1], PROMPTS[0]], ["red", "green yellow", "blue"], [red, frames(3), {"b": blue, "a": red}]
    )
    text = backbone.processor([PROMPTS[1]], ["red"])
    return {"visual": visual, "text": text}


def test_placeholders_count_images_temporal_patches_and_views(backbone):
    sub_batch = mixed_sub_batches(backbone)["visual"]
    ids = sub_batch["input_ids"]
    images = (ids == backbone.image_token_id).sum(1).tolist()
    videos = (ids == backbone.video_token_id).sum(1).tolist()
    # 3 frames -> 4 (the last repeated) -> 2 temporal patches; views are one image each.
    assert images == [TOKENS_PER_IMAGE, 0, 2 * TOKENS_PER_IMAGE] and videos == [0, 2 * TOKENS_PER_IMAGE, 0]
    patches = (~sub_batch["pixel_values"][..., 0].isnan()).sum(1).tolist()
    assert patches == [64, 128, 128]


def test_logits_match_transformers_own_loss(backbone):
    """Our causally shifted logits give the model's own causal-LM loss (its M-RoPE from its processor's inputs)."""
    sub_batch = mixed_sub_batches(backbone)["visual"]
    logits = backbone(sub_batch)
    labels = sub_batch["labels"]
    ours = F.cross_entropy(logits[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    model_out = backbone.model_logits(sub_batch["input_ids"], sub_batch["attention_mask"], sub_batch["pixel_values"])
    shifted = model_out[:, :-1][labels[:, 1:] != IGNORE_INDEX]
    torch.testing.assert_close(ours, F.cross_entropy(shifted, labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]))


def test_rope_positions_are_3d_after_an_image(backbone):
    """Text after an image resumes at (first image position + the image's 4 x 4 token grid side), not at its index."""
    sub_batch = mixed_sub_batches(backbone)["visual"]
    ids, mask = sub_batch["input_ids"], sub_batch["attention_mask"]
    positions = backbone.decoder_kwargs(ids, mask)["position_ids"]
    first = int((ids[0] == backbone.image_token_id).nonzero()[0])
    after = first + TOKENS_PER_IMAGE  # the <|vision_end|> token
    assert positions.shape == (3, *ids.shape)
    assert positions[:, 0, after].tolist() == [first + 4] * 3
    # Inside the image: height and width positions walk the 4 x 4 grid, time stays.
    grid = positions[:, 0, first : first + TOKENS_PER_IMAGE] - first
    assert grid[0].tolist() == [0] * 16
    assert grid[1].tolist() == [r for r in range(4) for _ in range(4)]
    assert grid[2].tolist() == list(range(4)) * 4


def test_prefix_then_resume_equals_the_full_forward_for_every_visual_kind(backbone):
    """StepInputs over sub-batches of other patch counts (padded with NaN) and a text-only one: the split
    forward gives the full forward's logits at every answer position, for subsets of the rows."""
    sub_batches = mixed_sub_batches(backbone)
    inputs = StepInputs(backbone, sub_batches)
    for names in (["visual", "text"], ["visual"], ["text"]):
        rows = inputs.rows(*names)
        got = inputs.answer_logits(backbone, rows)
        expected = []
        for name in names:
            batch = sub_batches[name]
            for r in range(batch["input_ids"].shape[0]):  # each row alone, as transformers runs it
                pixels = batch["pixel_values"]
                one = {k: batch[k][r : r + 1] for k in ("input_ids", "attention_mask", "labels")}
                if pixels is not None:
                    row = pixels[r]
                    one["pixel_values"] = row[~row[:, 0].isnan()].unsqueeze(0)
                expected.append(backbone(one)[one["labels"] != IGNORE_INDEX])
        torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-5)
    state = backbone.prefix(
        sub_batches["visual"]["input_ids"],
        sub_batches["visual"]["attention_mask"],
        backbone.encode_images(sub_batches["visual"]["pixel_values"]),
    )
    labels = sub_batches["visual"]["labels"]
    direct = backbone.head(backbone.resume(state, answer_read_mask(labels)))
    torch.testing.assert_close(direct, backbone(sub_batches["visual"])[labels != IGNORE_INDEX], rtol=1e-4, atol=1e-5)


def test_a_video_patch_holds_consecutive_frames(backbone):
    """Two equal frames make the patches of that frame as an image (the image processor repeats it in time);
    two different frames make patches whose temporal halves are each frame's."""
    encoder = backbone.processor
    still = frames(1)[0]
    image = encoder.row_pixels(still)
    torch.testing.assert_close(encoder.row_pixels([still, still]), image)
    first, second = frames(2)
    video = encoder.row_pixels([first, second]).unflatten(-1, (3, 2, -1))
    torch.testing.assert_close(video[:, :, 0], encoder.row_pixels(first).unflatten(-1, (3, 2, -1))[:, :, 0])
    torch.testing.assert_close(video[:, :, 1], encoder.row_pixels(second).unflatten(-1, (3, 2, -1))[:, :, 0])


def test_long_videos_keep_evenly_spread_frames(tokenizer):
    encoder = qwen("qwen2_vl", tokenizer).processor
    kept = encoder.frames(list(range(20)))
    assert kept == [0, 2, 5, 7, 10, 12, 15, 17]


def test_save_and_load_round_trip(backbone, tmp_path):
    backbone.save_pretrained(tmp_path)
    loaded = FAMILIES["qwen2_vl"].from_pretrained(str(tmp_path))
    assert type(loaded.model) is type(backbone.model)
    assert loaded.processor.tokens_per_image == TOKENS_PER_IMAGE
    sub_batch = mixed_sub_batches(backbone)["visual"]
    torch.testing.assert_close(loaded(sub_batch), backbone(sub_batch))
    assert loaded.edit_param_names == [
        f"model.language_model.layers.{i}.mlp.{p}_proj.weight" for i in (1, 2, 3) for p in ("up", "down")
    ]


def test_other_families_refuse_video_and_views_naming_themselves(tokenizer):
    llava = tiny_backbone("llava", tokenizer)
    red, _ = draw_images()
    with pytest.raises(ValueError, match=r"^llava: row 1 has a video input of 3; this backbone takes \['image'\]$"):
        llava.processor(PROMPTS, TARGETS, [red, frames(3)])
    with pytest.raises(ValueError, match=r"^llava: row 0 has a views input of 2; this backbone takes \['image'\]$"):
        llava.processor(PROMPTS[:1], TARGETS[:1], [{"a": red, "b": red}])


def test_a_tokenizer_that_disagrees_with_the_config_is_refused(tokenizer):
    spec = load_backbone_spec(CONFIGS / TINY_QWEN["qwen2_vl"])
    with pytest.raises(ValueError, match=r"config.image_token_id is 3 but the tokenizer maps '<\|image_pad\|>'"):
        Qwen2VLBackbone.from_config({**spec.config, "image_token_id": 3}, tokenizer=tokenizer)


@pytest.mark.parametrize(
    "name,low,high",
    [("qwen2-vl-7b.yaml", 8.2e9, 8.35e9), ("qwen2.5-vl-7b.yaml", 8.2e9, 8.35e9)],  # both about 8.29B
)
def test_real_size_configs_build_on_the_meta_device(name, low, high):
    spec = load_backbone_spec(CONFIGS / name)
    with torch.device("meta"):
        model = FAMILIES[spec.family].build_model(spec.config)
    params = dict(model.named_parameters())
    assert low < sum(p.numel() for p in params.values()) < high
    edited = [n for pattern in spec.edit_params for n in expand_braces(pattern)]
    assert len(edited) == 6 and all(any(f".{layer}." in n for layer in (25, 26, 27)) for n in edited)
    assert {tuple(params[n].shape) for n in edited} == {(18944, 3584), (3584, 18944)}


@pytest.mark.parametrize("config", MULTI_IMAGE_TINY)
def test_a_mend_step_and_an_edit(world, tmp_path, config):
    module = make_mend(world, backbone=config)
    data = make_data(world, module)
    record = next(record_batches(next(iter(data.val_dataloader()))))
    inputs = StepInputs(module.backbone, {"edit": record["edit_inner"]})
    model = module.editor.edited_model(module.backbone)
    group = module.editor(model, inputs, inputs.rows("edit"))
    labels = record["edit_inner"]["labels"]
    with torch.no_grad():
        unedited = model.answer_logits(inputs, inputs.rows("edit")).log_softmax(-1)
        edited = model.answer_logits(inputs, inputs.rows("edit"), group).log_softmax(-1)
    ids = labels[labels != IGNORE_INDEX].unsqueeze(-1)
    assert (edited.gather(-1, ids) - unedited.gather(-1, ids)).sum() > 0
    before = {k: v.clone() for k, v in module.editor.state_dict().items()}
    fit = trainer(tmp_path, 1)
    fit.fit(module, train_dataloaders=one_batch(next(iter(data.train_dataloader()))))
    assert fit.global_step == 1 and int(module.skipped_steps) == 0
    assert any(not torch.equal(v, module.editor.state_dict()[k]) for k, v in before.items() if v.is_floating_point())


@pytest.mark.parametrize("config", MULTI_IMAGE_TINY)
def test_a_serac_step_and_an_edit(tmp_path, config):
    tokenizer_dir = tmp_path / "tokenizer"
    make_tokenizer().save_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    base = dataclasses.replace(load_backbone_spec(CONFIGS / config), processor=str(tokenizer_dir))
    counterfactual = dataclasses.replace(load_backbone_spec(CONFIGS / "text-tiny.yaml"), processor=str(tokenizer_dir))
    scope = ScopeEncoderSpec(config=TINY_BERT, tokenizer=str(tokenizer_dir))
    module = SERACModule(base, counterfactual, scope, lr=3e-3, classifier_lr=3e-3)
    module.configure_model()
    batch = edit_batch(module)
    before = {k: v.clone() for k, v in module.editor.state_dict().items()}
    fit = trainer(tmp_path, 1)
    fit.fit(module, train_dataloaders=one_batch(batch))
    assert fit.global_step == 1
    assert any(not torch.equal(v, module.editor.state_dict()[k]) for k, v in before.items() if v.is_floating_point())
    record = next(record_batches(batch))
    inputs = StepInputs(module.backbone, {"edit": record["edit_inner"]})
    model = module.editor.edited_model(module.backbone)
    group = module.editor(model, inputs, inputs.rows("edit"))
    with torch.no_grad():
        edited = model.answer_logits(inputs, inputs.rows("edit"), group)
        unedited = model.answer_logits(inputs, inputs.rows("edit"))
    # The edit routes its own prompt to the counterfactual model: the answer logits change.
    assert not torch.allclose(edited, unedited)


def test_the_qwen2_vl_quick_start_bootstraps_its_own_base_and_edits_its_layers():
    """configs/quickstart-qwen2-vl.yaml: MEND on the Qwen2-VL base its bootstrap trains from the tiny config,
    editing the tiny config's layers, as the BLIP-2 quick start does with its own."""
    repo = CONFIGS.parent.parent
    quick = yaml.safe_load((repo / "configs/quickstart-qwen2-vl.yaml").read_text())
    backbone = quick["model"]["init_args"]["backbone"]
    bootstrap = yaml.safe_load((repo / backbone["bootstrap"]).read_text())["model"]["init_args"]
    tiny = load_backbone_spec(CONFIGS / bootstrap["backbone"])
    assert backbone["family"] == tiny.family == "qwen2_vl" and bootstrap["backbone"] == TINY_QWEN["qwen2_vl"]
    assert bootstrap["export_dir"] == backbone["pretrained"]
    assert backbone["edit_params"] == tiny.edit_params
