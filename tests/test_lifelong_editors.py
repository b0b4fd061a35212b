"""GRACE and WISE on every backbone family: an edit's reach (deferral radius, routing), sequences, and the
edited-model semantics (fold, unedited, drop_after, restore). Expected keys and scores come from plain
forward hooks on the backbone, never from the editors' own code."""

import pytest
import torch
from test_backbones import CONFIGS, MULTIMODAL, TINY, draw_images, tiny_backbone

from data_modules.encoding import IGNORE_INDEX
from data_modules.word_tokenizer import PROMPT_TEXTS, build_word_tokenizer
from kedit_lightning.artifact import EDITORS, ArtifactError, check_editor_values
from kedit_lightning.backbones import FAMILIES, load_backbone_spec
from kedit_lightning.editor import Editor
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.grace import GRACE
from kedit_lightning.editors.wise import WISE, ties_merge

NAMES = [f"place{i}" for i in range(20)]
ANSWERS = [f"answer{i}" for i in range(20)]
CORPUS = [
    "Where is this object located? What colour is the object? red blue green yellow Velor Marun",
    "The capital of Zandia is Velor. Question: Short answer:",
    " ".join(NAMES + ANSWERS),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer([*CORPUS, *PROMPT_TEXTS])


def backbone_of(family: str, tokenizer):
    torch.manual_seed(0)
    return tiny_backbone(family, tokenizer).eval()


def edit_and_far(backbone) -> dict:
    """An edit (with an image on image families) and a far text prompt, one row each."""
    image = None if backbone.family == "text" else draw_images()[:1]
    return {
        "edit": backbone.processor(["Where is this object located?"], ["Marun"], image),
        "far": backbone.processor(["The capital of Zandia is"], ["Velor"], None),
    }


def layer_input(backbone, sub_batch: dict, module_name: str) -> torch.Tensor:
    """[T, in]: what the named module reads for a one-row sub-batch, from a plain full forward."""
    seen = []
    handle = backbone.model.get_submodule(module_name).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            backbone.model_logits(sub_batch["input_ids"], sub_batch["attention_mask"], sub_batch.get("pixel_values"))
    finally:
        handle.remove()
    return seen[0].reshape(sub_batch["input_ids"].shape[1], -1)


def last_prompt_token(sub_batch: dict) -> int:
    return int((sub_batch["labels"][0] != IGNORE_INDEX).nonzero()[0]) - 1


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def answers(model, inputs: StepInputs, name: str, groups=None) -> torch.Tensor:
    rows = inputs.rows(name)
    with torch.no_grad():
        return model.answer_logits(inputs, rows, None if groups is None else groups[: len(rows)])


@pytest.mark.parametrize("family", sorted(TINY))
def test_grace_edit_reaches_its_prompt_not_a_far_one(family, tokenizer):
    backbone = backbone_of(family, tokenizer)
    sub_batches = edit_and_far(backbone)
    weight = backbone.edit_param_names[-1]
    edit_key = layer_input(backbone, sub_batches["edit"], module_of(weight))[last_prompt_token(sub_batches["edit"])]
    far_key = layer_input(backbone, sub_batches["far"], module_of(weight))[last_prompt_token(sub_batches["far"])]
    gap = float((edit_key - far_key).norm())
    inputs = StepInputs(backbone, sub_batches)
    pre = {name: answers(GRACE().edited_model(backbone), inputs, name) for name in sub_batches}
    for radius, far_changes in ((gap / 2, False), (gap * 2, True)):
        torch.manual_seed(0)
        grace = GRACE(n_iter=50, eps=radius)
        model = grace.edited_model(backbone)
        assert model.name == weight  # the FFN output matrix of the top edited layer
        group = grace(model, inputs, inputs.rows("edit"))
        target = sub_batches["edit"]["labels"][sub_batches["edit"]["labels"] != IGNORE_INDEX]
        assert torch.equal(answers(model, inputs, "edit", group).argmax(-1), target)
        far = answers(model, inputs, "far", group)
        # Outside the deferral radius the far prompt is answered by the unedited layer, bit for bit.
        assert torch.equal(far, pre["far"]) != far_changes
        assert not torch.equal(answers(model, inputs, "edit", group), pre["edit"])


def test_grace_keeps_twenty_sequential_edits(tokenizer):
    backbone = backbone_of("text", tokenizer)
    grace = GRACE(n_iter=30)
    editor = Editor({"method": "grace", "backbone_fingerprint": backbone.fingerprint()}, "grace", grace)
    session = editor.start(backbone)
    edits = [backbone.processor([f"Where is {n}?"], [a], None) for n, a in zip(NAMES, ANSWERS)]
    torch.manual_seed(0)
    for number, sub_batch in enumerate(edits):
        session.add(sub_batch, f"edit {number}", "stopped")
    inputs = StepInputs(backbone, {str(i): sub_batch for i, sub_batch in enumerate(edits)})
    rows = inputs.rows(*map(str, range(len(edits))))
    with torch.no_grad():
        got = session.model.answer_logits(inputs, rows, torch.full((len(rows),), session.head)).argmax(-1)
    want = torch.cat([sub_batch["labels"][sub_batch["labels"] != IGNORE_INDEX] for sub_batch in edits])
    assert torch.equal(got, want)
    assert session.n_edits == 20


def wise_scores(backbone, sub_batches: dict, model) -> dict[str, float]:
    """Each one-row sub-batch's activation score under the first group's side memory, from a plain forward."""
    scores = {}
    for name, sub_batch in sub_batches.items():
        x = layer_input(backbone, sub_batch, module_of(model.name))
        scores[name] = float((x @ model.deltas[0]).norm(dim=-1).mean())
    return scores


@pytest.mark.parametrize("family", sorted(TINY))
def test_wise_routes_far_prompts_to_the_main_memory(family, tokenizer):
    backbone = backbone_of(family, tokenizer)
    # Text-only prompts: with random weights, image tokens' activations dwarf text tokens' on some families.
    sub_batches = {**edit_and_far(backbone), "edit": backbone.processor(["Where is this object located?"], ["Marun"])}
    inputs = StepInputs(backbone, sub_batches)
    wise = WISE(n_iter=30)
    pre = {name: answers(wise.edited_model(backbone), inputs, name) for name in sub_batches}
    model = wise.edited_model(backbone)
    group = wise(model, inputs, inputs.rows("edit"))
    scores = wise_scores(backbone, sub_batches, model)
    assert model.scores[0] == pytest.approx(scores["edit"], rel=1e-4)
    assert scores["far"] < scores["edit"]  # the margin loss pushed the edit's score above others'
    # The threshold (act_ratio x the edit's score) between the two: the edit goes to the side memory.
    wise.act_ratio = (scores["far"] + scores["edit"]) / 2 / scores["edit"]
    assert torch.equal(answers(model, inputs, "far", group), pre["far"])
    assert not torch.equal(answers(model, inputs, "edit", group), pre["edit"])
    wise.act_ratio = scores["far"] / scores["edit"] / 2  # below the far prompt's score: it is routed too
    assert not torch.equal(answers(model, inputs, "far", group), pre["far"])


def test_wise_masks_gradients_by_shard_and_merges_shards(tokenizer):
    backbone = backbone_of("text", tokenizer)
    wise = WISE(n_iter=5, save_freq=1, merge_freq=2, act_ratio=0.5)
    editor = Editor({"method": "wise", "backbone_fingerprint": backbone.fingerprint()}, "wise", wise)
    session = editor.start(backbone)
    shards = []
    for number in range(2):
        inputs = StepInputs(backbone, {"edit": backbone.processor([f"Where is {NAMES[number]}?"], [ANSWERS[number]])})
        group = wise(session.model, inputs, inputs.rows("edit"), on_top_of=torch.tensor([session.head]), batched=True)
        delta = session.model.deltas[int(group[0])]
        mask = wise.shard_mask(number, tuple(delta.shape), delta.device)
        assert bool(delta.ne(0).any()) and not bool(delta[~mask].ne(0).any())  # only the shard's entries move
        shards.append(delta.clone())
        session.model.fold()
        session.head = int(group[0])
    assert not torch.equal(*[wise.shard_mask(n, tuple(shards[0].shape), "cpu") for n in range(2)])
    assert session.model.shards == {}
    assert torch.equal(session.model.merged, ties_merge(shards, wise.density))


def test_ties_merge_by_hand():
    first, second = torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([1.0, 2.0, -0.5, -4.0])
    # Top half by magnitude: [3, 0, 0, 2] and [0, 2, 0, -4]; signs elected by the sums [3, 2, 0, -2]: +, +, none, -.
    assert torch.equal(ties_merge([first, second], 0.5), torch.tensor([3.0, 2.0, 0.0, -4.0]))


@pytest.mark.parametrize("make", [lambda: GRACE(n_iter=10), lambda: WISE(n_iter=5, act_ratio=1e-6)])
@pytest.mark.parametrize("family", ["text", *MULTIMODAL[:1]])
def test_fold_unedited_drop_after_restore(make, family, tokenizer):
    backbone = backbone_of(family, tokenizer)
    editor = make()
    sub_batches = edit_and_far(backbone)
    inputs = StepInputs(backbone, sub_batches)
    model = editor.edited_model(backbone)
    pre = answers(model, inputs, "edit")
    torch.manual_seed(0)
    first = editor(model, inputs, inputs.rows("edit"))
    under_first = answers(model, inputs, "edit", first)
    assert torch.equal(answers(model, inputs, "edit"), pre)  # group -1 is the unedited model until folded
    model.fold()
    assert torch.equal(answers(model, inputs, "edit"), under_first)  # folded: in force for every row
    with model.unedited():
        assert torch.equal(answers(model, inputs, "edit"), pre)
        assert torch.equal(answers(model, inputs, "edit", first), pre)
    mark = model.mark()
    second = editor(model, inputs, inputs.rows("edit"), on_top_of=first)  # the same edit, trained further
    assert not torch.equal(answers(model, inputs, "edit", second), under_first)
    model.drop_after(mark)
    assert model.mark() == mark
    assert torch.equal(answers(model, inputs, "edit", first), under_first)
    with pytest.raises(ValueError, match="folded"):
        model.drop_after(0)
    model.restore()
    assert model.mark() == 0
    assert torch.equal(answers(model, inputs, "edit"), pre)


def test_registry_rebuilds_and_checks_configs():
    for method, editor in (("grace", GRACE(n_iter=3, eps=0.5)), ("wise", WISE(n_iter=4, act_ratio=0.9))):
        rebuilt = EDITORS[method].from_config(editor.config)
        assert type(rebuilt) is type(editor) and rebuilt.config == editor.config
    with pytest.raises(ArtifactError, match=r"editor.config.eps is -1"):
        check_editor_values({"method": "grace", "editor": {"config": {"eps": -1}}}, "somewhere")
    with pytest.raises(ValueError, match="multiple of save_freq"):
        WISE(save_freq=300, merge_freq=1000)


def test_editing_api_keeps_memory_edits_beside_the_weights(tokenizer, tmp_path):
    backbone = backbone_of("text", tokenizer)
    before = {name: p.detach().clone() for name, p in backbone.editable_parameters().items()}
    editor = Editor({"method": "grace", "backbone_fingerprint": backbone.fingerprint()}, "grace", GRACE(n_iter=5))
    assert not editor.edits_weights
    edited = editor.edit(backbone, [{"prompt": "Where is place1?", "target": "answer1"}])
    assert edited.n_edits == 1 and not edited.edits_weights
    assert all(torch.equal(p, before[name]) for name, p in backbone.editable_parameters().items())
    with pytest.raises(TypeError, match="GRACE's edits live in a memory"):
        edited.save_pretrained(tmp_path / "edited")


@pytest.mark.parametrize("make", [lambda: GRACE(n_iter=20), lambda: WISE(n_iter=20)])
def test_edits_a_bfloat16_backbone(make, tokenizer):
    torch.manual_seed(0)
    spec = load_backbone_spec(CONFIGS / TINY["text"])
    backbone = (
        FAMILIES["text"]
        .from_config(spec.config, edit_params=spec.edit_params, dtype=torch.bfloat16, tokenizer=tokenizer)
        .eval()
    )
    inputs = StepInputs(backbone, edit_and_far(backbone))
    editor = make()
    model = editor.edited_model(backbone)
    group = editor(model, inputs, inputs.rows("edit"))
    logits = answers(model, inputs, "edit", group)
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
    assert not torch.equal(logits, answers(model, inputs, "edit"))


@pytest.mark.parametrize("make", [lambda: GRACE(n_iter=2), lambda: WISE(n_iter=2)])
def test_fold_refuses_non_finite_edits(make, tokenizer):
    backbone = backbone_of("text", tokenizer)
    inputs = StepInputs(backbone, edit_and_far(backbone))
    editor = make()
    model = editor.edited_model(backbone)
    pre = answers(model, inputs, "edit")
    editor(model, inputs, inputs.rows("edit"))
    broken = model.values if isinstance(editor, GRACE) else model.deltas[0]
    broken[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.fold()
    model.drop_after(0)  # what EditSession does with a refused edit
    assert torch.equal(answers(model, inputs, "edit"), pre)
