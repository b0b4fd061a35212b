"""Sequence-aware MEND meta-training (`sequence_length` K): K = 1 is the single-edit step, chains of K > 1
agree with the per-record dense oracle, and training on chains retains earlier edits better."""

import copy

import pytest
import torch
from oracle import answers, mend_weights, run_with
from test_backbones import make_tokenizer, tiny_backbone
from test_edited_model import make_batch, trained_like
from test_mend_module import make_data, make_module, trainer

from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.losses import masked_kl, masked_nll
from kedit_lightning.editors.mend import MEND
from kedit_lightning.evaluation import record_batches
from kedit_lightning.modules import MENDModule
from kedit_lightning.modules.mend import POST_EDIT, outer_losses


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def single_edit_losses(editor: MEND, backbone, batch) -> dict[str, torch.Tensor]:
    """The single-edit step as it was before chains: every record edited alone, one post-edit forward."""
    inputs = StepInputs(backbone, {key: batch[key] for key in ("edit_inner", *POST_EDIT)})
    model = editor.edited_model(backbone)
    groups = editor(model, inputs, inputs.rows("edit_inner"))
    post = inputs.split(model.answer_logits(inputs, inputs.rows(*POST_EDIT), groups.repeat(len(POST_EDIT))), POST_EDIT)
    with torch.no_grad():
        pre = inputs.split(model.answer_logits(inputs, inputs.rows("loc", "loc_image")), ("loc", "loc_image"))
    return {
        "edit": masked_nll(post["edit_outer"], batch["edit_outer"]["labels"]),
        "loc": sum(masked_kl(pre[k], post[k], batch[k]["labels"]) for k in ("loc", "loc_image")),
        "image_edit": masked_nll(post["edit_outer_image"], batch["edit_outer_image"]["labels"]),
    }


@pytest.mark.parametrize("family", ["blip2", "text"])
def test_a_chain_of_one_is_the_single_edit_step_bit_for_bit(tokenizer, family):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several threads may sum gradients in another order
    try:
        check_single_edit_step(tokenizer, family)
    finally:
        torch.set_num_threads(threads)


def check_single_edit_step(tokenizer, family: str) -> None:
    backbone = tiny_backbone(family, tokenizer).eval()
    batch = make_batch(backbone)
    editor = trained_like(MEND.for_backbone(backbone, rank=8, edit_lr=1e-2)).train()
    twin = copy.deepcopy(editor)
    chained = outer_losses(editor, backbone, batch, sequence_length=1)
    plain = single_edit_losses(twin, backbone, batch)
    assert set(chained) == set(plain)
    assert all(torch.equal(chained[k], plain[k]) for k in plain)
    sum(chained.values()).backward()
    sum(plain.values()).backward()
    assert all(
        torch.equal(p.grad, q.grad) for p, q in zip(editor.parameters(), twin.parameters()) if q.grad is not None
    )


def chain_of_two(family: str, tokenizer):
    """Three records, K = 2: chains (0, 2) and (1,). The dense oracle's weights after each edit: `first[c]` after
    chain c's first edit, `final[i]` record i's chain's weights at its end."""
    torch.manual_seed(0)
    backbone = tiny_backbone(family, tokenizer).eval()
    batch = make_batch(backbone)
    editor = trained_like(MEND.for_backbone(backbone, rank=8, edit_lr=1e-2)).train()
    records = list(record_batches(batch))
    first = {c: mend_weights(editor, backbone, records[c]["edit_inner"]) for c in (0, 1)}
    last = mend_weights(editor, backbone, records[2]["edit_inner"], first[0])
    return backbone, batch, editor, records, first, {0: last, 1: first[1], 2: last}


def oracle_parts(backbone, records, weights, newest, retained) -> dict[str, torch.Tensor]:
    """The outer loss's parts computed record by record, each record's inputs run with `weights[i]`."""

    def run(i: int, key: str) -> torch.Tensor:
        record = records[i]
        return answers(run_with(backbone, record[key], weights[i]), record[key]["labels"])

    def nll(i: int, key: str) -> torch.Tensor:
        return masked_nll(run(i, key), records[i][key]["labels"])

    def kl(i: int, key: str) -> torch.Tensor:
        with torch.no_grad():
            pre = answers(backbone(records[i][key]), records[i][key]["labels"])
        return masked_kl(pre, run(i, key), records[i][key]["labels"])

    scored = [*newest, *retained]
    parts = {
        "edit": sum(nll(i, "edit_outer") for i in newest) / len(newest),
        "image_edit": sum(nll(i, "edit_outer_image") for i in newest) / len(newest),
        "loc": sum(kl(i, "loc") + kl(i, "loc_image") for i in scored) / len(scored),
    }
    if retained:
        parts["retain"] = sum(nll(i, k) for i in retained for k in ("edit_outer", "edit_outer_image")) / len(retained)
    return parts


@pytest.mark.parametrize("family", ["blip2", "text"])
def test_chains_of_two_match_the_dense_oracle(tokenizer, family):
    """1 and 2 are the newest edits, 0 is retained."""
    backbone, batch, editor, records, _, final = chain_of_two(family, tokenizer)
    fast = outer_losses(editor, backbone, batch, sequence_length=2)
    expected = oracle_parts(backbone, records, final, newest=[1, 2], retained=[0])
    assert set(fast) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(fast[key], value, rtol=1e-4, atol=1e-6)
    assert expected["retain"] > 0


@pytest.mark.parametrize("family", ["blip2", "text"])
def test_discounted_losses_after_each_edit_match_the_dense_oracle(tokenizer, family):
    """With discount 0.5 the point after the first edits (records 0 and 1, each the newest of its chain)
    joins the end's losses at weight 0.5."""
    backbone, batch, editor, records, first, final = chain_of_two(family, tokenizer)
    fast = outer_losses(editor, backbone, batch, sequence_length=2, discount=0.5)
    end = oracle_parts(backbone, records, final, newest=[1, 2], retained=[0])
    after_first = oracle_parts(backbone, records, first, newest=[0, 1], retained=[])
    expected = {key: value + 0.5 * after_first.get(key, 0.0) for key, value in end.items()}
    assert set(fast) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(fast[key], value, rtol=1e-4, atol=1e-6)
    assert after_first["edit"] > 0 and after_first["loc"] > 0


def test_the_norm_penalty_is_each_edits_dense_squared_norm(tokenizer):
    """The mean over the three edits of ||Delta W||_F^2 summed over the edited weights, Delta W the dense
    difference of the oracle's weights before and after each edit (record 2's on top of record 0's)."""
    backbone, batch, editor, _, first, final = chain_of_two("blip2", tokenizer)
    fast = outer_losses(editor, backbone, batch, sequence_length=2, norm=True)
    unedited = {name: w.detach() for name, w in backbone.editable_parameters().items()}

    def squared_norm(after, before) -> torch.Tensor:
        return sum((after[name] - before[name]).double().square().sum() for name in editor.param_names)

    expected = (
        squared_norm(first[0], unedited) + squared_norm(first[1], unedited) + squared_norm(final[2], first[0])
    ) / 3
    torch.testing.assert_close(fast["norm"].double(), expected, rtol=1e-3, atol=0)
    assert expected > 0
    fast["norm"].backward()
    assert editor.edit_lrs.grad.abs().sum() > 0


def train(editor: MEND, backbone, batch, sequence_length: int, steps: int = 30) -> None:
    optimizer = torch.optim.Adam(editor.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = sum(outer_losses(editor, backbone, batch, sequence_length=sequence_length).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        editor.take_pending_statistics()


def test_training_on_chains_lowers_the_chain_loss_and_retains_earlier_edits_better(tokenizer):
    """The same editor trained 30 steps on single edits and on one chain of the three records; then both
    make that chain. (Measured: total 12.4 -> 10.1 with chains; retention NLL 5.0 vs 6.7.)"""
    torch.manual_seed(0)
    backbone = tiny_backbone("text", tokenizer).eval()
    batch = make_batch(backbone)
    single = MEND.for_backbone(backbone, rank=8, edit_lr=1.0).train()
    chained = copy.deepcopy(single)
    with torch.no_grad():
        before = outer_losses(chained, backbone, batch, sequence_length=3)
    train(single, backbone, batch, 1)
    train(chained, backbone, batch, 3)
    with torch.no_grad():
        after = {
            "single": outer_losses(single, backbone, batch, sequence_length=3),
            "chained": outer_losses(chained, backbone, batch, sequence_length=3),
        }
    assert sum(after["chained"].values()) < 0.9 * sum(before.values())
    assert after["chained"]["retain"] < 0.85 * after["single"]["retain"]


def test_the_module_trains_on_chains_and_refuses_bad_lengths(world, tmp_path):
    module = make_module(
        world, sequence_length=2, backprop_window=1, cretain=0.5, discount=0.9, cnorm=0.1, max_edit_ratio=0.1
    )
    fit = trainer(tmp_path, 2)
    fit.fit(module, datamodule=make_data(world, module, batch_size=4))
    assert fit.global_step == 2 and {"train/loss_retain", "train/loss_norm"} <= set(fit.callback_metrics)
    with pytest.raises(ValueError, match="model.sequence_length must be an integer >= 1; got 0"):
        MENDModule({"family": "text"}, sequence_length=0)
    with pytest.raises(ValueError, match="model.backprop_window must be an integer >= 1 or null; got 0"):
        MENDModule({"family": "text"}, backprop_window=0)
    with pytest.raises(ValueError, match=r"model.discount must be a number in \[0, 1\]; got 1.5"):
        MENDModule({"family": "text"}, discount=1.5)
    with pytest.raises(ValueError, match="model.cnorm must be a number >= 0; got -1"):
        MENDModule({"family": "text"}, cnorm=-1)
    with pytest.raises(ValueError, match="model.max_edit_ratio must be a number > 0 or null; got 0"):
        MENDModule({"family": "text"}, max_edit_ratio=0)
