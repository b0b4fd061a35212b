"""MEND as the paper defines it, on tiny random-weight OPT (nn.Linear) and GPT-2 (Conv1D) backbones."""

import pytest
import torch
import torch.nn.functional as F
from oracle import answers, capture_factors, edit_gradients, run_with
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from kedit_lightning.backbones import TextLMBackbone
from kedit_lightning.editors.edited_model import StepInputs, WeightEditedModel
from kedit_lightning.editors.losses import masked_kl, masked_nll
from kedit_lightning.editors.mend import MEND, RunningMoments, merge_moments

WORDS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "the",
    "capital",
    "of",
    "france",
    "italy",
    "spain",
    "is",
    "paris",
    "rome",
    "madrid",
    "city",
    "big",
    "a",
    "who",
    "leads",
    "it",
]


def word_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_backbone(kind: str = "opt") -> TextLMBackbone:
    torch.manual_seed(0)
    if kind == "opt":
        config = OPTConfig(
            vocab_size=len(WORDS),
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
            init_std=0.3,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            dropout=0.0,
            attention_dropout=0.0,
        )
        model, edit = OPTForCausalLM(config), ["model.decoder.layers.{0,1}.fc{1,2}.weight"]
    else:
        config = GPT2Config(
            vocab_size=len(WORDS),
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=32,
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=0.3,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model, edit = GPT2LMHeadModel(config), ["transformer.h.{0,1}.mlp.c_{fc,proj}.weight"]
    return TextLMBackbone(model.eval(), word_tokenizer(), edit)


@pytest.fixture(scope="module")
def opt():
    return make_backbone("opt")


def encode(backbone, pairs):
    return backbone.processor([p for p, _ in pairs], [t for _, t in pairs])


EDIT = [("the capital of france is", "rome"), ("who leads it", "a big city")]
OUTER = [("the big city of france is", "rome"), ("who leads the city", "a big city")]


def edit_chain(editor, backbone, *batches):
    """The dense weights after each batched edit in turn, each on top of the previous (one WeightEditedModel),
    and the model with the last group."""
    inputs = StepInputs(backbone, {str(i): batch for i, batch in enumerate(batches)})
    model, group, weights = WeightEditedModel(backbone), None, []
    for i in range(len(batches)):
        rows = inputs.rows(str(i))
        on_top_of = None if group is None else group[:1].expand(len(rows))
        group = editor(model, inputs, rows, on_top_of=on_top_of, batched=True)
        weights.append(model.weights())
    return weights, (model, inputs, group)


def edited(editor, backbone, batch):
    return edit_chain(editor, backbone, batch)[0][0]


def updates(editor, backbone, batch):
    before = backbone.editable_parameters()
    after = edited(editor, backbone, batch)
    return {n: after[n] - before[n] for n in editor.param_names}


def cosine(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("kind", ["opt", "gpt2"])
def test_identity_editor_is_a_plain_gradient_step(kind):
    backbone = make_backbone(kind)
    editor = MEND.for_backbone(backbone, rank=8, edit_lr=1e-2).eval()
    batch = encode(backbone, EDIT)
    grads = edit_gradients(backbone, batch)
    for name, update in updates(editor, backbone, batch).items():
        assert update.abs().max() > 0
        assert cosine(update, -grads[name]) > 0.9999
        torch.testing.assert_close(update, -1e-2 * grads[name], rtol=1e-4, atol=1e-4 * update.abs().max().item())


@pytest.mark.parametrize("kind", ["opt", "gpt2"])
def test_an_edit_raises_the_target_probability(kind):
    backbone = make_backbone(kind)
    editor = MEND.for_backbone(backbone, rank=8, edit_lr=1.0).eval()
    batch = encode(backbone, EDIT[:1])
    target = batch["labels"][0] != -100
    with torch.no_grad():
        pre = backbone(batch).softmax(-1)[0, target, batch["labels"][0, target]]
        post = run_with(backbone, batch, edited(editor, backbone, batch)).softmax(-1)[
            0, target, batch["labels"][0, target]
        ]
    assert post.item() > max(0.3, 2 * pre.item())


def test_capture_leaves_the_frozen_backbone_without_gradients_and_works_under_no_grad(opt):
    editor = MEND.for_backbone(opt, rank=8).eval()
    with torch.no_grad():
        weights = edited(editor, opt, encode(opt, EDIT))
    assert all(w.grad_fn is None for w in weights.values())
    assert all(p.grad is None and not p.requires_grad for p in opt.parameters())


def test_running_statistics_change_once_per_step_and_match_torch_mean_and_var(opt):
    editor = MEND.for_backbone(opt, rank=8).train()
    batches = [encode(opt, EDIT), encode(opt, OUTER), encode(opt, EDIT[:1])]
    weights = opt.editable_parameters()
    rows = {key: ([], []) for key in editor.transforms}

    def seen(batch):
        for name, (x, delta) in capture_factors(opt, batch, weights).items():
            rows[editor.route[name][0]][0].append(x)
            rows[editor.route[name][0]][1].append(delta)

    def state():
        return {k: v.clone() for k, v in editor.state_dict().items()}

    def assert_statistics_of_seen_rows():
        for key, transform in editor.transforms.items():
            xs, deltas = torch.cat(rows[key][0]), torch.cat(rows[key][1])
            assert transform.x_moments.count.item() == xs.shape[0]
            torch.testing.assert_close(transform.x_moments.mean, xs.mean(0), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(transform.x_moments.var, xs.var(0), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(transform.delta_moments.mean, deltas.mean(0), rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(transform.delta_moments.var, deltas.var(0), rtol=1e-4, atol=1e-12)

    # Step 1, one process: the edits leave the statistics alone until the step commits them.
    initial = state()
    for batch in batches[:2]:
        seen(batch)
        edited(editor, opt, batch)
    assert all(torch.equal(v, editor.state_dict()[k]) for k, v in initial.items())
    editor.commit_statistics(editor.take_pending_statistics())
    assert_statistics_of_seen_rows()

    # Step 2 split over two processes: each edit normalises as evaluation would at the step's
    # start, and committing both processes' moments gives the statistics of all rows.
    start = state()
    trained = edited(editor, opt, batches[1])
    first_process = editor.take_pending_statistics()
    edited(editor, opt, batches[2])
    second_process = editor.take_pending_statistics()
    assert all(torch.equal(v, editor.state_dict()[k]) for k, v in start.items())
    evaluated = edited(editor.eval(), opt, batches[1])
    assert all(torch.allclose(trained[n], evaluated[n], atol=1e-7) for n in editor.param_names)
    editor.commit_statistics(torch.stack([first_process, second_process]))
    seen(batches[1])
    seen(batches[2])
    assert_statistics_of_seen_rows()

    # Evaluation neither changes nor accumulates statistics.
    frozen = state()
    edited(editor.eval(), opt, batches[0])
    assert all(torch.equal(v, editor.state_dict()[k]) for k, v in frozen.items())
    assert not editor.take_pending_statistics().any()


def test_pending_moments_skip_non_finite_rows_and_merge_in_any_grouping():
    rows = torch.randn(7, 3)
    moments = RunningMoments(3)
    moments.accumulate(rows[:3])
    moments.accumulate(torch.full((2, 3), float("nan")))
    moments.accumulate(rows[3:])
    pending = moments.take_pending()
    torch.testing.assert_close(pending, torch.cat([torch.tensor([7.0]), rows.mean(0), rows.var(0) * 6]))
    assert moments.take_pending().eq(0).all()
    halves = [RunningMoments(3), RunningMoments(3)]
    halves[0].accumulate(rows[:2])
    halves[1].accumulate(rows[2:])
    torch.testing.assert_close(merge_moments(torch.stack([h.take_pending() for h in halves])), pending)
    moments.commit(pending[None])
    assert moments.count.item() == 7
    torch.testing.assert_close(moments.var, rows.var(0))


def test_rows_without_signal_are_dropped(opt):
    # Position p's hidden state in layer 0 reaches the predictions at p and after (attention), so
    # delta = 0 from the last answer token on (its prediction comes from the position before) and
    # on right padding. In the last layer position p reaches only its own prediction: one row per
    # answer token.
    batch = encode(opt, [("the capital of france is", "rome"), ("it is", "a big city")])
    last_answer = torch.stack([(row != -100).nonzero().max() for row in batch["labels"]])
    factors = capture_factors(opt, batch, opt.editable_parameters())
    expected_rows = {"layers.0": int(last_answer.sum()), "layers.1": int((batch["labels"] != -100).sum())}
    for name, (x, delta) in factors.items():
        rows = expected_rows[".".join(name.split(".")[2:4])]
        assert x.shape[0] == delta.shape[0] == rows < batch["input_ids"].numel()
        assert (x != 0).any(-1).all() and (delta != 0).any(-1).all()


def test_the_edit_is_differentiable_in_every_editor_parameter(opt):
    editor = MEND.for_backbone(opt, rank=8, edit_lr=1e-2).train()
    weights = edited(editor, opt, encode(opt, EDIT))
    outer = encode(opt, OUTER)
    loss = masked_nll(answers(run_with(opt, outer, weights), outer["labels"]), outer["labels"])
    loss.backward()
    assert (editor.edit_lrs.grad != 0).all()
    for transform in editor.transforms.values():
        first, last = transform.mlp.layers
        # At identity init the last layer's U and every layer's offset receive gradient (clamp
        # passes gradient at 0, so the hidden layer is trainable from the start).
        assert last.up.grad.abs().sum() > 0 and last.mode_shift.grad.abs().sum() > 0
        assert first.mode_shift.grad.abs().sum() > 0 and first.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in opt.parameters())
    assert {id(p) for p in editor.editor_parameters()} | {id(editor.edit_lrs)} == {id(p) for p in editor.parameters()}
    assert editor.lr_parameters() == [editor.edit_lrs] and all(
        p is not editor.edit_lrs for p in editor.editor_parameters()
    )


def test_a_batched_edit_is_one_update_over_all_rows(opt):
    editor = MEND.for_backbone(opt, rank=8, edit_lr=1e-2).eval()
    together = updates(editor, opt, encode(opt, EDIT))
    singles = [updates(editor, opt, encode(opt, [pair])) for pair in EDIT]
    for name, update in together.items():
        # The edit loss averages over the two examples, so the identity editor's update is the mean.
        torch.testing.assert_close(
            update, (singles[0][name] + singles[1][name]) / 2, rtol=1e-4, atol=1e-4 * update.abs().max().item()
        )

    # A non-identity transform acts row by row: the batched update is the sum over the rows of both
    # examples (each example's delta halved by the mean over examples).
    torch.manual_seed(1)
    for transform in editor.transforms.values():
        for layer in transform.mlp.layers:
            layer.up.data.normal_(0, 0.1)
    together = updates(editor, opt, encode(opt, EDIT))
    weights = opt.editable_parameters()
    per_example = [capture_factors(opt, encode(opt, [pair]), weights) for pair in EDIT]
    for i, (name, update) in enumerate(together.items()):
        key, mode = editor.route[name]
        x = torch.cat([f[name][0] for f in per_example])
        delta = torch.cat([f[name][1] / 2 for f in per_example])
        x_t, delta_t = editor.transforms[key](x, delta, mode)
        torch.testing.assert_close(
            update, -editor.edit_lrs[i] * delta_t.T @ x_t, rtol=1e-4, atol=1e-4 * update.abs().max().item()
        )


def test_sequential_edits_compose(opt):
    editor = MEND.for_backbone(opt, rank=8, edit_lr=1e-2).eval()
    first_batch, second_batch = encode(opt, EDIT[:1]), encode(opt, EDIT[1:])
    (first, second), (model, inputs, group) = edit_chain(editor, opt, first_batch, second_batch)
    grads_at_first = edit_gradients(opt, second_batch, first)
    for name in editor.param_names:
        torch.testing.assert_close(
            second[name] - first[name],
            -1e-2 * grads_at_first[name],
            rtol=1e-4,
            atol=1e-6 * grads_at_first[name].abs().max().item(),
        )
    # The outer loss after two edits reaches the step sizes through both edits.
    loss = masked_nll(model.answer_logits(inputs, inputs.rows("1"), group), second_batch["labels"])
    (lr_grad,) = torch.autograd.grad(loss, [editor.edit_lrs])
    assert (lr_grad != 0).all()


def squared_norm(tensors) -> float:
    return sum(float(t.detach().double().pow(2).sum()) for t in tensors)


def test_a_limited_edit_is_the_free_edit_scaled_to_the_ratio_of_the_weights_norm(opt):
    editor = MEND.for_backbone(opt, rank=8, edit_lr=1.0).eval()
    weights = squared_norm(opt.editable_parameters().values()) ** 0.5
    free = updates(editor, opt, encode(opt, EDIT[:1]))
    free_norm = squared_norm(free.values()) ** 0.5
    editor.limit_edits(10 * free_norm / weights)  # far above this edit: no change, bit for bit
    assert all(torch.equal(update, free[name]) for name, update in updates(editor, opt, encode(opt, EDIT[:1])).items())
    ratio = 0.25 * free_norm / weights
    editor.limit_edits(ratio)
    limited = updates(editor, opt, encode(opt, EDIT[:1]))
    assert squared_norm(limited.values()) ** 0.5 == pytest.approx(ratio * weights, rel=1e-4)
    for name, update in limited.items():  # every weight's share as the editor made it
        torch.testing.assert_close(update, 0.25 * free[name], rtol=1e-4, atol=1e-4 * free[name].abs().max().item())
    with pytest.raises(ValueError, match="must be a number > 0, got 0.0"):
        editor.limit_edits(0.0)


def test_edits_made_together_are_each_limited_on_their_own(opt):
    editor = MEND.for_backbone(opt, rank=8, edit_lr=1.0).eval()
    inputs = StepInputs(opt, {"edit": encode(opt, EDIT)})
    free_model = WeightEditedModel(opt)
    free = free_model.squared_norms(editor(free_model, inputs, inputs.rows("edit"))).detach()
    limit = float(free.min() + free.max()) / 2  # between the two edits' squared norms
    editor.limit_edits((limit / squared_norm(opt.editable_parameters().values())) ** 0.5)
    model = WeightEditedModel(opt)
    limited = model.squared_norms(editor(model, inputs, inputs.rows("edit")))
    torch.testing.assert_close(limited, torch.minimum(free, torch.tensor(limit, dtype=free.dtype)), rtol=1e-4, atol=0.0)


def test_editor_rejects_a_backbone_it_was_not_built_for(opt):
    editor = MEND({"model.decoder.layers.0.fc1.weight": (16, 32)}, rank=4)
    with pytest.raises(ValueError, match="fc1.weight"):
        edited(editor, opt, encode(opt, EDIT))
    with pytest.raises(TypeError, match="Linear or Conv1D"):
        MEND.for_backbone(TextLMBackbone(opt.model, opt.processor.tokenizer, ["model.decoder.embed_tokens.weight"]))


def test_masked_losses_average_per_example_on_answer_tokens():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, -100]])
    logp = logits.log_softmax(-1)
    expected = ((-logp[0, 1, 1] - logp[0, 2, 2]) / 2 + -logp[1, 2, 3]) / 2
    mask = labels != -100
    torch.testing.assert_close(masked_nll(logits[mask], labels), expected)

    post = torch.randn(2, 4, 5, requires_grad=True)
    pre = logits.clone().requires_grad_()
    kl = (logp.exp() * (logp - post.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(masked_kl(pre[mask], post[mask], labels), ((kl[0, 1] + kl[0, 2]) / 2 + kl[1, 2]) / 2)
    assert masked_kl(logits[mask], logits[mask], labels).abs() < 1e-6
    masked_kl(pre[mask], post[mask], labels).backward()
    assert pre.grad is None and post.grad.abs().sum() > 0
