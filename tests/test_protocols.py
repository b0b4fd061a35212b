"""Metric protocols (README, "Metric protocols"): each reference's locality on hand-made logits, reports with
several protocols and the unedited model, and the every-position read against a plain full forward."""

import pytest
import torch
from test_backbones import make_tokenizer, tiny_backbone
from test_edited_model import make_batch

from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.ft import FineTune
from kedit_lightning.evaluation import HEADLINE, EditMetrics, evaluate_batch, report_column
from kedit_lightning.metrics import PairedIdAgreement, TopKAgreement, paired_id_agreement, top_k_agreement


def ranked(*orders: list[int], vocab: int = 12) -> torch.Tensor:
    """[P, vocab] logits: row p ranks the tokens of orders[p] first, in that order (distinct values, no ties)."""
    rows = []
    for order in orders:
        rest = [t for t in range(vocab) if t not in order]
        row = torch.empty(vocab)
        for rank, token in enumerate([*order, *rest]):
            row[token] = float(vocab - rank)
        rows.append(row)
    return torch.stack(rows)


def test_easyedit_text_locality_is_top1_agreement_over_every_attended_position():
    # Row 0 reads 3 positions (argmax 0,1,2 before; 0,5,2 after: 2 agree), row 1 reads 2 (3,4 vs 3,3: 1 agrees).
    pre = ranked([0], [1], [2], [3], [4])
    post = ranked([0], [5], [2], [3], [3])
    counts = torch.tensor([3, 2])
    torch.testing.assert_close(top_k_agreement(pre, post, counts, k=1), torch.tensor([2 / 3, 1 / 2]))
    metric = TopKAgreement(k=1)
    metric.update(pre, post, counts)
    assert metric.compute()["token_acc"].item() == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert metric.compute()["exact_match"].item() == 0.0


def test_easyedit_image_locality_compares_the_top10_rank_by_rank():
    top10 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    swapped = [0, 1, 2, 4, 3, 5, 6, 7, 8, 9]  # the same ten tokens, ranks 3 and 4 exchanged: 8 of 10 agree
    replaced = [0, 1, 2, 3, 4, 5, 6, 7, 8, 11]  # the tenth token differs: 9 of 10 agree
    pre = ranked(top10, top10, top10)
    post = ranked(swapped, top10, replaced)
    counts = torch.tensor([2, 1])  # row 0: positions 0 and 1, row 1: position 2
    expected = torch.tensor([(8 / 10 + 10 / 10) / 2, 9 / 10])
    torch.testing.assert_close(top_k_agreement(pre, post, counts, k=10), expected)


def test_vlkeb_locality_compares_argmax_and_target_id_pairs():
    # Row 0: answer tokens at 2 positions, 1 argmax agrees: (2 targets + 1) / 4. Row 1: 1 token, disagrees: 1 / 2.
    labels = torch.tensor([[-100, 7, 8], [-100, -100, 9]])
    pre = ranked([7], [1], [9])
    post = ranked([7], [2], [3])
    torch.testing.assert_close(paired_id_agreement(pre, post, labels), torch.tensor([3 / 4, 1 / 2]))
    metric = PairedIdAgreement()
    metric.update(pre, post, labels)
    assert metric.compute()["token_acc"].item() == pytest.approx((3 / 4 + 1 / 2) / 2)


def test_several_protocols_and_the_unedited_model_in_one_report():
    # One record, text only: reliability reads 2 answer tokens, locality 1 answer token among 3 attended positions.
    # A 1-hop portability question with one answer token: right after the edit, wrong before.
    labels = {
        "edit_inner": torch.tensor([[-100, 4, 5]]),
        "loc": torch.tensor([[-100, -100, 6]]),
        "port": torch.tensor([[-100, 3]]),
    }
    post = {"edit_inner": ranked([4], [5]), "loc": ranked([6]), "port": ranked([3])}
    pre = {"edit_inner": ranked([4], [0]), "loc": ranked([6]), "port": ranked([2])}
    # Every attended position of the loc prompt: 3 positions, the first two change their argmax after the edit.
    every = {"loc": (ranked([1], [2], [6]), ranked([3], [3], [6]), torch.tensor([3]))}
    metrics = EditMetrics(hops=("1-hop",), protocols=("kedit", "easyedit", "vlkeb"), unedited=True)
    metrics.update(labels, post, pre, hops=["1-hop"], every_position=every)
    report = metrics.compute()
    assert report["reliability"] == report["easyedit/reliability"] == report["vlkeb/reliability"] == 1.0
    assert report["pre_reliability"] == 0.5  # the unedited model gets 1 of the 2 new answer tokens
    assert report["t_locality"] == report["kedit/t_locality"] == 1.0  # the answer position agrees
    assert report["easyedit/t_locality"] == pytest.approx(1 / 3)  # 1 of 3 attended positions agrees
    assert report["vlkeb/t_locality"] == 1.0  # (1 target + 1 agreeing id) / 2
    assert report["easyedit/pre_t_locality"] == report["pre_t_locality"] == 1.0
    assert "i_locality" not in report and "easyedit/i_locality" not in report  # no image sub-batches
    assert report["exact_match"]["pre_reliability"] == 0.0
    assert report["kedit/portability"] == report["vlkeb/portability"] == {"1-hop": 1.0, "all": 1.0}
    assert report["pre_portability"] == {"1-hop": 0.0, "all": 0.0}
    assert "easyedit/portability" not in report  # EasyEdit's multimodal trainer defines none
    assert report_column(report, "easyedit") == {"reliability": 1.0, "t_locality": pytest.approx(1 / 3), "n_edits": 1}
    assert report_column(report, unedited=True) == {
        "reliability": 0.5,
        "t_locality": 1.0,
        "portability": {"1-hop": 0.0, "all": 0.0},
        "n_edits": 1,
    }


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="protocol 'mend' is not one of kedit, easyedit, vlkeb"):
        EditMetrics(protocols=("mend",))


@pytest.mark.parametrize("family", ["text", "blip2"])
def test_every_position_read_is_the_full_forward_at_attended_positions(family):
    torch.manual_seed(0)
    backbone = tiny_backbone(family, make_tokenizer()).eval()
    batch = make_batch(backbone)
    inputs = StepInputs(backbone, {key: batch[key] for key in ("loc", "loc_image")})
    with torch.no_grad():
        read = inputs.split(
            inputs.answer_logits(backbone, inputs.rows("loc", "loc_image"), every_position=True),
            ["loc", "loc_image"],
            True,
        )
        for name in ("loc", "loc_image"):
            sub = batch[name]
            full = backbone.model_logits(sub["input_ids"], sub["attention_mask"], sub.get("pixel_values"))
            torch.testing.assert_close(read[name], full[sub["attention_mask"].bool()], atol=1e-4, rtol=1e-4)


def test_an_edit_that_changes_nothing_is_local_under_every_protocol():
    torch.manual_seed(0)
    backbone = tiny_backbone("blip2", make_tokenizer()).eval()
    metrics = EditMetrics(protocols=("kedit", "easyedit", "vlkeb"), unedited=True)
    evaluate_batch(FineTune(lr=0.0, steps=1), backbone, make_batch(backbone), metrics)
    report = metrics.compute()
    for protocol in ("kedit", "easyedit", "vlkeb"):
        assert report[f"{protocol}/t_locality"] == report[f"{protocol}/i_locality"] == 1.0
    # No weight changed, so the edited model scores what the unedited one does.
    assert all(report[key] == report[f"pre_{key}"] for key in HEADLINE)
