"""Edit losses on answer tokens, as pure tensor functions.

Logits are aligned with labels (the Backbone contract: `logits[:, t]` scores `labels[:, t]`) and
`labels == -100` marks positions that are not supervised. Both losses average per example first
(mean over that example's answer tokens) and then over examples, so a long answer weighs no more
than a short one. Only answer positions reach the softmax, which keeps the [B, T, V] float32
copy of a large-vocabulary model out of memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_modules.encoding import IGNORE_INDEX


def _answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask [B, T], example index of each answer token [N], answer tokens per example [B])."""
    mask = labels != IGNORE_INDEX
    example_of_token = mask.nonzero(as_tuple=True)[0]
    return mask, example_of_token, mask.sum(-1)


def _mean_per_example(
    token_values: torch.Tensor, example_of_token: torch.Tensor, tokens_per_example: torch.Tensor
) -> torch.Tensor:
    """Mean over each example's tokens, then over examples (an example without tokens counts as 0)."""
    sums = token_values.new_zeros(tokens_per_example.shape[0]).index_add(0, example_of_token, token_values)
    return (sums / tokens_per_example.clamp(min=1)).mean()


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over examples of the mean negative log-likelihood of each example's answer tokens."""
    mask, example_of_token, counts = _answer_positions(labels)
    nll = F.cross_entropy(logits[mask].float(), labels[mask], reduction="none")
    return _mean_per_example(nll, example_of_token, counts)


def masked_kl(pre_logits: torch.Tensor, post_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(pre || post) of the next-token distributions on answer positions, per-example token mean, then mean.

    `pre_logits` are the pre-edit model's, a constant target: no gradient flows into them.
    """
    mask, example_of_token, counts = _answer_positions(labels)
    pre_logp = F.log_softmax(pre_logits[mask].detach().float(), dim=-1)
    post_logp = F.log_softmax(post_logits[mask].float(), dim=-1)
    kl = F.kl_div(post_logp, pre_logp, reduction="none", log_target=True).sum(-1)
    return _mean_per_example(kl, example_of_token, counts)
