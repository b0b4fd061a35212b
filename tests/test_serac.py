"""SERAC on tiny random-weight models: routing, memory lookup, classifier training, an untouched base."""

import dataclasses
import math

import pytest
import torch
import yaml
from conftest import TINY_BERT, quiet_trainer
from lightning import Trainer
from test_backbones import CONFIGS, TINY, draw_images, make_tokenizer
from torch.utils.data import DataLoader

from data_modules.datasets import EditCollator, EditExample
from data_modules.encoding import IGNORE_INDEX
from data_modules.word_tokenizer import PROMPT_TEXTS, build_word_tokenizer
from kedit_lightning.backbones import load_backbone_spec
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.serac import SERAC, SERACEncoder, with_answer_end
from kedit_lightning.evaluation import SUB_BATCH_OF, EditMetrics, evaluate_batch, record_batches
from kedit_lightning.modules.serac import ScopeEncoderSpec, SERACModule, balanced_bce

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


def answers(backbone, sub_batch) -> torch.Tensor:
    """The backbone's full forward at the answer positions: what an unedited row must give."""
    return backbone(sub_batch)[sub_batch["labels"] != IGNORE_INDEX]


def test_empty_memory_is_the_base_model(module, batch):
    model = module.editor.edited_model(module.backbone)
    keys = ("edit_inner", "loc", "loc_image")
    inputs = StepInputs(module.backbone, {key: batch[key] for key in keys})
    for key in keys:
        rows = inputs.rows(key)
        for groups in (None, torch.full((len(rows),), -1)):
            torch.testing.assert_close(model.answer_logits(inputs, rows, groups), answers(module.backbone, batch[key]))


def test_in_scope_goes_to_the_counterfactual_and_the_rest_to_the_base(tokenizer_dir):
    module = make_module(tokenizer_dir)
    batch = edit_batch(module)
    serac, backbone = module.editor, module.backbone
    inputs = StepInputs(backbone, {key: batch[key] for key in ("edit_inner", "edit_outer")})
    queries = inputs.rows("edit_outer")
    model = serac.edited_model(backbone)
    group = serac(model, inputs, inputs.rows("edit_inner")[:1])
    groups = group.expand(len(queries))
    # Put the threshold between the best and the worst input's score: some rows in scope, the others not.
    with torch.no_grad():
        scores = serac.classifier.score_all(model.scope, serac.read(inputs, queries).query, model.keys)[:, 0]
    serac.threshold = math.exp((scores.max() + scores.min()) / 2)
    in_scope, entry = model.route(serac.read(inputs, queries).query, groups)
    assert in_scope.any() and (~in_scope).any()
    assert (entry == 0).all()
    logits = model.answer_logits(inputs, queries, groups)
    labels = batch["edit_outer"]["labels"]
    positions = in_scope.unsqueeze(1).expand_as(labels)[labels != IGNORE_INDEX]
    base = answers(backbone, batch["edit_outer"])
    torch.testing.assert_close(logits[~positions], base[~positions])
    rows = in_scope.nonzero().flatten()
    read = serac.read(inputs, queries[rows])
    with torch.no_grad():
        cf_logits, cf_labels = serac.counterfactual(
            model.counterfactual.rows(torch.zeros_like(rows)),
            read.counterfactual,
            read.counterfactual_labels,
            read.image_tokens,
            read.has_image,
        )
    torch.testing.assert_close(logits[positions], cf_logits[cf_labels != IGNORE_INDEX])
    assert not torch.equal(logits[positions], base[positions])


def test_memory_with_many_edits_returns_the_right_entry(module, monkeypatch):
    torch.manual_seed(1)
    words = ["Velor", "Marun", "red", "blue", "green", "Zandia", "object", "colour", "city", "capital"]
    prompts = [f"{a} {b} {c} ?" for a in words[:6] for b in words[4:] for c in words[:3]][:40]
    encoder, red, blue = module.input_processor(), *draw_images()
    edits = encoder(prompts, ["Velor"] * len(prompts), [red if i % 3 else blue for i in range(len(prompts))])
    serac = module.editor
    monkeypatch.setattr(
        serac, "recency_margin", 0.0
    )  # the best entry, even where random weights put others close to it
    model = serac.edited_model(module.backbone)
    inputs = StepInputs(module.backbone, {"edits": edits}, prefix=False)
    group = serac(model, inputs, torch.arange(16), batched=True)
    for start in range(16, len(prompts), 16):  # added in several calls, each on top of the last
        rows = torch.arange(start, min(start + 16, len(prompts)))
        group = serac(model, inputs, rows, on_top_of=group[:1].expand(len(rows)), batched=True)
    assert len(model) == len(prompts)
    order = torch.randperm(len(prompts))
    _, entry = model.route(serac.read(inputs, order).descriptor, group[:1].expand(len(prompts)))
    assert torch.equal(entry, order)


def test_cross_encoder_scores_every_pair_as_it_scores_one(tokenizer_dir):
    module = make_module(tokenizer_dir, classifier="cross")
    batch = edit_batch(module)
    serac = module.editor
    inputs = StepInputs(module.backbone, {key: batch[key] for key in ("edit_inner", "loc_image")}, prefix=False)
    edits = serac.read(inputs, inputs.rows("edit_inner")).descriptor
    queries = serac.read(inputs, inputs.rows("loc_image")).query
    every = serac.classifier.score_all(edits, queries)
    n = queries.has_image.shape[0]
    for e in range(n):
        one = serac.classifier(edits.rows(torch.full((n,), e)), queries)
        torch.testing.assert_close(every[:, e], one, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("classifier", ["distance", "cosine", "cross"])
def test_classifier_loss_falls_and_the_base_stays_untouched(tokenizer_dir, tmp_path, classifier):
    module = make_module(tokenizer_dir, classifier=classifier, hard_negatives=classifier != "cross")
    batch = edit_batch(module)
    base_before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    projection_before = {k: v.clone() for k, v in module.editor.counterfactual.image_projection.state_dict().items()}

    def classifier_loss() -> float:
        module.eval()
        with torch.no_grad():
            return float(module._classifier_loss(module.read_step(batch), batch)[0])

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
    # The published loss weights: cloc 1, cedit 0.1.
    logged = trainer.callback_metrics
    expected = logged["train/loss_classifier"] + 0.1 * logged["train/loss_counterfactual"]
    assert float(logged["train/loss"]) == pytest.approx(float(expected), rel=1e-5)
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


def test_the_counterfactual_model_learns_to_end_its_answers(tokenizer_dir, tmp_path):
    """Trained on answers followed by the end-of-sequence token, the counterfactual model's greedy continuation
    of a rephrase, given its edit, is the answer and then the end: generation stops there instead of running on."""
    module = make_module(tokenizer_dir)
    batch = edit_batch(module)
    end = module.backbone.processor.tokenizer.eos_token_id
    assert module.answer_end_id() == end is not None

    def predicted_ends() -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher-forced argmax and the labels at each rephrase's answer positions and the one after them."""
        inputs = module.read_step(batch)
        query = inputs["edit_outer"]
        tokens, labels = with_answer_end(query.counterfactual, query.counterfactual_labels, end)
        assert ((labels == end).sum(1) == 1).all() and (labels[:, -1] != IGNORE_INDEX).any()
        with torch.no_grad():
            logits, labels = module.editor.counterfactual(inputs["edit_inner"].counterfactual, tokens, labels)
        answer = labels != IGNORE_INDEX
        return logits[answer].argmax(-1), labels[answer]

    before, labels = predicted_ends()
    assert not torch.equal(before[labels == end], labels[labels == end])  # a random model does not end them already
    trainer = quiet_trainer(max_steps=60, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 60, batch_size=None, collate_fn=lambda item: item))
    after, labels = predicted_ends()
    assert torch.equal(after, labels)  # every answer token, then the end


def test_balanced_bce_is_the_mean_loss_of_each_side_summed():
    # In-scope probabilities 0.9 (nine times) and 0.5; out-of-scope ones 0.2 and 0.6: each side's mean counts once.
    positives = torch.tensor([0.9] * 9 + [0.5]).log()
    negatives = torch.tensor([0.2, 0.6]).log()
    expected = -(9 * math.log(0.9) + math.log(0.5)) / 10 - (math.log(0.8) + math.log(0.4)) / 2  # = 0.7339
    assert float(balanced_bce(positives, negatives)) == pytest.approx(expected, rel=1e-6)
    # Nine more copies of a positive change nothing: the sides are weighed equally, not by count.
    assert float(balanced_bce(positives[-1:], negatives)) == pytest.approx(-math.log(0.5) + 0.5697171, rel=1e-6)
    # A negative the classifier is sure of (p = 1) costs -log(eps), finite.
    assert torch.isfinite(balanced_bce(positives, torch.zeros(1)))


def test_answers_the_counterfactual_splits_differently_are_refused(module):
    other = build_word_tokenizer(["zzz Velor Marun blue", *PROMPT_TEXTS])
    counterfactual = type(module.input_processor().counterfactual)(other)
    encoder = SERACEncoder(module.backbone.processor, module.input_processor().scope_tokenizer, counterfactual)
    with pytest.raises(ValueError, match="answer 'Velor'.*same answer tokens"):
        encoder(["Where is this object located?"], ["Velor"], draw_images()[:1])


def oracle_metrics(module: SERACModule, batch: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The old straightforward way: each record alone, its edit the only memory entry, each sub-batch read
    on its own, scored pair by pair and routed row by row (full forwards, no shared inputs).
    The report (with the fraction of rows routed to the edit, per metric's sub-batch), and the post-edit
    answer logits per sub-batch (records in order)."""
    serac, backbone = module.editor, module.backbone
    metrics, every_post = EditMetrics(), {name: [] for name in SUB_BATCH_OF.values()}
    sent = {key: [] for key in SUB_BATCH_OF}
    for record in record_batches(batch):
        post, pre, labels, routed_rows = {}, {}, {}, {}
        for name in SUB_BATCH_OF.values():
            sub_batch = record[name]
            inputs = StepInputs(backbone, {"edit": record["edit_inner"], "query": sub_batch}, prefix=False)
            edit, query = serac.read(inputs, inputs.rows("edit")), serac.read(inputs, inputs.rows("query"))
            base = answers(backbone, sub_batch)
            with torch.no_grad():
                in_scope = serac.classifier(edit.descriptor, query.query).exp() >= serac.threshold
                if bool(in_scope):
                    cf_logits, cf_labels = serac.counterfactual(
                        edit.counterfactual, query.counterfactual, query.counterfactual_labels, query.image_tokens
                    )
                    routed = cf_logits[cf_labels != IGNORE_INDEX]
                    routed = torch.nn.functional.pad(
                        routed, (0, base.shape[-1] - routed.shape[-1]), value=torch.finfo(routed.dtype).min
                    )
            post[name], pre[name], labels[name] = (routed if bool(in_scope) else base), base, sub_batch["labels"]
            routed_rows[name] = bool(in_scope)
            every_post[name].append(post[name])
        metrics.update(labels, post, pre)
        for key, name in SUB_BATCH_OF.items():
            sent[key].append(routed_rows[name])
    report = metrics.compute()
    in_scope = [r for key in ("reliability", "t_generality", "i_generality") for r in sent[key]]
    out_of_scope = sent["t_locality"] + sent["i_locality"]
    report["scope"] = {
        **{key: sum(rows) / len(rows) for key, rows in sent.items()},
        "recall": sum(in_scope) / len(in_scope),
        "fp_rate": sum(out_of_scope) / len(out_of_scope),
    }
    return report, {name: torch.cat(logits) for name, logits in every_post.items()}


def test_batched_evaluation_matches_each_record_alone(tokenizer_dir):
    module = make_module(tokenizer_dir)
    batch = edit_batch(module)
    serac, backbone = module.editor, module.backbone
    # Threshold in the widest gap between the scores of every (edit, input) pair: some inputs in scope, the
    # others not, none of them near the threshold.
    inputs = StepInputs(backbone, {key: batch[key] for key in SUB_BATCH_OF.values()}, prefix=False)
    edits = serac.read(inputs, inputs.rows("edit_inner")).descriptor
    with torch.no_grad():
        scores = serac.classifier.score_all(edits, serac.read(inputs, inputs.rows(*SUB_BATCH_OF.values())).query)
    ordered = scores.flatten().sort().values
    cut = int(ordered.diff().argmax())
    serac.threshold = math.exp(float(ordered[cut : cut + 2].mean()))
    metrics = EditMetrics()
    post = evaluate_batch(serac, backbone, batch, metrics)
    oracle, oracle_post = oracle_metrics(module, batch)
    for name, logits in oracle_post.items():
        torch.testing.assert_close(post[name], logits, rtol=1e-4, atol=1e-4)
    # Both sides of the threshold were taken: some locality input answered by the counterfactual model.
    report = metrics.compute()
    assert min(report["t_locality"], report["i_locality"]) < 1.0
    assert report.keys() == oracle.keys()
    assert 0 < report["scope"]["fp_rate"] and report["scope"]["recall"] > 0
    for key, value in report.items():
        assert value == pytest.approx(oracle[key], abs=1e-6), key


def test_rows_route_only_to_their_own_groups_entries(tokenizer_dir):
    module = make_module(tokenizer_dir)
    # Record 0's rephrase is record 2's prompt: routed over the whole memory it would go to record 2's edit.
    batch = edit_batch(module)
    serac, backbone = module.editor, module.backbone
    with torch.no_grad():
        serac.classifier.scale.zero_()  # everything in scope of every entry (p = 1): only the groups decide
    inputs = StepInputs(backbone, {key: batch[key] for key in ("edit_inner", "edit_outer")})
    model = serac.edited_model(backbone)
    groups = serac(model, inputs, inputs.rows("edit_inner"))
    queries = inputs.rows("edit_outer")
    in_scope, entry = model.route(serac.read(inputs, queries).query, groups)
    assert in_scope.all()
    assert torch.equal(entry, torch.arange(len(EDITS)))
    logits = model.answer_logits(inputs, queries, groups)
    for record in range(len(EDITS)):
        alone = serac.edited_model(backbone)
        group = serac(alone, inputs, inputs.rows("edit_inner")[record : record + 1])
        expected = alone.answer_logits(inputs, queries[record : record + 1], group)
        start = int(inputs.answer_counts(queries[:record]).sum())
        torch.testing.assert_close(logits[start : start + expected.shape[0]], expected)


def test_deep_chains_route_as_a_plain_walk_over_every_entry(module):
    """A memory of sequential edits (each group on top of the last) and a side branch, routed in one
    matrix op, against a plain oracle: each (input, entry) pair scored on its own, entries filtered by
    walking the input's chain, the newest within the margin of the best; again after dropping the newest groups."""
    words = ["Velor", "Marun", "red", "blue", "green", "Zandia", "object", "colour", "city", "capital"]
    prompts = [f"{a} {b} {c} ?" for a in words[:5] for b in words[5:] for c in words[2:5]][:48]
    encoder, red, blue = module.input_processor(), *draw_images()
    edits = encoder(prompts, ["Velor"] * len(prompts), [red if i % 3 else blue for i in range(len(prompts))])
    serac = module.editor
    model = serac.edited_model(module.backbone)
    inputs = StepInputs(module.backbone, {"edits": edits}, prefix=False)
    head = torch.tensor([-1])
    for row in range(40):  # 40 sequential edits: chains up to 40 groups deep
        head = serac(model, inputs, torch.tensor([row]), on_top_of=head)
    side = serac(model, inputs, torch.arange(40, 48), on_top_of=torch.full((8,), 9))  # 8 branches off edit 10

    def oracle(queries: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        read = serac.read(inputs, queries).query
        entries = serac.read(inputs, torch.arange(48))
        best, best_entry = [], []
        for x, group in enumerate(groups.tolist()):
            chain = set(model.chains(torch.tensor([group]))[0].tolist())
            allowed = [e for e in range(len(model)) if int(model.entry_groups[e]) in chain]
            with torch.no_grad():
                scores = torch.stack(
                    [
                        serac.classifier(entries.descriptor.rows(torch.tensor([e])), read.rows(torch.tensor([x])))[0]
                        for e in allowed
                    ]
                )
            best.append(float(scores.max()))
            best_entry.append(max(e for e, s in zip(allowed, scores) if s >= scores.max() - serac.recency_margin))
        return torch.tensor(best), torch.tensor(best_entry)

    queries = torch.randperm(48, generator=torch.Generator().manual_seed(0))[:12]
    groups = torch.cat([head.expand(4), side[:4], torch.tensor([0, 5, 9, 20])])
    serac.threshold = 0.5
    in_scope, entry = model.route(serac.read(inputs, queries).query, groups)
    best, best_entry = oracle(queries, groups)
    assert torch.equal(entry, best_entry)
    assert torch.equal(in_scope, best >= math.log(0.5))
    model.drop_after(25)  # edits 26..40 and the branches are gone
    assert len(model) == 25 and torch.equal(model.entry_groups, torch.arange(25))
    groups = torch.tensor([24, 24, 3, 10])
    _, entry = model.route(serac.read(inputs, queries[:4]).query, groups)
    assert torch.equal(entry, oracle(queries[:4], groups)[1])


def test_old_artifacts_embedding_classifier_rebuilds_as_cosine(module, tokenizer_dir):
    serac = module.editor
    config = {**serac.config, "kind": "cosine"}
    cosine = SERAC.from_config(config)
    old = SERAC.from_config({**config, "kind": "embedding"})  # what artifacts before `distance` hold
    assert old.classifier.kind == "cosine"
    old.load_state_dict(cosine.state_dict())  # strict: the same parameters
    before_options = {k: v for k, v in config.items() if k not in ("kind", "scope_target")}
    assert SERAC.from_config(before_options).classifier.kind == "cosine"
    assert SERAC.from_config(before_options).scope_target  # the classifier read prompt + new answer then
    with pytest.raises(ValueError, match="scope classifier must be one of distance, cosine, cross, got 'knn'"):
        SERAC.from_config({**config, "kind": "knn"})
    with pytest.raises(ValueError, match="classifier 'embedding' is now called 'cosine'"):
        make_module(tokenizer_dir, classifier="embedding")


@pytest.mark.parametrize("scope_target", [False, True])
def test_a_memory_entry_reads_as_its_prompt_unless_the_target_is_asked_for(module, batch, scope_target):
    serac = module.editor
    serac.scope_target = scope_target
    try:
        inputs = StepInputs(module.backbone, {"edit": batch["edit_inner"]}, prefix=False)
        descriptor = serac.read(inputs, inputs.rows("edit")).descriptor.text
    finally:
        serac.scope_target = False
    tokenizer = module.input_processor().scope_tokenizer
    texts = [f"{p} {t}" if scope_target else p for p, t, *_ in EDITS]
    expected = tokenizer(texts, padding=True, return_tensors="pt")
    torch.testing.assert_close(descriptor.ids, expected["input_ids"])
    torch.testing.assert_close(descriptor.mask, expected["attention_mask"])


@pytest.mark.parametrize("edit_prompt_positive", [False, True])
def test_positives_are_the_rephrases_unless_asked(tokenizer_dir, edit_prompt_positive):
    module = make_module(tokenizer_dir, edit_prompt_positive=edit_prompt_positive)
    batch = edit_batch(module)
    inputs = module.read_step(batch)
    classifier, edits = module.editor.classifier, inputs["edit_inner"].descriptor
    with torch.no_grad():
        loss, _ = module._classifier_loss(inputs, batch)
        scores = {key: classifier(edits, inputs[key].query) for key in inputs}
    positive_keys = ["edit_outer", "edit_outer_image"] + (["edit_inner"] if edit_prompt_positive else [])
    positives = torch.cat([scores[key] for key in positive_keys])
    negatives = torch.cat([scores["loc"], scores["loc_image"]])
    # By hand: the mean -log p of the positives plus the mean -log(1 - p) of the negatives.
    expected = -positives.mean() - torch.log(1 - negatives.exp()).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


def test_hard_negatives_are_the_other_facts_of_the_batch_also_of_the_same_subject(module):
    """Text records: another relation of the same country is a negative; another record of the same fact (its
    own prompt or old answer) is not."""
    metas = [
        {"prompt": "The capital of Poland is", "pred": "Warsaw"},
        {"prompt": "The official language of Poland is", "pred": "Polish"},
        {"prompt": "Poland's capital is the city of", "pred": "Warsaw"},
        {"prompt": "The capital of Poland is", "pred": "the capital of"},
    ]
    negative = module._other_subjects({"meta": metas}, len(metas)).tolist()
    assert negative[1][0] and negative[0][1]
    assert not negative[2][0] and not negative[3][0] and not negative[0][0]


@pytest.mark.parametrize("config", sorted((CONFIGS.parent / "serac").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_serac_config_trains_the_classifier_on_the_batchs_other_facts(config):
    """Without them the classifier never sees a negative about the edit's own subject: trained so on SmolLM2's
    real facts, it scored every fact of a country in scope of every other (p ~0.99), and after 49 sequential
    edits the newest entry about a country answered all its facts (Rel 0.724; with them 0.959, 1.000 at the
    config's recency margin 0.1)."""
    init_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert init_args.get("hard_negatives") is True


def test_a_later_edit_of_the_same_fact_wins_for_its_prompt_rephrase_and_other_picture(module):
    """Edit A -> x, then A -> y on top: A's prompt, rephrase and other picture answer as with A -> y alone."""
    serac, backbone = module.editor, module.backbone
    red, blue = draw_images()
    encoder = module.input_processor()
    prompt, rephrase = "Where is this object located?", "Which city is this object in?"
    edits = encoder([prompt, prompt], ["Velor", "Marun"], [red, red])
    queries = encoder([prompt, rephrase, prompt], ["Marun"] * 3, [red, red, blue])
    inputs = StepInputs(backbone, {"edits": edits, "queries": queries})
    rows = inputs.rows("queries")
    model = serac.edited_model(backbone)
    head = serac(model, inputs, inputs.rows("edits")[:1])
    head = serac(model, inputs, inputs.rows("edits")[1:], on_top_of=head)
    _, entry = model.route(serac.read(inputs, rows).query, head.expand(3))
    assert entry.tolist() == [1, 1, 1]
    alone = serac.edited_model(backbone)
    group = serac(alone, inputs, inputs.rows("edits")[1:])
    torch.testing.assert_close(
        model.answer_logits(inputs, rows, head.expand(3)), alone.answer_logits(inputs, rows, group.expand(3))
    )


@pytest.mark.parametrize("gap, newest", [(0.5, True), (2.0, False)])
def test_an_older_entry_wins_only_when_it_scores_past_the_margin(tokenizer_dir, gap, newest):
    """The query is the older entry's own prompt (distance 0); the newer entry's distance is scaled to
    `gap` times the margin: within it the newer entry wins, past it the older one."""
    module = make_module(tokenizer_dir)
    serac, backbone = module.editor, module.backbone
    red, _ = draw_images()
    edits = module.input_processor()(
        ["Where is this object located?", "What colour is the object?"], ["Velor"] * 2, [red, red]
    )
    inputs = StepInputs(backbone, {"edits": edits})
    model = serac.edited_model(backbone)
    head = serac(model, inputs, torch.tensor([0]))
    head = serac(model, inputs, torch.tensor([1]), on_top_of=head)
    query = serac.read(inputs, torch.tensor([0])).query
    with torch.no_grad():
        distance = -serac.classifier.score_all(model.scope, query, model.keys)[0]
        assert distance[0] < 1e-4 < distance[1]
        serac.classifier.scale.fill_(gap * serac.recency_margin / float(distance[1]))
    _, entry = model.route(query, head)
    assert entry.tolist() == ([1] if newest else [0])
