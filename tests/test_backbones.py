"""Backbone families at tiny size: alignment, layouts, edited layers, save/load, errors, real-size shapes."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaProcessor,
)

from data_modules.encoding import IGNORE_INDEX, TooLongError
from data_modules.word_tokenizer import PROMPT_TEXTS, build_word_tokenizer, corpus_from_records
from kedit_lightning.artifact import other_weights
from kedit_lightning.backbones import (
    FAMILIES,
    BackboneSpec,
    Blip2Backbone,
    MiniGPT4Backbone,
    TextLMBackbone,
    build_backbone,
    expand_braces,
    load_backbone_spec,
)
from kedit_lightning.backbones.base import answer_read_mask

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "backbones"
TINY = {
    "blip2": "blip2-tiny.yaml",
    "llava": "llava-tiny.yaml",
    "minigpt4": "minigpt4-tiny.yaml",
    "text": "text-tiny.yaml",
}
MULTIMODAL = ("blip2", "llava", "minigpt4")
CORPUS = [
    "What colour is the object? red blue green yellow",
    "Where is this object located? Velor Marun",
    "Question: Short answer:",
    "The capital of Zandia is Velor.",
]
PROMPTS = ["Question: What colour is the object? Short answer:", "Where is this object located?"]
TARGETS = ["red", "green yellow"]
# The documented default edit sets: MLP weights of the last three LM layers (layers 1-3 of 4 here).
EDITED = {
    "blip2": [f"language_model.model.decoder.layers.{i}.fc{j}.weight" for i in (1, 2, 3) for j in (1, 2)],
    "llava": [f"model.language_model.layers.{i}.mlp.{p}_proj.weight" for i in (1, 2, 3) for p in ("up", "down")],
    "minigpt4": [f"language_model.model.layers.{i}.mlp.{p}_proj.weight" for i in (1, 2, 3) for p in ("up", "down")],
    "text": [f"model.layers.{i}.mlp.{p}_proj.weight" for i in (1, 2, 3) for p in ("up", "down")],
}


def draw_images() -> list[Image.Image]:
    red = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(red).rectangle([12, 12, 52, 52], fill=(220, 30, 30))
    blue = Image.new("RGB", (64, 64), (230, 240, 250))
    ImageDraw.Draw(blue).ellipse([8, 8, 56, 56], fill=(30, 70, 220))
    return [red, blue]


def make_tokenizer():
    return build_word_tokenizer([*CORPUS, *PROMPT_TEXTS])


def tiny_backbone(family: str, tokenizer, **overrides):
    spec = load_backbone_spec(CONFIGS / TINY[family])
    config = {**spec.config, **overrides}
    return FAMILIES[family].from_config(config, edit_params=spec.edit_params, tokenizer=tokenizer)


def encode(backbone, with_image: bool = True, prompts=PROMPTS, targets=TARGETS):
    images = draw_images()[: len(prompts)] if with_image else None
    return backbone.processor(prompts, targets, images)


def reference_loss(backbone, sub_batch) -> torch.Tensor:
    """The transformers model's own causal-LM loss on the same labels (it shifts internally)."""
    ids, mask, labels, pixels = (
        sub_batch["input_ids"],
        sub_batch["attention_mask"],
        sub_batch["labels"],
        sub_batch["pixel_values"],
    )
    model = backbone.model
    if backbone.family == "text":
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    if backbone.family == "blip2" and pixels is None:
        return model.language_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def backbones(tokenizer):
    torch.manual_seed(0)
    return {family: tiny_backbone(family, tokenizer) for family in TINY}


@pytest.mark.parametrize("family,with_image", [(f, True) for f in MULTIMODAL] + [(f, False) for f in TINY])
def test_logits_align_with_labels(backbones, family, with_image):
    backbone = backbones[family]
    batch = encode(backbone, with_image)
    logits = backbone(batch)
    assert logits.shape[:2] == batch["labels"].shape
    assert torch.isfinite(logits).all()
    ours = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ours, reference_loss(backbone, batch))
    # Shifting by one position more gives a different loss, so the comparison can catch misalignment.
    shifted = torch.cat([logits[:, 1:], logits[:, :1]], dim=1)
    assert not torch.isclose(
        F.cross_entropy(shifted.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX), ours
    )


@pytest.mark.parametrize("family", MULTIMODAL)
def test_image_changes_logits_and_text_only_needs_no_image(backbones, family):
    backbone = backbones[family]
    red, blue = draw_images()
    prompt, target = PROMPTS[:1], TARGETS[:1]
    first = backbone(backbone.processor(prompt, target, [red]))
    second = backbone(backbone.processor(prompt, target, [blue]))
    assert not torch.allclose(first, second)
    assert backbone.processor(prompt, target, None)["pixel_values"] is None


@pytest.mark.parametrize("family", MULTIMODAL)
def test_placeholders_without_pixels_are_rejected(backbones, family):
    backbone = backbones[family]
    batch = encode(backbone, with_image=True)
    with pytest.raises(ValueError, match="no pixel_values"):
        backbone({**batch, "pixel_values": None})


def test_text_backbone_rejects_images(backbones):
    batch = encode(backbones["text"], with_image=False)
    with pytest.raises(ValueError, match="text LM reads text only"):
        backbones["text"]({**batch, "pixel_values": torch.zeros(2, 3, 32, 32)})


def test_blip2_layout_matches_blip2_processor(backbones, tokenizer):
    backbone = backbones["blip2"]
    processor = Blip2Processor(
        backbone.processor.image_processor, tokenizer, num_query_tokens=backbone.model.config.num_query_tokens
    )
    images = draw_images()
    for prompt, target, image in zip(PROMPTS, TARGETS, images):
        ours = backbone.processor([prompt], [target], [image])
        theirs = processor(images=[image], text=f"{prompt} {target}", return_tensors="pt")
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
        torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"])
    tokens = tokenizer.convert_ids_to_tokens(backbone.processor([PROMPTS[0]], [TARGETS[0]], None)["input_ids"][0])
    assert tokens[0] == "<s>"  # text-only still starts with BOS


def test_llava_layout_matches_llava_processor(backbones, tokenizer):
    backbone = backbones["llava"]
    config = backbone.model.config
    processor = LlavaProcessor(
        backbone.processor.image_processor,
        tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    image = draw_images()[0]
    ours = backbone.processor([PROMPTS[0]], [TARGETS[0]], [image])
    theirs = processor(images=[image], text=f"USER: <image>\n{PROMPTS[0]} ASSISTANT: {TARGETS[0]}", return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert (ours["input_ids"] == backbone.image_token_id).sum() == (32 // 8) ** 2


def test_minigpt4_layout(backbones, tokenizer):
    backbone = backbones["minigpt4"]
    batch = backbone.processor([PROMPTS[1]], ["red"], [draw_images()[0]])
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    n = backbone.model.config.num_query_tokens
    assert tokens[:9] == ["<s>", "#", "#", "#", "human", ":", "<", "img", ">"]
    assert tokens[9 : 9 + n] == ["<ImageHere>"] * n
    assert tokens[9 + n : 9 + n + 4] == ["<", "/", "img", ">"]
    assert tokens[-5:] == ["#", "#", "assistant", ":", "red"]


@pytest.mark.parametrize("family", list(TINY))
def test_editable_parameters_are_the_documented_layers(backbones, tokenizer, family):
    backbone = backbones[family]
    assert list(backbone.editable_parameters()) == EDITED[family]
    assert all(p.ndim == 2 and not p.requires_grad for p in backbone.editable_parameters().values())
    # With no edit_params a family edits its default set: the same last three MLP blocks.
    spec = load_backbone_spec(CONFIGS / TINY[family])
    default = FAMILIES[family].from_config(spec.config, tokenizer=tokenizer)
    assert default.edit_param_names == EDITED[family]
    with pytest.raises(KeyError, match="no parameter named"):
        backbone.editable_parameters(["language_model.no.such.weight"])


@pytest.mark.parametrize("family", list(TINY))
def test_save_and_load_round_trip(backbones, family, tmp_path):
    backbone = backbones[family]
    backbone.save_pretrained(tmp_path)
    loaded = FAMILIES[family].from_pretrained(str(tmp_path), edit_params=backbone.edit_param_names)
    with_image = family != "text"
    batch = encode(backbone, with_image)
    reloaded_batch = encode(loaded, with_image)
    assert torch.equal(batch["input_ids"], reloaded_batch["input_ids"])
    assert torch.equal(batch["labels"], reloaded_batch["labels"])
    if with_image:
        torch.testing.assert_close(batch["pixel_values"], reloaded_batch["pixel_values"])
    assert torch.equal(backbone(batch), loaded(batch))
    assert torch.equal(backbone(encode(backbone, False)), loaded(encode(loaded, False)))
    assert loaded.fingerprint() == backbone.fingerprint()
    # The same directory through a BackboneSpec, as configs name it.
    via_spec = build_backbone(BackboneSpec(family=family, pretrained=str(tmp_path), edit_params=EDITED[family]))
    assert torch.equal(via_spec(batch), backbone(batch))


@pytest.mark.parametrize("family", list(TINY))
def test_from_pretrained_bad_paths(family, tmp_path):
    cls = FAMILIES[family]
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(FileNotFoundError, match="no such directory"):
        cls.from_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        cls.from_pretrained(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        cls.from_pretrained(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize(
    "saved,loader",
    [("blip2", "llava"), ("llava", "minigpt4"), ("minigpt4", "blip2"), ("blip2", "text"), ("text", "blip2")],
)
def test_from_pretrained_rejects_another_familys_directory(backbones, tmp_path, saved, loader):
    backbones[saved].save_pretrained(tmp_path)
    model_type = json.loads((tmp_path / "config.json").read_text())["model_type"]
    with pytest.raises(ValueError, match=rf"{tmp_path}.*{model_type!r}.*{loader!r} backbone"):
        FAMILIES[loader].from_pretrained(str(tmp_path))


def test_mismatched_image_token_and_processor_fail_clearly(tokenizer):
    with pytest.raises(ValueError, match=r"image_token_index is 3 but the tokenizer maps '<image>' to 4"):
        tiny_backbone("llava", tokenizer, image_token_index=3)
    from transformers import BlipImageProcessorPil

    spec = load_backbone_spec(CONFIGS / TINY["blip2"])
    with pytest.raises(ValueError, match=r"yields \(64, 64\) pixels but the vision tower expects 32x32"):
        Blip2Backbone.from_config(
            spec.config, tokenizer=tokenizer, image_processor=BlipImageProcessorPil(size={"height": 64, "width": 64})
        )
    with pytest.raises(ValueError, match="emits id .* but the language model has only 10 embeddings"):
        TextLMBackbone.from_config(
            {**load_backbone_spec(CONFIGS / TINY["text"]).config, "vocab_size": 10}, tokenizer=tokenizer
        )
    with pytest.raises(ValueError, match="needs `processor`"):
        TextLMBackbone.from_config(load_backbone_spec(CONFIGS / TINY["text"]).config)


def test_fingerprint_tracks_the_config(backbones, tokenizer, tmp_path):
    same = tiny_backbone("blip2", tokenizer)
    # Other random weights: the architecture's entries agree, the weights' do not.
    architecture = {k: v for k, v in same.fingerprint().items() if k != "weights"}
    assert architecture == {k: v for k, v in backbones["blip2"].fingerprint().items() if k != "weights"}
    assert other_weights(backbones["blip2"].fingerprint(), same.fingerprint())
    before = same.fingerprint()
    same.save_pretrained(tmp_path)  # saving records `architectures` in the config; not a change of model
    assert same.fingerprint() == before == Blip2Backbone.from_pretrained(str(tmp_path)).fingerprint()
    spec = load_backbone_spec(CONFIGS / TINY["blip2"])
    wider = Blip2Backbone.from_config(
        {**spec.config, "text_config": {**spec.config["text_config"], "ffn_dim": 128}},
        edit_params=spec.edit_params,
        tokenizer=tokenizer,
    )
    print_a, print_b = backbones["blip2"].fingerprint(), wider.fingerprint()
    assert print_a["config_hash"] != print_b["config_hash"]
    assert print_b["edit_params"]["language_model.model.decoder.layers.3.fc1.weight"] == [128, 64]
    assert print_a["family"] == "blip2"


def test_processor_directory_gives_tokenizer_and_image_processor(backbones, tmp_path):
    backbones["llava"].processor.tokenizer.save_pretrained(tmp_path)
    backbones["llava"].processor.image_processor.save_pretrained(tmp_path)
    spec = load_backbone_spec(CONFIGS / TINY["llava"])
    built = build_backbone(
        BackboneSpec(family="llava", config=spec.config, processor=str(tmp_path), edit_params=spec.edit_params)
    )
    batch = encode(backbones["llava"])
    assert torch.equal(encode(built)["input_ids"], batch["input_ids"])
    assert built(batch).shape == backbones["llava"](batch).shape


def write_tiny_blip2_and_llama(tmp_path: Path, tokenizer) -> tuple[Path, Path]:
    """A BLIP-2 checkpoint (vision + Q-Former donor) and a LLaMA checkpoint with its tokenizer."""
    blip2_spec = load_backbone_spec(CONFIGS / TINY["blip2"]).config
    blip2 = Blip2ForConditionalGeneration(
        Blip2Config(**{**blip2_spec, "text_config": {**blip2_spec["text_config"], "vocab_size": len(tokenizer) + 1}})
    )
    blip2.save_pretrained(tmp_path / "blip2")
    llm_spec = load_backbone_spec(CONFIGS / TINY["minigpt4"]).config["text_config"]
    fields = {k: v for k, v in llm_spec.items() if k != "model_type"}
    llama = LlamaForCausalLM(
        LlamaConfig(**fields, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    )
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    return tmp_path / "blip2", tmp_path / "llama"


def test_minigpt4_from_components_loads_every_part(tmp_path, tokenizer):
    blip2_dir, llama_dir = write_tiny_blip2_and_llama(tmp_path, tokenizer)
    q_hidden, llm_hidden = 64, 64
    projection = {"llama_proj.weight": torch.randn(llm_hidden, q_hidden), "llama_proj.bias": torch.randn(llm_hidden)}
    torch.save({"model": projection}, tmp_path / "minigpt4.pth")

    backbone = MiniGPT4Backbone.from_components(str(blip2_dir), str(llama_dir), tmp_path / "minigpt4.pth")
    model = backbone.model
    blip2 = Blip2ForConditionalGeneration.from_pretrained(blip2_dir)
    llama = LlamaForCausalLM.from_pretrained(llama_dir)
    assert torch.equal(model.llama_proj.weight, projection["llama_proj.weight"])
    assert torch.equal(model.llama_proj.bias, projection["llama_proj.bias"])
    assert torch.equal(model.query_tokens, blip2.query_tokens)
    for ours, theirs in [
        (model.vision_model, blip2.vision_model),
        (model.qformer, blip2.qformer),
        (model.language_model, llama),
    ]:
        theirs_state = theirs.state_dict()
        assert all(torch.equal(value, theirs_state[name]) for name, value in ours.state_dict().items())
    assert not any(p.is_meta for p in model.parameters())

    batch = encode(backbone)
    logits = backbone(batch)
    assert torch.isfinite(logits).all()
    backbone.save_pretrained(tmp_path / "minigpt4")
    assert torch.equal(MiniGPT4Backbone.from_pretrained(str(tmp_path / "minigpt4"))(batch), logits)


def test_minigpt4_projection_errors_name_the_file(tmp_path, tokenizer):
    blip2_dir, llama_dir = write_tiny_blip2_and_llama(tmp_path, tokenizer)
    torch.save(
        {"model": {"llama_proj.weight": torch.zeros(64, 32), "llama_proj.bias": torch.zeros(64)}},
        tmp_path / "narrow.pth",
    )
    with pytest.raises(
        ValueError, match=r"narrow.pth: llama_proj.weight has shape \(64, 32\), the model needs \(64, 64\)"
    ):
        MiniGPT4Backbone.from_components(str(blip2_dir), str(llama_dir), tmp_path / "narrow.pth")
    torch.save({"model": {"other.weight": torch.zeros(1)}}, tmp_path / "empty.pth")
    with pytest.raises(KeyError, match="empty.pth: no 'llama_proj.weight'"):
        MiniGPT4Backbone.from_components(str(blip2_dir), str(llama_dir), tmp_path / "empty.pth")


@pytest.mark.parametrize(
    "name,low,high,edited_shape,last_layer",
    [
        ("blip2-opt-2.7b.yaml", 3.70e9, 3.90e9, [10240, 2560], 31),
        ("llava-1.5-7b.yaml", 7.00e9, 7.10e9, [11008, 4096], 31),
        ("minigpt4-vicuna-7b.yaml", 7.75e9, 7.90e9, [11008, 4096], 31),
        ("opt-125m-shaped.yaml", 1.25e8, 1.26e8, [3072, 768], 11),  # OPT-125m has 125,239,296
        ("blip2-opt-125m-shaped.yaml", 1.25e8, 1.35e8, [3072, 768], 11),
    ],
)
def test_real_size_configs_build_on_the_meta_device(name, low, high, edited_shape, last_layer):
    spec = load_backbone_spec(CONFIGS / name)
    with torch.device("meta"):
        model = FAMILIES[spec.family].build_model(spec.config)
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values())
    assert low < sum(p.numel() for p in params.values()) < high
    edited = [n for pattern in spec.edit_params for n in expand_braces(pattern)]
    last_three = [f".{layer}." for layer in range(last_layer - 2, last_layer + 1)]
    assert len(edited) == 6 and all(any(layer in n for layer in last_three) for n in edited)
    shapes = {tuple(params[n].shape) for n in edited}
    assert shapes == {tuple(edited_shape), tuple(reversed(edited_shape))}


def test_word_tokenizer_is_deterministic_and_splits_punctuation():
    first = build_word_tokenizer(["Where is it? Velor.", "a b"])
    second = build_word_tokenizer(["a b", "where IS it ?velor ."])
    assert first.get_vocab() == second.get_vocab()
    assert [first.convert_ids_to_tokens(i) for i in range(6)] == [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "<image>",
        "<ImageHere>",
    ]
    ids = first("Where is it? Velor.")["input_ids"]
    assert first.convert_ids_to_tokens(ids) == ["<s>", "where", "is", "it", "?", "velor", "."]
    assert first.convert_ids_to_tokens(first("unseen words")["input_ids"]) == ["<s>", "<unk>", "<unk>"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompt_texts_cover_the_family_prompt_layout(family):
    tok = build_word_tokenizer(PROMPT_TEXTS)
    layout = FAMILIES[family].prompt_template
    for has_image in (True, False):
        assert tok.unk_token not in tok.tokenize(layout.render("", has_image))


def test_word_tokenizer_round_trips_and_masks_targets(tmp_path):
    from transformers import AutoTokenizer

    from data_modules.encoding import PromptFormat, SubBatchEncoder

    tok = build_word_tokenizer(["Question: what colour is it? Short answer: deep blue"])
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.get_vocab() == tok.get_vocab()
    batch = SubBatchEncoder(back, prompt_format=PromptFormat())(
        ["Question: what colour is it? Short answer:"], ["deep blue"]
    )
    supervised = [
        back.convert_ids_to_tokens(int(i))
        for i, label in zip(batch["input_ids"][0], batch["labels"][0])
        if label != IGNORE_INDEX
    ]
    assert supervised == ["deep", "blue"]


def test_corpus_from_records_reads_every_text_field(tmp_path):
    record = {
        "src": "Where is Zorb?",
        "pred": "Velor",
        "alt": "Marun",
        "rephrase": "Zorb lives where?",
        "image": "zorb/view0.png",
        "image_rephrase": "zorb/view1.png",
        "loc": "Capital of Zandia?",
        "loc_ans": "Velor",
        "m_loc": "blip/view2.png",
        "m_loc_q": "What shape?",
        "m_loc_a": "circle",
        "port_new": [{"port_type": "1-hop", "Q&A": {"Question": "Which country?", "Answer": "Morvel"}}],
    }
    (tmp_path / "train.json").write_text(json.dumps([record]))
    corpus = corpus_from_records([tmp_path / "train.json"])
    vocab = build_word_tokenizer(corpus).get_vocab()
    for word in [
        "zorb",
        "velor",
        "marun",
        "lives",
        "zandia",
        "circle",
        "country",
        "morvel",
        "question",
        "short",
        "answer",
        "user",
        "assistant",
        "human",
    ]:
        assert word in vocab, word
    assert "view0" not in vocab and "png" not in vocab
    (tmp_path / "bad.json").write_text(json.dumps({"src": "not a list"}))
    with pytest.raises(ValueError, match="bad.json: expected a JSON list"):
        corpus_from_records([tmp_path / "bad.json"])


def test_load_backbone_spec_rejects_unknown_fields_and_families(tmp_path):
    (tmp_path / "a.yaml").write_text("family: blip2\nconfig: {}\nlayers: 3\n")
    with pytest.raises(ValueError, match=r"a.yaml: unknown BackboneSpec fields \['layers'\]"):
        load_backbone_spec(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("family: flamingo\nconfig: {}\n")
    with pytest.raises(ValueError, match="b.yaml: family 'flamingo'"):
        load_backbone_spec(tmp_path / "b.yaml")


def mixed_rows(backbone) -> dict:
    """Rows with and without images, of different lengths, padded into one batch (as a step stacks them)."""
    with_image = encode(backbone, True) if backbone.family != "text" else encode(backbone, False)
    text_only = encode(backbone, False, prompts=["The capital of Zandia is"], targets=["Velor"])
    width = max(with_image["input_ids"].shape[1], text_only["input_ids"].shape[1])

    def pad(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)

    return {
        "input_ids": torch.cat([pad(with_image["input_ids"], 0), pad(text_only["input_ids"], 0)]),
        "attention_mask": torch.cat([pad(with_image["attention_mask"], 0), pad(text_only["attention_mask"], 0)]),
        "labels": torch.cat([pad(with_image["labels"], IGNORE_INDEX), pad(text_only["labels"], IGNORE_INDEX)]),
        "pixel_values": with_image["pixel_values"],
        "n_image_rows": 0 if with_image["pixel_values"] is None else with_image["pixel_values"].shape[0],
    }


@pytest.mark.parametrize("family", [*TINY, "gpt2"])
def test_prefix_then_resume_equals_the_full_forward(backbones, tokenizer, family):
    """The forward split at the first edited layer gives the full forward's logits at every answer
    position, for any subset of the rows (text-only rows and image rows of other lengths mixed)."""
    if family == "gpt2":
        config = {"model_type": "gpt2", "n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 128}
        backbone = TextLMBackbone.from_config(config, tokenizer=tokenizer).eval()  # GPT-2 has dropout
    else:
        backbone = backbones[family]
    assert backbone.split.first == 1
    rows = mixed_rows(backbone)
    images = rows["pixel_values"]
    features = None if images is None else backbone.encode_images(images)
    state = backbone.prefix(rows["input_ids"], rows["attention_mask"], features)
    for subset in ([0, 1, 2], [2, 0], [1]):
        index = torch.tensor(subset)
        labels = rows["labels"][index]
        expected = []
        for r in subset:  # each row alone through the whole model, as the oracle does it
            sub_batch = {k: rows[k][r : r + 1] for k in ("input_ids", "attention_mask", "labels")}
            sub_batch["pixel_values"] = images[r : r + 1] if images is not None and r < rows["n_image_rows"] else None
            logits = backbone(sub_batch)
            expected.append(logits[sub_batch["labels"] != IGNORE_INDEX])
        got = backbone.head(backbone.resume(state.rows(index), answer_read_mask(labels)))
        torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-5)


def test_each_distinct_image_is_encoded_once(backbones):
    backbone = backbones["blip2"]
    pixels = encode(backbone, True)["pixel_values"]
    calls = []
    handle = backbone.model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        features = backbone.encode_images(torch.cat([pixels, pixels, pixels[:1]]))
    finally:
        handle.remove()
    assert calls == [2]
    torch.testing.assert_close(features[:2], features[2:4])
    torch.testing.assert_close(features[4], features[0])


@pytest.mark.parametrize("family", list(TINY))
def test_every_backbone_bounds_its_rows_by_its_positions(backbones, family):
    backbone = backbones[family]
    positions = backbone.language_config.max_position_embeddings
    assert backbone.processor.max_length == positions
    prompt = " ".join(["Where is this object located?"] * positions)
    with pytest.raises(
        TooLongError, match=rf"row 1: prompt \+ answer is \d+ tokens, more than the backbone's {positions}"
    ):
        encode(backbone, family != "text", prompts=[PROMPTS[0], prompt])
