"""Greedy generation on an edited model: the one decoder of `kedit eval --generate`, `kedit facts` and the
TensorBoard examples, and the generated-answer metrics (`gen_*`).

Decoding runs through `EditedModel.answer_logits`, so every row is answered under its own edit group
(weight edits through `WeightEditedModel`'s hooks, SERAC's routing) and image rows keep their image
features in the prefix. Each step re-reads the whole row (prompt + tokens so far + one filler whose
label marks where the next token is read): no cache to keep in step with the edit hooks, and a row
needs only its target's token count plus a small margin of steps.

A generated answer matches a reference when the normalised words (case, punctuation and whitespace
folded) of the generation start with those of the reference: the answer is the target's words, whatever
follows them. Locality-type rows take as reference the unedited model's own generation, cut to the
record's answer word count, so they measure whether the edit changed what the model says.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from data_modules.encoding import IGNORE_INDEX, SubBatch
from kedit_lightning.backbones.base import Backbone
from kedit_lightning.editors.edited_model import EditedModel, StepInputs

MARGIN_TOKENS = 2
"""Tokens decoded past the target's own count: room for an extra piece without a long continuation."""
TOKEN_FIELDS = (("input_ids", "attention_mask", "labels"), ("cf_ids", "cf_mask", "cf_labels"))
"""(ids, mask, labels) field triples a sub-batch may carry: the backbone's, and SERAC's counterfactual tokens
(its answer tokens equal the base's, checked by SERACEncoder), both extended by every decoded token."""
GEN_SUB_BATCH = {
    "gen_reliability": "edit_inner",
    "gen_t_generality": "edit_outer",
    "gen_i_generality": "edit_outer_image",
    "gen_t_locality": "loc",
    "gen_i_locality": "loc_image",
    "gen_n_locality": "neighbor",
}
GEN_LOCALITY = ("gen_t_locality", "gen_i_locality", "gen_n_locality")
_PUNCTUATION = str.maketrans(string.punctuation, " " * len(string.punctuation))


def normalize_answer(text: str) -> list[str]:
    """The words of `text`, lower-cased, punctuation read as a space."""
    return text.lower().translate(_PUNCTUATION).split()


def answer_matches(generated: str, reference: str) -> bool:
    """Whether the generation starts with the reference's words (both normalised); an empty reference never matches."""
    words = normalize_answer(reference)
    return bool(words) and normalize_answer(generated)[: len(words)] == words


def same_answer(post: str, pre: str, target: str) -> bool:
    """Whether two generations give the same answer: their first words, as many as the target has, agree."""
    count = len(normalize_answer(target))
    return normalize_answer(post)[:count] == normalize_answer(pre)[:count]


def _extended(sub_batch: SubBatch, generated: torch.Tensor, filler: int) -> SubBatch:
    """`sub_batch` with every row's answer replaced by `generated` [N, S] plus one filler token, the answer
    labels on those S + 1 positions: the last answer position's logits are the next token's, and the filler,
    the row's last token, is never attended to. Other fields (SERAC's prompt-only classifier tokens) stay."""
    out: dict[str, Any] = dict(sub_batch)
    n, steps = generated.shape
    for ids_key, mask_key, labels_key in TOKEN_FIELDS:
        if labels_key not in sub_batch:
            continue
        ids, labels = sub_batch[ids_key], sub_batch[labels_key]
        prompt = (labels != IGNORE_INDEX).int().argmax(-1).tolist()  # each row's first answer position
        width = max(prompt) + steps + 1
        new_ids = torch.zeros(n, width, dtype=ids.dtype, device=ids.device)
        new_mask = torch.zeros_like(new_ids)
        new_labels = torch.full_like(new_ids, IGNORE_INDEX)
        tail = torch.cat([generated.to(ids.device), torch.full((n, 1), filler, device=ids.device)], 1)
        for row, length in enumerate(prompt):
            new_ids[row, :length] = ids[row, :length]
            new_ids[row, length : length + steps + 1] = tail[row]
            new_labels[row, length : length + steps + 1] = tail[row]
            new_mask[row, : length + steps + 1] = 1
        out.update({ids_key: new_ids, mask_key: new_mask, labels_key: new_labels})
    return out


def next_tokens(backbone: Backbone, logits: torch.Tensor) -> torch.Tensor:
    """[N, 1]: the argmax of next-token logits [N, V], never an image placeholder (it would need an image)."""
    if backbone.image_token_id is not None and backbone.image_token_id < logits.shape[-1]:
        logits = logits.clone()
        logits[:, backbone.image_token_id] = float("-inf")
    return logits.argmax(-1, keepdim=True)


@torch.no_grad()
def greedy_tokens(
    model: EditedModel,
    backbone: Backbone,
    sub_batches: Mapping[str, SubBatch],
    groups: torch.Tensor | None,
    max_new_tokens: torch.Tensor | int,
) -> list[list[int]]:
    """Each row's greedy continuation of its prompt (the tokens before its answer), under `model` with
    row i in edit group `groups[i]` (None: unedited); rows in the order of `sub_batches`, stacked. Row i
    gets at most `max_new_tokens[i]` tokens and stops at the end-of-sequence token (not returned)."""
    n = sum(sub["input_ids"].shape[0] for sub in sub_batches.values())
    limits = torch.as_tensor(max_new_tokens).expand(n).tolist()
    eos = backbone.processor.tokenizer.eos_token_id
    device = next(iter(sub_batches.values()))["input_ids"].device
    generated = torch.empty(n, 0, dtype=torch.long, device=device)
    for step in range(max(limits)):
        rows, start = {}, 0
        for name, sub in sub_batches.items():
            size = sub["input_ids"].shape[0]
            rows[name] = _extended(sub, generated[start : start + size], backbone.processor.pad_token_id)
            start += size
        inputs = StepInputs(backbone, rows)
        logits = model.answer_logits(inputs, inputs.rows(*rows), groups).view(n, step + 1, -1)[:, -1]
        generated = torch.cat([generated, next_tokens(backbone, logits)], 1)
        if eos is not None and bool((generated == eos).any(-1).all()):
            break
    out = []
    for row, limit in zip(generated.tolist(), limits):
        row = row[:limit]
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def greedy_answers(
    model: EditedModel,
    backbone: Backbone,
    sub_batches: Mapping[str, SubBatch],
    groups: torch.Tensor | None = None,
    max_new_tokens: torch.Tensor | int | None = None,
) -> list[str]:
    """`greedy_tokens` decoded to text (as generated: a leading space or line break kept); by default each row
    decodes its answer's token count + `MARGIN_TOKENS`."""
    if max_new_tokens is None:
        max_new_tokens = torch.cat([answer_token_counts(sub) for sub in sub_batches.values()]) + MARGIN_TOKENS
    tokenizer = backbone.processor.tokenizer
    tokens = greedy_tokens(model, backbone, sub_batches, groups, max_new_tokens)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]


def answer_token_counts(sub_batch: SubBatch) -> torch.Tensor:
    return (sub_batch["labels"] != IGNORE_INDEX).sum(-1).cpu()


def target_texts(backbone: Backbone, sub_batch: SubBatch) -> list[str]:
    """Each row's target as text (its answer tokens decoded)."""
    tokenizer = backbone.processor.tokenizer
    return [tokenizer.decode(row[row != IGNORE_INDEX].tolist()).strip() for row in sub_batch["labels"]]


class GenerationMetrics(nn.Module):
    """Exact match of generated answers (`gen_*` keys), averaged over rows, updated one batch at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.scores = nn.ModuleDict({key: MeanMetric() for key in GEN_SUB_BATCH})

    @torch.no_grad()
    def update(
        self, model: EditedModel, backbone: Backbone, batch: Mapping[str, Any], groups: Mapping[str, torch.Tensor]
    ) -> None:
        """Score the sub-batches of `batch` that have a `gen_*` key, each row under its group in `groups`
        (per sub-batch name); locality rows also decode unedited, for their reference."""
        names = {key: name for key, name in GEN_SUB_BATCH.items() if name in batch and name in groups}
        subs = {name: batch[name] for name in names.values()}
        post = greedy_answers(model, backbone, subs, torch.cat([groups[name] for name in subs]))
        local = {name: batch[name] for key, name in names.items() if key in GEN_LOCALITY}
        pre = []
        if local:
            with model.unedited():
                pre = greedy_answers(model, backbone, local)
        post_by, pre_by, start, pre_start = {}, {}, 0, 0
        for name, sub in subs.items():
            size = sub["input_ids"].shape[0]
            post_by[name] = post[start : start + size]
            start += size
            if name in local:
                pre_by[name] = pre[pre_start : pre_start + size]
                pre_start += size
        for key, name in names.items():
            targets = target_texts(backbone, batch[name])
            if key in GEN_LOCALITY:
                hits = [same_answer(g, p, t) for g, p, t in zip(post_by[name], pre_by[name], targets)]
            else:
                hits = [answer_matches(g, t) for g, t in zip(post_by[name], targets)]
            self.scores[key].update(torch.tensor(hits, dtype=torch.float32))

    def compute(self) -> dict[str, float]:
        """The `gen_*` scores of the sub-batches seen (the image ones are absent for text-only data)."""
        return {key: float(metric.compute()) for key, metric in self.scores.items() if metric.update_count}

    def reset(self) -> None:
        for metric in self.scores.values():
            metric.reset()
