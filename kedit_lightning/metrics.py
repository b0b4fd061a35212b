"""Edit metrics, per edit (per example) and then averaged, as torchmetrics.

Logits come for answer positions only ([P, V], row-major over `labels != -100`), as `Backbone.resume` gives them.
Every state is a sum reduced with "sum" across ranks, so a distributed validation gives the same mean as
a single process over the same examples. Reliability and T-/I-Generality are `EditAccuracy` on edit_inner /
edit_outer / edit_outer_image (post-edit logits), T-/I-Locality `EditLocality` on loc / loc_image (pre- and
post-edit logits), Portability `PortabilityByHop` on port (DESIGN.md, "Metrics"). Per edit, "token_acc"
is the mean per-token score and "exact_match" whether every answer token scores. Dict-valued metrics
cannot go to `self.log` directly: at epoch end, `self.log_dict` their `compute()` (keys prefixed) and reset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from data_modules.encoding import IGNORE_INDEX

DEFAULT_HOPS = ("1-hop", "2-hop", "3-hop", "4-hop")


def _per_row(scores: torch.Tensor, counts: torch.Tensor, what: str = "answer tokens") -> torch.Tensor:
    """[B]: the mean of each row's scores (`scores` [P]: `counts[b]` consecutive ones per row, row-major)."""
    counts = counts.to(scores.device)
    if bool((counts == 0).any()):
        rows = (counts == 0).nonzero(as_tuple=True)[0].tolist()
        raise ValueError(f"examples {rows} of the batch have no {what}")
    row = torch.repeat_interleave(torch.arange(len(counts), device=scores.device), counts)
    return scores.float().new_zeros(len(counts)).index_add(0, row, scores.float()) / counts


def _per_example(token_scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: the mean of each example's token scores (`token_scores` [P]: one per answer token, row-major)."""
    return _per_row(token_scores, (labels != IGNORE_INDEX).sum(-1), "answer tokens (labels all -100)")


def answer_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: fraction of each example's answer tokens whose argmax is the label (`logits` [P, V] at answer positions)."""
    return _per_example(logits.argmax(-1) == labels[labels != IGNORE_INDEX], labels)


def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: 1.0 where every answer token's argmax is the label, else 0.0."""
    return (answer_token_accuracy(logits, labels) == 1.0).float()


def locality_agreement(pre_logits: torch.Tensor, post_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: fraction of each example's answer positions where the post-edit argmax equals the pre-edit one."""
    return _per_example(pre_logits.argmax(-1) == post_logits.argmax(-1), labels)


def top_k_agreement(pre_logits: torch.Tensor, post_logits: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """[B]: EasyEdit's locality (MultimodalTrainer: text k=1, image k=10). Logits [P, V] at every read position
    of each row (`counts[b]` of row b); per position, the k most likely tokens pre- and post-edit compared
    rank by rank; the fraction of (position, rank) pairs that agree, over all the row's positions."""
    same = pre_logits.topk(k, dim=-1).indices == post_logits.topk(k, dim=-1).indices
    return _per_row(same.float().mean(-1), counts, "attended positions")


def paired_id_agreement(pre_logits: torch.Tensor, post_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: VLKEB's locality (evaluate.py, compute_multimodal_edit_results). Each run yields the pair (argmax ids,
    target ids) at the answer positions and the pre- and post-edit pairs are compared element by element,
    so the target half always agrees: (A + agreeing argmax ids) / 2A for A answer tokens."""
    targets = labels[labels != IGNORE_INDEX]
    pairs = torch.stack([pre_logits.argmax(-1) == post_logits.argmax(-1), targets == targets], dim=-1)
    return _per_example(pairs.float().mean(-1), labels)


class _PerExampleMean(Metric):
    """Sums of per-example scores and of "all tokens score" flags, over `count` examples."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("token_acc_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("exact_match_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, scores: torch.Tensor) -> None:
        self.token_acc_sum += scores.double().sum()
        # A fraction k/k is exactly 1.0 in floating point, so this is "every answer token".
        self.exact_match_sum += (scores == 1.0).double().sum()
        self.count += scores.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "token_acc": (self.token_acc_sum / self.count).float(),
            "exact_match": (self.exact_match_sum / self.count).float(),
            "count": self.count.clone(),
        }


class EditAccuracy(_PerExampleMean):
    """Reliability / generality: compute() -> {"token_acc": mean answer-token accuracy,
    "exact_match": ..., "count": ...}."""

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._add(answer_token_accuracy(logits, labels))


class EditLocality(_PerExampleMean):
    """Locality: compute() -> {"token_acc": mean post/pre argmax agreement, "exact_match": all positions agree}."""

    def update(self, pre_logits: torch.Tensor, post_logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._add(locality_agreement(pre_logits, post_logits, labels))


class TopKAgreement(_PerExampleMean):
    """EasyEdit's locality over every attended position (`top_k_agreement`); "exact_match": all pairs agree."""

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = k

    def update(self, pre_logits: torch.Tensor, post_logits: torch.Tensor, counts: torch.Tensor) -> None:
        self._add(top_k_agreement(pre_logits, post_logits, counts, self.k))


class PairedIdAgreement(_PerExampleMean):
    """VLKEB's locality (`paired_id_agreement`) at the answer positions."""

    def update(self, pre_logits: torch.Tensor, post_logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._add(paired_id_agreement(pre_logits, post_logits, labels))


class PortabilityByHop(Metric):
    """Mean per-example answer-token accuracy (or exact match, with `exact=True`) per hop and over all.

    The hop names are fixed at construction so every rank holds the same state shape;
    compute() -> {hop: mean, ..., "all": mean}, leaving out hops with no examples.
    """

    full_state_update = False

    def __init__(self, hops: Sequence[str] = DEFAULT_HOPS, exact: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hops = tuple(hops)
        self.exact = exact
        if len(set(self.hops)) != len(self.hops) or "all" in self.hops:
            raise ValueError(f"hop names must be distinct and not 'all': {self.hops}")
        self._hop_index = {hop: i for i, hop in enumerate(self.hops)}
        self.add_state("score_sum", torch.zeros(len(self.hops), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(self.hops), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, hops: Sequence[str]) -> None:
        if len(hops) != labels.shape[0]:
            raise ValueError(f"{len(hops)} hop names for {labels.shape[0]} examples")
        unknown = sorted(set(hops) - set(self._hop_index))
        if unknown:
            raise ValueError(f"unknown hop names {unknown}; this metric tracks {self.hops}")
        index = torch.tensor([self._hop_index[h] for h in hops], device=labels.device)
        scores = (exact_match if self.exact else answer_token_accuracy)(logits, labels)
        self.score_sum.index_add_(0, index, scores.double())
        self.count.index_add_(0, index, torch.ones_like(index))

    def compute(self) -> dict[str, torch.Tensor]:
        result = {
            hop: (self.score_sum[i] / self.count[i]).float() for i, hop in enumerate(self.hops) if self.count[i] > 0
        }
        result["all"] = (self.score_sum.sum() / self.count.sum()).float()
        return result
