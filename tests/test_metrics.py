"""Edit metrics on hand-made logits: exact values, per-example averaging, and rank merging."""

import pytest
import torch

from kedit_lightning.metrics import (
    EditAccuracy,
    EditLocality,
    PortabilityByHop,
    answer_token_accuracy,
    exact_match,
    locality_agreement,
)

V = 6


def logits_predicting(tokens):
    """Logits [B, T, V] whose argmax at [b, t] is tokens[b][t]."""
    ids = torch.tensor(tokens)
    return torch.nn.functional.one_hot(ids, V).float() * 5.0 + torch.randn(*ids.shape, V) * 0.1


def at(logits, labels):
    """The [P, V] answer-position logits the metrics read (as `Backbone.resume` gives them)."""
    return logits[labels != -100]


# Example 0 has 3 answer tokens (2 right), example 1 has 1 (right), example 2 has 2 (0 right).
LABELS = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, -100], [-100, -100, 5, 5]])
PREDICTED = [[0, 1, 2, 0], [3, 3, 4, 0], [5, 1, 0, 0]]


def test_accuracy_and_exact_match_per_example():
    logits = logits_predicting(PREDICTED)
    torch.testing.assert_close(answer_token_accuracy(at(logits, LABELS), LABELS), torch.tensor([2 / 3, 1.0, 0.0]))
    torch.testing.assert_close(exact_match(at(logits, LABELS), LABELS), torch.tensor([0.0, 1.0, 0.0]))


def test_locality_agreement_counts_only_answer_positions():
    pre = logits_predicting([[0, 1, 2, 3], [0, 0, 4, 0], [1, 1, 5, 5]])
    # Disagreements: example 0 at position 3 (answer) and 0 (prompt: ignored); example 2 at both answers.
    post = logits_predicting([[5, 1, 2, 0], [1, 2, 4, 3], [1, 1, 0, 0]])
    torch.testing.assert_close(
        locality_agreement(at(pre, LABELS), at(post, LABELS), LABELS), torch.tensor([2 / 3, 1.0, 0.0])
    )


def test_examples_without_answer_tokens_are_an_error():
    with pytest.raises(ValueError, match=r"examples \[1\]"):
        answer_token_accuracy(logits_predicting(PREDICTED[:2])[0, 1:], torch.tensor([[-100, 1, 2, 3], [-100] * 4]))


def test_edit_accuracy_is_a_mean_over_examples_across_updates():
    metric = EditAccuracy()
    logits = logits_predicting(PREDICTED)
    metric.update(at(logits[:1], LABELS[:1]), LABELS[:1])  # a batch of one, then a batch of two
    metric.update(at(logits[1:], LABELS[1:]), LABELS[1:])
    result = metric.compute()
    # Per example (2/3, 1, 0): not the mean of the batch means ((2/3 + 1/2) / 2), not the token mean (3/6).
    torch.testing.assert_close(result["token_acc"], torch.tensor(5 / 9))
    torch.testing.assert_close(result["exact_match"], torch.tensor(1 / 3))


def test_edit_locality_is_a_mean_over_examples_across_updates():
    metric = EditLocality()
    pre = logits_predicting([[0, 1, 2, 3], [0, 0, 4, 0], [1, 1, 5, 5]])
    post = logits_predicting([[0, 1, 2, 0], [0, 0, 4, 0], [1, 1, 5, 0]])
    metric.update(at(pre[:2], LABELS[:2]), at(post[:2], LABELS[:2]), LABELS[:2])
    metric.update(at(pre[2:], LABELS[2:]), at(post[2:], LABELS[2:]), LABELS[2:])
    result = metric.compute()
    torch.testing.assert_close(result["token_acc"], torch.tensor((2 / 3 + 1.0 + 0.5) / 3))
    torch.testing.assert_close(result["exact_match"], torch.tensor(1 / 3))


def test_portability_by_hop():
    metric = PortabilityByHop(hops=("1-hop", "2-hop", "3-hop"))
    logits = logits_predicting(PREDICTED)
    metric.update(at(logits[:2], LABELS[:2]), LABELS[:2], ["1-hop", "2-hop"])
    metric.update(at(logits[2:], LABELS[2:]), LABELS[2:], ["1-hop"])
    result = metric.compute()
    assert set(result) == {"1-hop", "2-hop", "all"}  # no 3-hop example seen
    torch.testing.assert_close(result["1-hop"], torch.tensor((2 / 3 + 0.0) / 2))
    torch.testing.assert_close(result["2-hop"], torch.tensor(1.0))
    torch.testing.assert_close(result["all"], torch.tensor(5 / 9))
    exact = PortabilityByHop(hops=("1-hop", "2-hop", "3-hop"), exact=True)
    exact.update(at(logits, LABELS), LABELS, ["1-hop", "2-hop", "2-hop"])
    assert {k: v.item() for k, v in exact.compute().items()} == {
        "1-hop": 0.0,
        "2-hop": 0.5,
        "all": pytest.approx(1 / 3),
    }
    with pytest.raises(ValueError, match="unknown hop"):
        metric.update(at(logits[:1], LABELS[:1]), LABELS[:1], ["5-hop"])
    with pytest.raises(ValueError, match="2 hop names for 1"):
        metric.update(at(logits[:1], LABELS[:1]), LABELS[:1], ["1-hop", "1-hop"])


def test_states_merged_from_two_ranks_give_the_single_process_result():
    # merge_state applies each state's dist_reduce_fx, as the cross-rank sync does.
    logits = logits_predicting(PREDICTED)
    hops = ["1-hop", "2-hop", "1-hop"]
    post = logits_predicting([[0, 1, 2, 0], [0, 0, 4, 0], [1, 1, 5, 0]])
    updates = [
        (EditAccuracy, lambda m, r: m.update(at(logits[r], LABELS[r]), LABELS[r])),
        (EditLocality, lambda m, r: m.update(at(logits[r], LABELS[r]), at(post[r], LABELS[r]), LABELS[r])),
        (PortabilityByHop, lambda m, r: m.update(at(logits[r], LABELS[r]), LABELS[r], hops[r])),
    ]
    for make, update in updates:
        whole, rank0, rank1 = make(), make(), make()
        update(whole, slice(None))
        update(rank0, slice(0, 1))
        update(rank1, slice(1, None))
        rank0.merge_state(rank1)
        merged, expected = rank0.compute(), whole.compute()
        assert set(merged) == set(expected)
        for key in expected:
            torch.testing.assert_close(merged[key], expected[key])
