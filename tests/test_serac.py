"""SERAC on tiny random-weight models: routing, memory lookup, classifier training, an untouched base."""

import dataclasses

import pytest
import torch
from lightning import Trainer
from test_backbones import CONFIGS, TINY, draw_images, make_tokenizer
from torch.utils.data import DataLoader

from data_modules.datasets import EditCollator, EditExample
from data_modules.encoding import IGNORE_INDEX
from data_modules.word_tokenizer import PROMPT_TEXTS, build_word_tokenizer
from kedit_lightning.backbones import load_backbone_spec
from kedit_lightning.editors.serac import EditMemory, Router, SERACEncoder, Tokens
from kedit_lightning.modules.serac import ScopeEncoderSpec, SERACModule, balanced_bce

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
# (prompt, new answer, rephrase, text-only locality prompt and answer, image locality question and answer)
EDITS = [
    (
        "Where is this object located?",
        "Velor",
        "Which city is this object in?",
        "The capital of Zandia is",
        "Marun",
        "What colour is the object?",
        "red",
    ),
    (
        "What colour is the object?",
        "blue",
        "Which colour is this object?",
        "Where is Zandia?",
        "Velor",
        "Where is this object located?",
        "Marun",
    ),
    (
        "Which city is this object in?",
        "Marun",
        "Where is this object located?",
        "The capital of Zandia is",
        "Velor",
        "What colour is the object?",
        "blue",
    ),
    (
        "Which colour is this object?",
        "green",
        "What colour is the object?",
        "Where is Zandia?",
        "Marun",
        "Which city is this object in?",
        "Velor",
    ),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer().save_pretrained(path)
    return str(path)


def make_module(tokenizer_dir: str, **kwargs) -> SERACModule:
    torch.manual_seed(0)
    backbone = dataclasses.replace(load_backbone_spec(CONFIGS / TINY["blip2"]), processor=tokenizer_dir)
    counterfactual = dataclasses.replace(load_backbone_spec(CONFIGS / TINY["text"]), processor=tokenizer_dir)
    scope = ScopeEncoderSpec(config=TINY_BERT, tokenizer=tokenizer_dir)
    module = SERACModule(backbone, counterfactual, scope, lr=3e-3, classifier_lr=3e-3, **kwargs)
    module.configure_model()
    return module


def edit_batch(module: SERACModule, edits=EDITS) -> dict:
    red, blue = draw_images()
    examples = [
        EditExample(
            prompt=p,
            rephrase=r,
            target=t,
            image=red if i % 2 else blue,
            image_rephrase=red if i % 2 else blue,
            loc_prompt=lp,
            loc_target=la,
            m_loc_prompt=mq,
            m_loc_target=ma,
            m_loc_image=blue if i % 2 else red,
            port=[],
            meta={"prompt": p, "pred": "", "alt": t, "image": f"view{i}.png", "index": i},
        )
        for i, (p, t, r, lp, la, mq, ma) in enumerate(edits)
    ]
    return EditCollator(module.input_processor())(examples)


@pytest.fixture(scope="module")
def module(tokenizer_dir):
    return make_module(tokenizer_dir)


@pytest.fixture(scope="module")
def batch(module):
    return edit_batch(module)


def test_empty_memory_is_the_base_model(module, batch):
    router = Router(module.editor, module.backbone, module.editor.memory(module.backbone))
    for key in ("edit_inner", "loc", "loc_image"):
        assert torch.equal(router(batch[key]), module.backbone(batch[key]))


def test_in_scope_goes_to_the_counterfactual_and_the_rest_to_the_base(module, batch):
    serac, backbone = module.editor, module.backbone
    edit = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch["edit_inner"].items()}
    queries = batch["edit_outer"]
    memory = serac.memory(backbone, edit)
    classifier = serac.classifier
    # Put the threshold between the best and the worst input's score: some rows in scope, the others not.
    with torch.no_grad():
        scores, _ = memory.lookup(serac.read(backbone, queries).query)
        classifier.bias -= (scores.max() + scores.min()) / 2
        memory = serac.memory(backbone, edit)
    router = Router(serac, backbone, memory)
    inputs = serac.read(backbone, queries)
    in_scope, entry = router.route(inputs)
    assert in_scope.any() and (~in_scope).any()
    assert (entry == 0).all()
    logits, base = router(queries), backbone(queries)
    assert torch.equal(logits[~in_scope], base[~in_scope])
    rows = in_scope.nonzero().flatten()
    with torch.no_grad():
        cf_logits, cf_labels = serac.counterfactual(
            Tokens.of(edit, "cf").rows(torch.zeros_like(rows)),
            inputs.counterfactual.rows(rows),
            inputs.counterfactual_labels[rows],
            inputs.image_tokens[rows],
        )
    answer = queries["labels"][rows] != IGNORE_INDEX
    torch.testing.assert_close(logits[rows][answer], cf_logits[cf_labels != IGNORE_INDEX])
    assert not torch.equal(logits[rows][answer], base[rows][answer])
    assert (logits[rows][~answer] == 0).all()


def test_memory_with_many_edits_returns_the_right_entry(module):
    torch.manual_seed(1)
    words = ["Velor", "Marun", "red", "blue", "green", "Zandia", "object", "colour", "city", "capital"]
    prompts = [f"{a} {b} {c} ?" for a in words[:6] for b in words[4:] for c in words[:3]][:40]
    encoder, red, blue = module.input_processor(), *draw_images()
    edits = encoder(prompts, ["Velor"] * len(prompts), [red if i % 3 else blue for i in range(len(prompts))])
    serac = module.editor
    memory = EditMemory(serac.classifier)
    inputs = serac.read(module.backbone, edits)
    for start in range(0, len(prompts), 16):  # added in several calls
        rows = torch.arange(start, min(start + 16, len(prompts)))
        memory.add(inputs.descriptor.rows(rows), inputs.counterfactual.rows(rows))
    assert len(memory) == len(prompts)
    order = torch.randperm(len(prompts))
    _, entry = memory.lookup(inputs.descriptor.rows(order))
    assert torch.equal(entry, order)
    memory.clear()
    assert len(memory) == 0


def test_cross_encoder_scores_every_pair_as_it_scores_one(tokenizer_dir):
    module = make_module(tokenizer_dir, classifier="cross")
    batch = edit_batch(module)
    serac = module.editor
    edits, queries = (
        serac.read(module.backbone, batch["edit_inner"]).descriptor,
        serac.read(module.backbone, batch["loc_image"]).query,
    )
    every = serac.classifier.score_all(edits, queries)
    n = queries.has_image.shape[0]
    for e in range(n):
        one = serac.classifier(edits.rows(torch.full((n,), e)), queries)
        torch.testing.assert_close(every[:, e], one, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("classifier", ["embedding", "cross"])
def test_classifier_loss_falls_and_the_base_stays_untouched(tokenizer_dir, tmp_path, classifier):
    module = make_module(tokenizer_dir, classifier=classifier, hard_negatives=classifier == "embedding")
    batch = edit_batch(module)
    base_before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    projection_before = {k: v.clone() for k, v in module.editor.counterfactual.image_projection.state_dict().items()}

    def classifier_loss() -> float:
        module.eval()
        with torch.no_grad():
            inputs = {key: module.editor.read(module.backbone, batch[key]) for key in batch if key != "meta"}
            return float(module._classifier_loss(inputs, batch)[0])

    before = classifier_loss()
    trainer = Trainer(
        max_steps=40,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        inference_mode=False,
        default_root_dir=tmp_path,
    )
    loader = DataLoader([batch] * 40, batch_size=None, collate_fn=lambda item: item)
    trainer.fit(
        module,
        train_dataloaders=loader,
        val_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda item: item),
    )
    after = classifier_loss()
    assert after < 0.5 * before, (before, after)
    assert {
        "train/loss_classifier",
        "train/loss_counterfactual",
        "val/reliability",
        "val/i_locality",
        "val/score",
    } <= set(trainer.callback_metrics)
    assert all(torch.equal(v, base_before[k]) for k, v in module.backbone.state_dict().items())
    # The counterfactual model's image projection learns (the public multimodal SERAC leaves it at random init).
    assert not all(
        torch.equal(v, projection_before[k])
        for k, v in module.editor.counterfactual.image_projection.state_dict().items()
    )
    trainer.save_checkpoint(tmp_path / "serac.ckpt")
    saved = torch.load(tmp_path / "serac.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith("backbone.") for k in saved)
    assert any(k.startswith("editor.classifier.") for k in saved) and any(
        k.startswith("editor.counterfactual.") for k in saved
    )


def test_balanced_bce_weighs_both_sides_equally():
    many, few = torch.full((9,), 2.0), torch.full((1,), -2.0)
    assert torch.isclose(balanced_bce(many, few), balanced_bce(many[:1], few))


def test_answers_the_counterfactual_splits_differently_are_refused(module):
    other = build_word_tokenizer(["zzz Velor Marun blue", *PROMPT_TEXTS])
    counterfactual = type(module.input_processor().counterfactual)(other)
    encoder = SERACEncoder(module.backbone.processor, module.input_processor().scope_tokenizer, counterfactual)
    with pytest.raises(ValueError, match="answer 'Velor'.*same answer tokens"):
        encoder(["Where is this object located?"], ["Velor"], draw_images()[:1])
