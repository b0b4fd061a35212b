"""IKE, in-context knowledge editing (Zheng et al. 2023, "Can we edit factual knowledge by in-context
learning?"): the weights never change; an edit is a context put before every prompt answered under it.

As EasyEdit's IKE: each demonstration record gives three sentences, "New Fact: {src} {alt}\\nPrompt: ..."
followed by the fact itself (copy), its rephrase (update) and its locality prompt with its own answer
(retain). An edit's context is the `k` sentences most similar to its fact, least similar first, then
"New Fact: {prompt} {target}\\nPrompt: ", and the prompt answered follows. Similarity: EasyEdit embeds
sentences with all-MiniLM-L6-v2; no sentence encoder ships here, so it is the cosine of mean input-token
embeddings of the backbone itself. Sentences are dropped, least similar first, until the context fits the
backbone's positions beside the widest row of the step. Image placeholders stay in the answered row only
(the fact is text), so an image prompt keeps one image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from data_modules.encoding import IGNORE_INDEX
from kedit_lightning.backbones.base import Backbone, answer_read_mask
from kedit_lightning.editors.edited_model import ConfiguredEditor, EditGroups, StepInputs

FACT = "New Fact: {fact}\nPrompt: "


def demonstration_sentences(records: Sequence[Any]) -> list[str]:
    """Copy, update and retain sentences of records with `src`, `alt`, `rephrase`, `loc`, `loc_ans` (text
    or image records; texts as they are in the record)."""
    sentences = []
    for r in records:
        fact = f"{r.src} {r.alt}"
        prompts = [fact, f"{r.rephrase} {r.alt}", f"{r.loc} {r.loc_ans}"]
        sentences += [FACT.format(fact=fact) + prompt + "\n\n" for prompt in prompts]
    return sentences


class ContextEditedModel(EditGroups):
    """A backbone with pending in-context edits: each group is a context (token ids); a row answered
    under a group sees its chain's contexts, oldest first, before its prompt."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.contexts: list[torch.Tensor] = []
        self.in_force = backbone_ids(backbone, [])  # folded edits: the context of every row

    def add(self, contexts: Sequence[torch.Tensor], parents: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """New groups with these contexts on top of `parents` (-1: the unedited model); their ids."""
        groups = self.new_groups(parents)
        self.contexts += list(contexts)
        return groups

    def context(self, group: int) -> torch.Tensor:
        chain = self.chains(torch.tensor([group]))[0].tolist()[::-1] if group >= 0 else []
        return torch.cat([self.in_force, *(self.contexts[g] for g in chain if g >= 0)])

    @torch.no_grad()
    def answer_logits(self, inputs: StepInputs, rows: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """[P, V] logits at the answer positions of `rows` (row-major), each row after its group's context."""
        if groups is None and not len(self.in_force):
            return inputs.answer_logits(self.backbone, rows)
        groups = torch.full((len(rows),), -1) if groups is None else groups.cpu()
        ids, labels = [], []
        specials = set(self.backbone.processor.tokenizer.all_special_ids)
        for row, group in zip(rows.tolist(), groups.tolist()):
            length = int(inputs.fields["attention_mask"][row].sum())
            row_ids, row_labels = inputs.fields["input_ids"][row, :length], inputs.labels[row, :length]
            lead = next((i for i, t in enumerate(row_ids.tolist()) if t not in specials), length)
            context = self.context(group).to(row_ids.device)
            ids.append(torch.cat([row_ids[:lead], context, row_ids[lead:]]))
            labels.append(torch.cat([row_labels[:lead], torch.full_like(context, IGNORE_INDEX), row_labels[lead:]]))
        width = max(len(i) for i in ids)
        pad = self.backbone.processor.pad_token_id
        input_ids = torch.stack([F.pad(i, (0, width - len(i)), value=pad) for i in ids])
        mask = torch.stack([F.pad(torch.ones_like(i), (0, width - len(i))) for i in ids])
        label_ids = torch.stack([F.pad(lab, (0, width - len(lab)), value=IGNORE_INDEX) for lab in labels])
        features = None
        if inputs.image_features is not None:
            image_rows = inputs.image_rows(rows)
            features = inputs.image_features[image_rows[image_rows >= 0]] if bool((image_rows >= 0).any()) else None
        state = self.backbone.prefix(input_ids, mask, features)
        return self.backbone.head(self.backbone.resume(state, answer_read_mask(label_ids)))

    def fold(self) -> None:
        """Every group's context in force for every row, in the order the groups were opened."""
        self.in_force = torch.cat([self.in_force, *self.contexts])
        self.contexts = [c[:0] for c in self.contexts]

    @contextmanager
    def unedited(self) -> Iterator[None]:
        in_force, self.in_force = self.in_force, self.in_force[:0]
        try:
            yield
        finally:
            self.in_force = in_force

    def drop_after(self, mark: int) -> None:
        del self.parents[mark:], self.contexts[mark:]

    def restore(self) -> None:
        self.parents.clear()
        self.contexts.clear()
        self.in_force = self.in_force[:0]


def backbone_ids(backbone: Backbone, texts: Sequence[str]) -> torch.Tensor:
    """The token ids of `texts` one after another, without special tokens, on the backbone's device."""
    tokenizer = backbone.processor.tokenizer
    ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return torch.tensor(ids, dtype=torch.long, device=backbone.model.get_input_embeddings().weight.device)


class IKE(ConfiguredEditor):
    """In-context editing with the `k` most similar demonstration sentences (`demonstrate` sets them)."""

    def __init__(self, k: int = 16) -> None:
        super().__init__()
        self.k = k
        self.sentences: list[str] = []
        self._bank: tuple[Backbone, list[torch.Tensor], torch.Tensor] | None = None

    @property
    def config(self) -> dict[str, Any]:
        return {"k": self.k}

    def demonstrate(self, records: Sequence[Any]) -> IKE:
        """Demonstrations from these records (the training edits); returns the editor."""
        self.sentences = demonstration_sentences(records)
        self._bank = None
        return self

    def edited_model(self, backbone: Backbone) -> ContextEditedModel:
        return ContextEditedModel(backbone)

    def _embed(self, backbone: Backbone, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(backbone.model.get_input_embeddings()(ids).float().mean(0), dim=-1)

    def bank(self, backbone: Backbone) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each demonstration sentence's token ids and unit embedding, for `backbone`."""
        if self._bank is None or self._bank[0] is not backbone:
            ids = [backbone_ids(backbone, [s]) for s in self.sentences]
            with torch.no_grad():
                embedded = torch.stack([self._embed(backbone, i) for i in ids]) if ids else torch.empty(0)
            self._bank = (backbone, ids, embedded)
        return self._bank[1], self._bank[2]

    @torch.no_grad()
    def forward(
        self,
        model: ContextEditedModel,
        inputs: StepInputs,
        rows: torch.Tensor,
        on_top_of: torch.Tensor | None = None,
        batched: bool = False,
    ) -> torch.Tensor:
        """Each row's fact (or, `batched`, all rows' facts) as a context; its group per row."""
        backbone = model.backbone
        sentences, embedded = self.bank(backbone)
        skip = {*backbone.processor.tokenizer.all_special_ids, backbone.image_token_id}
        facts = []
        for row in rows.tolist():
            ids = inputs.fields["input_ids"][row, : int(inputs.fields["attention_mask"][row].sum())]
            facts.append(ids[torch.tensor([t not in skip for t in ids.tolist()], dtype=torch.bool, device=ids.device)])
        if batched:
            facts = [torch.cat(facts)]
        widest = int(inputs.fields["attention_mask"].sum(-1).max())
        budget = None if backbone.processor.max_length is None else backbone.processor.max_length - widest
        contexts = [self._context(backbone, fact, sentences, embedded, budget) for fact in facts]
        parents = torch.full((len(rows),), -1) if on_top_of is None else on_top_of.cpu()
        groups = model.add(contexts, parents[: len(contexts)])
        return groups.expand(len(rows)) if batched else groups

    def _context(
        self,
        backbone: Backbone,
        fact: torch.Tensor,
        sentences: list[torch.Tensor],
        embedded: torch.Tensor,
        budget: int | None,
    ) -> torch.Tensor:
        """Demonstrations (least similar first), then the new fact, within `budget` tokens when it fits."""
        head, tail = backbone_ids(backbone, ["New Fact: "]), backbone_ids(backbone, ["\nPrompt: "])
        own = torch.cat([head, fact, tail])
        chosen: list[torch.Tensor] = []
        if sentences and self.k > 0:
            similarity = embedded @ self._embed(backbone, fact)
            order = similarity.argsort(descending=True)[: self.k].tolist()
            chosen = [sentences[i] for i in order]
            while chosen and budget is not None and sum(len(s) for s in chosen) + len(own) > budget:
                chosen.pop()
        return torch.cat([*chosen[::-1], own])
