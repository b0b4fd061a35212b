"""Turn (prompt, target, image) triples into one tokenized sub-batch of an EditBatch.

The tokenizer and image processor come from the backbone side (each family knows its own
prompt layout and how many image placeholder tokens it needs); this module only applies them,
once, in the data pipeline, so that no model forward ever tokenizes text.

A sub-batch is a dict:
    input_ids       LongTensor [B, T]   prompt (with image placeholders) + " " + target, right-padded
    attention_mask  LongTensor [B, T]
    labels          LongTensor [B, T]   target token ids, -100 on prompt, image placeholders and padding
    pixel_values    FloatTensor [B, C, H, W] or None for text-only sub-batches (a family may shape it
                    otherwise: Qwen2-VL's [B, patches, D], NaN past a row's own patches)

A row's visual input is one image, a list of frames (video) or a dict of named views; a family
accepts the kinds in its `visual_inputs` and refuses the others.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data_modules.visual import LoadedVisual, visual_kind

IGNORE_INDEX = -100

SubBatch = dict[str, torch.Tensor | None]
EditBatch = dict[str, SubBatch]
"""Sub-batches keyed `edit_inner`, `edit_outer`, `edit_outer_image`, `loc`, `loc_image` and,
where the data has portability questions, `port` (plus `port_hops`, a list of hop names)."""

SUB_BATCH_KEYS = ("edit_inner", "edit_outer", "edit_outer_image", "loc", "loc_image")


class TooLongError(ValueError):
    """A row's prompt + target has more tokens than the backbone has positions; `row` says which,
    so a collator, which knows each row's record and field, can name them."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(f"row {row}: {message}")
        self.row = row
        self.detail = message


@dataclass(frozen=True)
class PromptFormat:
    """How a backbone family lays out a prompt.

    `with_image` and `text_only` are templates with `{prompt}`; `with_image` also has `{image}`,
    replaced by `image_token` repeated `num_image_tokens` times (the placeholders the model swaps
    for visual embeddings).
    """

    with_image: str = "{image}{prompt}"
    text_only: str = "{prompt}"
    image_token: str = "<image>"
    num_image_tokens: int = 0

    def render(self, prompt: str, has_image: bool, image: str | None = None) -> str:
        """The prompt laid out; `image` (the placeholder text) defaults to `num_image_tokens` image tokens."""
        if not has_image:
            return self.text_only.format(prompt=prompt)
        return self.with_image.format(image=image or self.image_token * self.num_image_tokens, prompt=prompt)


class SubBatchEncoder:
    """Tokenize prompts and targets together and mask everything but the target tokens.

    The full text `prompt + " " + target` is tokenized in one call (so the target's tokens are
    exactly those the model would produce after the prompt), and a token is a target token when
    its character span reaches past the separating space (SentencePiece pieces carry that space,
    BPE pieces do not; both count). This is tokenizer-agnostic: BPE, SentencePiece
    and word-level tokenizers all report offsets through the fast-tokenizer API.

    `max_length` (the backbone's positions) bounds every row: a longer one raises `TooLongError`, or
    with `truncate_prompts` loses prompt tokens from the left until it fits (the target is kept whole).
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any | None = None,
        prompt_format: PromptFormat = PromptFormat(),
        max_length: int | None = None,
        truncate_prompts: bool = False,
        family: str = "this backbone",
        visual_inputs: Collection[str] = ("image",),
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets are needed to mask prompts"
            )
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt_format = prompt_format
        self.max_length = max_length
        self.truncate_prompts = truncate_prompts
        self.family = family
        self.visual_inputs = frozenset(visual_inputs)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def __call__(
        self,
        prompts: Sequence[str],
        targets: Sequence[str],
        images: Sequence[LoadedVisual] | None = None,
    ) -> SubBatch:
        if len(prompts) != len(targets) or (images is not None and len(images) != len(prompts)):
            raise ValueError(
                f"{len(prompts)} prompts, {len(targets)} targets and {len(images or [])} images do not line up"
            )
        has_image = images is not None
        visuals = [self.check_visual(row, v) for row, v in enumerate(images)] if has_image else [False] * len(prompts)
        texts = [self.text(p, t, v) for p, t, v in zip(prompts, targets, visuals)]
        enc = self.tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
        rows, labels = [], []
        for row, (prompt, target, visual) in enumerate(zip(prompts, targets, visuals)):
            ids, offsets = enc["input_ids"][row], enc["offset_mapping"][row]
            if self.max_length is not None and len(ids) > self.max_length:
                if not self.truncate_prompts:
                    raise TooLongError(row, self.too_long(len(ids)))
                prompt, ids, offsets = self._truncate(row, prompt, target, visual, len(ids) - self.max_length)
            start = len(self.render(prompt, visual)) + 1
            is_target = [e >= start and e > s for s, e in offsets]
            if not any(is_target):
                raise ValueError(f"the target of {texts[row]!r} produced no tokens")
            rows.append(ids)
            labels.append([i if t else IGNORE_INDEX for i, t in zip(ids, is_target)])
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        label_tensor = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, lab) in enumerate(zip(rows, labels)):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            label_tensor[b, : len(lab)] = torch.tensor(lab)
        pixel_values = None
        if has_image:
            if self.image_processor is None:
                raise ValueError("images given but this backbone has no image processor")
            pixel_values = self.pixel_values(visuals)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": label_tensor,
            "pixel_values": pixel_values,
        }

    def check_visual(self, row: int, visual: LoadedVisual) -> LoadedVisual:
        """`visual` if this backbone takes its kind; a one-line error naming the family otherwise."""
        kind = visual_kind(visual)
        if kind not in self.visual_inputs:
            count = f" of {len(visual)}" if kind != "image" else ""
            raise ValueError(
                f"{self.family}: row {row} has a {kind} input{count}; this backbone takes {sorted(self.visual_inputs)}"
            )
        return visual

    def pixel_values(self, visuals: Sequence[LoadedVisual]) -> torch.Tensor:
        """The image processor's pixels of the rows' images (families taking video or views override this)."""
        return self.image_processor(images=[im.convert("RGB") for im in visuals], return_tensors="pt")["pixel_values"]

    def placeholders(self, visual: LoadedVisual | bool) -> str | None:
        """The placeholder text standing for a row's visual input (True: one image); None for a text-only row."""
        if visual is False or visual is None:
            return None
        return self.prompt_format.image_token * self.prompt_format.num_image_tokens

    def render(self, prompt: str, visual: LoadedVisual | bool) -> str:
        image = self.placeholders(visual)
        return self.prompt_format.render(prompt, image is not None, image)

    def text(self, prompt: str, target: str, visual: LoadedVisual | bool) -> str:
        """The text one row tokenizes: the rendered prompt, a space, the target."""
        return f"{self.render(prompt, visual)} {target}"

    def lengths(
        self, prompts: Sequence[str], targets: Sequence[str], has_image: Sequence[LoadedVisual | bool]
    ) -> list[int]:
        """Token counts of rows, without tensors (True: one image): for checking a whole split up front."""
        texts = [self.text(p, t, i) for p, t, i in zip(prompts, targets, has_image)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def too_long(self, tokens: int) -> str:
        return (
            f"prompt + answer is {tokens} tokens, more than the backbone's {self.max_length} positions "
            "(shorten it, or set truncate_prompts to cut the prompt from the left)"
        )

    def _truncate(
        self, row: int, prompt: str, target: str, visual: LoadedVisual | bool, excess: int
    ) -> tuple[str, list[int], list[tuple[int, int]]]:
        """(prompt, ids, offsets) with the first prompt tokens dropped until the row fits in `max_length`.

        The prompt text is cut at a token start (not the rendered ids), so template tokens and image
        placeholders stay; re-tokenizing at the cut can shift a token, hence the loop.
        """
        while excess > 0:
            starts = [
                s
                for s, _ in self.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)[
                    "offset_mapping"
                ]
            ]
            if excess >= len(starts):
                raise TooLongError(row, f"the answer alone needs more than the backbone's {self.max_length} positions")
            prompt = prompt[starts[excess] :]
            enc = self.tokenizer(
                self.text(prompt, target, visual), return_offsets_mapping=True, add_special_tokens=True
            )
            excess = len(enc["input_ids"]) - self.max_length
        return prompt, enc["input_ids"], enc["offset_mapping"]
