"""VLKEB (Huang et al. 2024, "VLKEB: A Large Vision-Language Model Knowledge Editing Benchmark",
arXiv:2403.07350): edits with multi-hop portability questions.

Files, relative to `data_dir`: `train.json` (edits, no portability questions), `eval.json` (the eval
edits), `eval_multihop.json` (the eval edits, most with `port_new`: at most one question per hop, "1-hop"
.. "4-hop") and `eval_edit_onehop.json` (the one-hop-edit variant, VLKEB Sec. 4.5); `kedit synth` writes
them under `vlkeb/`. In that variant the edited entity's one-hop fact is edited too after the main edit,
so batches carry, besides `port`, `port_edit` (port_edit_q + port_edit_a, with the record's image) and
`port_edit_row` (LongTensor: the `port` row each `port_edit` row belongs to): an evaluator applies that
edit after the record's main edit and before scoring the `port` row.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from data_modules.datamodules import EditDataModule
from data_modules.datasets import (
    DataKind,
    EditCollator,
    EditDataset,
    EditExample,
    PromptBuilder,
    edit_example,
    encode_rows,
    example_where,
)
from data_modules.encoding import EditBatch
from data_modules.records import DataError, EditRecord
from data_modules.shards import ExampleBuilder

HOPS = {1: "1-hop", 2: "2-hop", 3: "3-hop", 4: "4-hop"}


def hop_names(hops: Sequence[int] | Literal["all"]) -> tuple[str, ...] | None:
    """The `port_type` names of `hops` (1..4), or None for all."""
    if hops == "all":
        return None
    chosen = sorted(set(hops))
    if not chosen or any(h not in HOPS for h in chosen):
        raise ValueError(f"hops must be 'all' or a non-empty list of {sorted(HOPS)}, got {hops!r}")
    return tuple(HOPS[h] for h in chosen)


def select_hops(record: EditRecord, hops: Collection[str] | None) -> EditRecord:
    """The record with only its portability questions at `hops` (all of them for None)."""
    return record if hops is None else replace(record, port=tuple(q for q in record.port if q.hop in hops))


def port_edits(record: EditRecord, prompts: PromptBuilder) -> list[tuple[int, str, str]]:
    """(position among the record's port questions, prompt, answer) of each one-hop edit."""
    return [
        (position, prompts.question(q.edit_question), q.edit_answer)
        for position, q in enumerate(record.port)
        if q.edit_answer
    ]


@dataclass
class VLKEBExample(EditExample):
    """An `EditExample` plus the one-hop edits of its portability questions (see `port_edits`)."""

    port_edit: list[tuple[int, str, str]] = field(default_factory=list)


class VLKEBDataset(EditDataset):
    """`EditDataset` whose examples carry the one-hop edits."""

    def __getitem__(self, position: int) -> VLKEBExample:
        example = super().__getitem__(position)
        return VLKEBExample(**vars(example), port_edit=port_edits(self.records[position], self.prompts))


class VLKEBExamples:
    """Shard record -> [VLKEBExample] with the hop selection applied; [] for a record left out."""

    def __init__(self, kind: DataKind, vqa_template: str, hops: tuple[str, ...] | None, require_port: bool) -> None:
        self.prompts = PromptBuilder(kind, vqa_template)
        self.hops = hops
        self.require_port = require_port
        self.skips_records = require_port

    def __call__(self, record: EditRecord, images: Mapping[str, Image.Image]) -> list[VLKEBExample]:
        record = select_hops(record, self.hops)
        if self.require_port and not record.port:
            return []
        example = edit_example(record, images, self.prompts)
        return [VLKEBExample(**vars(example), port_edit=port_edits(record, self.prompts))]


class VLKEBCollator(EditCollator):
    """`EditCollator` plus `port_edit` / `port_edit_row` when a batch has one-hop edits."""

    def __call__(self, examples: Sequence[VLKEBExample]) -> EditBatch:
        batch: dict[str, Any] = super().__call__(examples)
        rows, offset = [], 0
        for example in examples:
            rows += [
                (offset + position, prompt, answer, example.image, example_where(example, f"port_new[{position}]"))
                for position, prompt, answer in example.port_edit
            ]
            offset += len(example.port)
        if rows:
            batch["port_edit"] = encode_rows(
                self.processor, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows]
            )
            batch["port_edit_row"] = torch.tensor([r[0] for r in rows], dtype=torch.long)
        return batch


class VLKEBDataModule(EditDataModule):
    """VLKEB edits with per-hop `port` sub-batches.

    `hops`: "all", or the hops (1..4) whose portability questions are kept. `require_port`: leave val/test
    records without a question at those hops out (as VLKEB's multi-hop runs do) instead of scoring them on
    the other metrics only; README.md ("VLKEB") says which setting gives which of VLKEB's numbers. Train is
    never filtered; streamed from shards with `require_port`, a val/test loader's length is not known
    before reading.
    """

    def __init__(
        self,
        data_dir: str,
        train_file: str = "train.json",
        val_file: str = "eval_multihop.json",
        hops: list[int] | Literal["all"] = "all",
        require_port: bool = False,
        **kwargs: Any,
    ) -> None:
        self.hops = hop_names(hops)
        self.require_port = require_port
        super().__init__(data_dir, train_file, val_file, kind="vqa", **kwargs)

    def read_split(self, split: str) -> list[EditRecord]:
        records = [select_hops(r, self.hops) for r in super().read_split(split)]
        if not self.require_port or split == "train":
            return records
        kept = [r for r in records if r.port]
        if not kept:
            raise DataError(
                f"{self.data_dir / self.files[split]}: no record has a portability question "
                f"at {self.hops or 'any hop'} (require_port is set)"
            )
        return kept

    def build_dataset(self, split: str) -> Dataset:
        return VLKEBDataset(
            self.split_records(split), self.image_root, self.kind, self.vqa_template, self.max_image_pixels
        )

    def build_collator(self) -> Callable[[list[Any]], Any]:
        return VLKEBCollator(self.require_processor())

    def example_builder(self, split: str) -> ExampleBuilder:
        return VLKEBExamples(self.kind, self.vqa_template, self.hops, self.require_port and split != "train")
