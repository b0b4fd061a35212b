"""LightningDataModules for E-VQA / E-IC style data, configurable from YAML (LightningCLI).

Files are relative to `data_dir`; `image_root` is relative to `data_dir` unless absolute.
`setup()` reads and checks a split in the main process (JSON, fields, targets, that every image
file exists) and raises one `DataError` naming the first problems, so a bad file never surfaces
as a crash in a DataLoader worker halfway through an epoch.

The tokenizer and image processor come from the backbone: `processor` (a `SubBatchEncoder`) is
normally left out of the config and set after construction, `datamodule.processor =
backbone.processor` (LightningCLI: link the model's processor to `data.processor` with
`apply_on="instantiate"`). Loaders refuse to start while it is None.

Where records come from is one method, `read_split`; the datasets and loaders only see a list
of `EditRecord`, so another source (webdataset shards) can replace the JSON + folder reader.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from data_modules.datasets import VQA_TEMPLATE, DataKind, EditCollator, EditDataset, FactCollator, FactDataset, PromptBuilder
from data_modules.encoding import SubBatchEncoder
from data_modules.records import DataError, EditRecord, check_images, read_records
from data_modules.synthetic import WORLD_FILE, write_synthetic_world


class EditDataModule(LightningDataModule):
    """Edit batches (`EditCollator`) from a train, a val and an optional test file."""

    def __init__(
        self,
        data_dir: str,
        train_file: str,
        val_file: str,
        test_file: str | None = None,
        image_root: str = "images",
        kind: DataKind = "vqa",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        vqa_template: str = VQA_TEMPLATE,
        processor: SubBatchEncoder | None = None,
        synthesize: bool = False,
    ) -> None:
        super().__init__()
        PromptBuilder(kind, vqa_template)  # fail on a bad kind or template at construction, not in a worker
        self.save_hyperparameters(ignore=["processor"])
        self.data_dir = Path(data_dir)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.image_root = self.data_dir / image_root  # an absolute image_root replaces data_dir
        self.kind = kind
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.vqa_template = vqa_template
        self.processor = processor
        self.synthesize = synthesize
        self.records: dict[str, list[EditRecord]] = {}

    def prepare_data(self) -> None:
        """With `synthesize`, write the synthetic world (and its word tokenizer) if `data_dir` has none."""
        if not self.synthesize or (self.data_dir / WORLD_FILE).is_file():
            return
        # Imported here: the tokenizer module needs the backbone families, which import this package.
        from kedit_lightning.backbones.word_tokenizer import save_world_tokenizer

        write_synthetic_world(self.data_dir)
        save_world_tokenizer(self.data_dir)

    def read_split(self, split: str) -> list[EditRecord]:
        """The checked records of one split; one `DataError` for bad JSON, fields or missing images."""
        name = self.files[split]
        if name is None:
            raise ValueError(f"{type(self).__name__}: no {split}_file configured")
        path = self.data_dir / name
        records = read_records(path)
        problems = check_images(records, self.image_root, str(path), verify=False)
        if problems:
            raise DataError(problems)
        return records

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], None: ["train", "val"]}.get(stage, [])
        for split in splits:
            if split not in self.records:
                self.records[split] = self.read_split(split)

    def build_dataset(self, split: str) -> Dataset:
        return EditDataset(self.split_records(split), self.image_root, self.kind, self.vqa_template)

    def build_collator(self) -> Callable[[list[Any]], Any]:
        return EditCollator(self.require_processor())

    def split_records(self, split: str) -> list[EditRecord]:
        if split not in self.records:
            raise RuntimeError(f"{type(self).__name__}: the {split} split is not loaded; call setup() first (the Trainer does)")
        return self.records[split]

    def require_processor(self) -> SubBatchEncoder:
        if self.processor is None:
            raise RuntimeError(
                f"{type(self).__name__}.processor is not set: assign the backbone's SubBatchEncoder "
                "(`datamodule.processor = backbone.processor`; LightningCLI links it from the model) before loading batches"
            )
        return self.processor

    def loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.build_dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=self.build_collator(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)


class VQADataModule(EditDataModule):
    """E-VQA: `vqa_train.json` / `vqa_eval.json`, prompts through the VQA template."""

    def __init__(
        self,
        data_dir: str,
        train_file: str = "vqa_train.json",
        val_file: str = "vqa_eval.json",
        test_file: str | None = None,
        image_root: str = "images",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        vqa_template: str = VQA_TEMPLATE,
        processor: SubBatchEncoder | None = None,
        synthesize: bool = False,
    ) -> None:
        super().__init__(data_dir, train_file, val_file, test_file, image_root, "vqa", batch_size, num_workers, seed, vqa_template, processor, synthesize)


class CaptionDataModule(EditDataModule):
    """E-IC: `caption_train_edit.json` / `caption_eval_edit.json`, caption prompts used as they are."""

    def __init__(
        self,
        data_dir: str,
        train_file: str = "caption_train_edit.json",
        val_file: str = "caption_eval_edit.json",
        test_file: str | None = None,
        image_root: str = "images",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        vqa_template: str = VQA_TEMPLATE,
        processor: SubBatchEncoder | None = None,
        synthesize: bool = False,
    ) -> None:
        super().__init__(data_dir, train_file, val_file, test_file, image_root, "caption", batch_size, num_workers, seed, vqa_template, processor, synthesize)


class FactsDataModule(EditDataModule):
    """Pre-edit facts (`FactCollator` batches) for fine-tuning a base model to know the world.

    Train: the facts of the train and val records together, since the editor is later evaluated
    on the val edits and the base model must first know what they change. Val: the val file's
    facts. They are also trained on, on purpose: validation measures how well the base model
    has learned the facts it will be edited on, not generalization to unseen facts.
    Test (optional): the test file's facts.
    """

    def __init__(
        self,
        data_dir: str,
        train_file: str = "vqa_train.json",
        val_file: str = "vqa_eval.json",
        test_file: str | None = None,
        image_root: str = "images",
        kind: DataKind = "vqa",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        vqa_template: str = VQA_TEMPLATE,
        processor: SubBatchEncoder | None = None,
        synthesize: bool = False,
    ) -> None:
        super().__init__(data_dir, train_file, val_file, test_file, image_root, kind, batch_size, num_workers, seed, vqa_template, processor, synthesize)

    def build_dataset(self, split: str) -> Dataset:
        records = self.split_records("train") + self.split_records("val") if split == "train" else self.split_records(split)
        return FactDataset(records, self.image_root, self.kind, self.vqa_template)

    def build_collator(self) -> Callable[[list[Any]], Any]:
        return FactCollator(self.require_processor())
