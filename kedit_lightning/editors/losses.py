"""Edit losses on answer tokens, as pure tensor functions.

Logits come for answer positions only (`Backbone.resume` computes the head nowhere else): row p of
`logits` [P, V] scores the p-th answer token of `labels` [N, T] in row-major order (labels != -100).
Both losses average per example first (mean over that example's answer tokens) and then over
examples, so a long answer weighs no more than a short one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_modules.encoding import IGNORE_INDEX


def _per_example_mean(token_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N]: the mean of each example's token values (0 for an example without answer tokens)."""
    mask = labels != IGNORE_INDEX
    example_of_token = mask.nonzero(as_tuple=True)[0]
    sums = token_values.new_zeros(labels.shape[0]).index_add(0, example_of_token, token_values)
    return sums / mask.sum(-1).clamp(min=1)


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N]: each example's mean negative log-likelihood of its answer tokens."""
    nll = F.cross_entropy(logits.float(), labels[labels != IGNORE_INDEX], reduction="none")
    return _per_example_mean(nll, labels)


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over examples of the mean negative log-likelihood of each example's answer tokens."""
    return per_example_nll(logits, labels).mean()


def masked_kl(pre_logits: torch.Tensor, post_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(pre || post) of the next-token distributions at answer positions, per-example token mean, then mean.

    `pre_logits` are the pre-edit model's, a constant target: no gradient flows into them.
    """
    pre_logp = F.log_softmax(pre_logits.detach().float(), dim=-1)
    post_logp = F.log_softmax(post_logits.float(), dim=-1)
    kl = F.kl_div(post_logp, pre_logp, reduction="none", log_target=True).sum(-1)
    return _per_example_mean(kl, labels).mean()


def per_example_prompt_last_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N]: each example's mean NLL of its answer tokens all read at its first answer position (the
    last prompt token's prediction): EasyEdit's FT-L objective `prompt_last`, after ROME's paper."""
    counts = (labels != IGNORE_INDEX).sum(-1)
    first = torch.cumsum(counts, 0) - counts
    log_probs = F.log_softmax(logits[first].float(), dim=-1)  # [N, V]; an example without answers reads garbage
    example_of_token = torch.repeat_interleave(torch.arange(len(counts), device=labels.device), counts)
    nll = -log_probs[example_of_token, labels[labels != IGNORE_INDEX]]
    return _per_example_mean(nll, labels)
