"""LightningDataModules for E-VQA / E-IC style data, configurable from YAML (LightningCLI).

Files, shard specs and `image_root` are relative to `data_dir` unless absolute. `setup()` reads and checks
a split in the main process (JSON, fields, targets, that every image exists) and raises one `DataError`,
so a bad file never surfaces as a crash in a DataLoader worker mid-epoch. The tokenizer and image
processor come from the backbone: the LightningModule's `configure_model` sets `processor` (elsewhere:
`datamodule.processor = backbone.processor`); loaders refuse to start without it. Records come from one
method, `read_split`, unless `train_shards` / `val_shards` / `test_shards` names webdataset shards for the
split: it then streams from them, split by the attached Trainer's rank and world size (data_modules/shards.py;
Lightning adds no DistributedSampler to an IterableDataset).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from data_modules.ads_records import metric_groups
from data_modules.datasets import (
    VQA_TEMPLATE,
    DataKind,
    EditCollator,
    EditDataset,
    EditExample,
    FactCollator,
    FactDataset,
    FactExample,
    PromptBuilder,
    TextEditCollator,
    TextEditDataset,
    TextFactDataset,
    edit_example,
    length_problems,
    text_length_problems,
)
from data_modules.encoding import SubBatchEncoder
from data_modules.records import DEFAULT_MAX_IMAGE_PIXELS, DataError, EditRecord, Problem, check_images, read_records
from data_modules.shards import (
    DEFAULT_SHUFFLE_BUFFER,
    ExampleBuilder,
    Shard,
    ShardStream,
    StartOnFirstNext,
    StreamLoader,
    resolve_shards,
    shard_index_values,
)
from data_modules.synthetic import TEXT_FILES, WORLD_FILE, write_synthetic_world
from data_modules.text_records import TextRecord, read_text_records
from data_modules.visual import DEFAULT_MAX_FRAMES, frame_count_problems, unsupported_visual_problems
from data_modules.word_tokenizer import save_world_tokenizer

FACTS_PER_RECORD = 5  # FactDataset: three edit-prompt facts (when `pred` is set) and two locality facts


class EditExamples:
    """Shard record -> [EditExample] (picklable, for DataLoader workers)."""

    skips_records = False

    def __init__(self, kind: DataKind, vqa_template: str) -> None:
        self.prompts = PromptBuilder(kind, vqa_template)

    def __call__(self, record: EditRecord, images: Mapping[str, Image.Image]) -> list[EditExample]:
        return [edit_example(record, images, self.prompts)]


class FactExamples:
    """Shard record -> its `FactDataset` facts, with the images already decoded."""

    skips_records = False

    def __init__(self, kind: DataKind, vqa_template: str) -> None:
        self.kind, self.vqa_template = kind, vqa_template

    def __call__(self, record: EditRecord, images: Mapping[str, Image.Image]) -> list[FactExample]:
        facts = FactDataset([record], "", self.kind, self.vqa_template).facts
        return [
            FactExample(prompt, target, None if field is None else images[field], (*record.where(), text_field))
            for _, prompt, target, field, text_field in facts
        ]


class ResumableDataLoader(StatefulDataLoader):
    """A StatefulDataLoader that a resumed run continues exactly: it saves no position at the end of an
    epoch (Lightning restores the position before it starts the next epoch, which would then be empty), and
    each pass starts at its first batch, once a resumed run's Trainer has settled its current epoch."""

    def __init__(self, *args: Any, epoch_done: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_done = epoch_done

    def state_dict(self) -> dict[str, Any]:
        return {} if self.epoch_done() else super().state_dict()

    def __iter__(self) -> Iterator[Any]:
        return StartOnFirstNext(super().__iter__)


class EpochSampler(DistributedSampler):
    """A DistributedSampler that shuffles each pass by the Trainer's current epoch: Lightning's `set_epoch`
    counts processed epochs, which a run resumed from an end-of-epoch validation checkpoint has one ahead."""

    def __init__(self, *args: Any, epoch: Callable[[], int | None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_source = epoch

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch_source()
        if epoch is not None:
            self.epoch = epoch
        return super().__iter__()


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
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        extra_image_roots: tuple[str, ...] = (),
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        truncate_prompts: bool = False,
        max_frames: int | None = DEFAULT_MAX_FRAMES,
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
        self.shard_specs = {"train": train_shards, "val": val_shards, "test": test_shards}
        self.shuffle_buffer = shuffle_buffer
        # Image paths must stay inside image_root or these (relative to data_dir): e.g. ADS-Edit's `../nuscenes`.
        self.extra_image_roots = [self.data_dir / root for root in extra_image_roots]
        self.max_image_pixels = max_image_pixels
        self.truncate_prompts = truncate_prompts
        self.max_frames = max_frames
        self.records: dict[str, list[EditRecord]] = {}
        self.shards: dict[str, list[Shard]] = {}

    def prepare_data(self) -> None:
        """With `synthesize`, write the synthetic world if `data_dir` has none, and its word tokenizer if that is
        missing (`kedit synth` writes no tokenizer: it never imports the tokenizer libraries)."""
        if not self.synthesize:
            return
        if not (self.data_dir / WORLD_FILE).is_file():
            write_synthetic_world(self.data_dir)
        if not (self.data_dir / "tokenizer").is_dir():
            save_world_tokenizer(self.data_dir)

    def read_split(self, split: str) -> list[EditRecord]:
        """The checked records of one split; one `DataError` for bad JSON, fields or missing images."""
        name = self.files[split]
        if name is None:
            raise ValueError(f"{type(self).__name__}: no {split}_file configured")
        path = self.data_dir / name
        records = self.read_file(path)
        problems = frame_count_problems(records, self.max_frames, str(path))
        problems += check_images(records, self.image_root, str(path), verify=False, extra_roots=self.extra_image_roots)
        if problems:
            raise DataError(problems)
        return records

    def read_file(self, path: Path) -> list[EditRecord]:
        """The usable records of one data file (`read_records`)."""
        return read_records(path)

    def visual_problems(self, accepted: Collection[str], family: str) -> list[Problem]:
        """Records of the loaded splits whose visual inputs the `family` backbone (taking `accepted` kinds)
        cannot encode: the first of each kind per split, from the records or a shard index."""
        problems = [
            p for records in self.records.values() for p in unsupported_visual_problems(records, accepted, family)
        ]
        for split in self.shards:
            spec = self.data_dir / self.shard_specs[split]
            problems += [
                Problem(str(spec), None, None, f"holds {kind} inputs, which the {family} backbone does not encode")
                for kind in shard_index_values(spec, "visual_kinds")
                if kind not in accepted
            ]
        return problems

    def metric_groups(self, split: str) -> list[str]:
        """The groups the metrics of a loaded split are also reported by (`data_type/<name>`, ...); none
        for data without scenarios or a split not loaded."""
        if split in self.shards:
            return shard_index_values(self.data_dir / self.shard_specs[split], "groups")
        return metric_groups(self.records.get(split, []))

    def read_shards(self, split: str) -> list[Shard]:
        """The shards `{split}_shards` names; one `DataError` for a bad index or missing files."""
        return resolve_shards(self.data_dir / self.shard_specs[split])

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], None: ["train", "val"]}.get(stage, [])
        for split in splits:
            if self.shard_specs[split] is not None:
                if split not in self.shards:
                    self.shards[split] = self.read_shards(split)
            elif split not in self.records:
                self.records[split] = self.read_split(split)

    def build_dataset(self, split: str) -> Dataset:
        return EditDataset(
            self.split_records(split), self.image_root, self.kind, self.vqa_template, self.max_image_pixels
        )

    def build_collator(self) -> Callable[[list[Any]], Any]:
        return EditCollator(self.require_processor())

    def example_builder(self, split: str) -> ExampleBuilder:
        """How a streamed record becomes examples for `build_collator`'s collator."""
        return EditExamples(self.kind, self.vqa_template)

    def records_per_batch(self) -> int:
        return self.batch_size

    def split_records(self, split: str) -> list[EditRecord]:
        if split in self.shards:
            raise RuntimeError(f"{type(self).__name__}: the {split} split streams from shards; it has no record list")
        if split not in self.records:
            raise RuntimeError(
                f"{type(self).__name__}: the {split} split is not loaded; call setup() first (the Trainer does)"
            )
        return self.records[split]

    def split_shards(self, split: str) -> list[Shard]:
        if split not in self.shards:
            raise RuntimeError(
                f"{type(self).__name__}: the {split} split is not loaded from shards; "
                "call setup() first (the Trainer does)"
            )
        return self.shards[split]

    def distributed(self) -> tuple[int, int]:
        """(rank, world size): the Trainer's when attached, else torch.distributed's, else (0, 1)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def current_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def epoch_done(self) -> bool:
        """Whether the attached Trainer's training epoch has reached its last batch (a checkpoint saved now
        resumes at the start of the next epoch)."""
        return self.trainer is not None and self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def stream_loader(self, split: str, train: bool) -> StreamLoader:
        """Train: shuffled, equal batches on every rank; val/test: in order, every record once."""
        rank, world_size = self.distributed()
        stream = ShardStream(
            self.split_shards(split),
            self.example_builder(split),
            self.records_per_batch(),
            even=train,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers,
            shuffle=train,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            name=f"{type(self).__name__} {split} shards",
        )
        return StreamLoader(stream, self.build_collator(), epoch=self.current_epoch, epoch_done=self.epoch_done)

    def require_processor(self) -> SubBatchEncoder:
        if self.processor is None:
            raise RuntimeError(
                f"{type(self).__name__}.processor is not set: assign the backbone's SubBatchEncoder "
                "(`datamodule.processor = backbone.processor`; LightningCLI links it from the model) "
                "before loading batches"
            )
        if self.truncate_prompts and not self.processor.truncate_prompts:
            # A copy: the backbone's own encoder (used by the editing API too) keeps refusing long rows.
            processor = copy.copy(self.processor)
            processor.truncate_prompts = True
            return processor
        return self.processor

    def loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.shard_specs[split] is not None:
            return self.stream_loader(split, train=shuffle)
        problems = self.length_problems(split)
        if problems:
            raise DataError(problems)
        dataset = self.build_dataset(split)
        sampler = None
        if shuffle:
            # The order of epoch e is a function of (seed, e), so a resumed run shuffles its next epochs
            # as the uninterrupted run would; with several ranks each takes its own part (Lightning
            # keeps a DistributedSampler it is given).
            rank, world_size = self.distributed()
            sampler = EpochSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed, epoch=self.current_epoch
            )
        # StatefulDataLoader is a DataLoader whose position goes into Lightning's checkpoints, so
        # a run resumed mid-epoch continues with the next batch instead of replaying the epoch.
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.build_collator(),
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # workers' seeds: the global random state stays
            epoch_done=self.epoch_done,
        )

    def length_problems(self, split: str) -> list[Problem]:
        """The split's rows too long for the backbone (checked before a loader starts)."""
        return length_problems(
            self.split_records(split), PromptBuilder(self.kind, self.vqa_template), self.require_processor()
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)


class VQADataModule(EditDataModule):
    """E-VQA: `vqa_train.json` / `vqa_eval.json`, prompts through the VQA template.

    The other options are EditDataModule's (LightningCLI reads them through `**kwargs`).
    """

    def __init__(
        self, data_dir: str, train_file: str = "vqa_train.json", val_file: str = "vqa_eval.json", **kwargs: Any
    ) -> None:
        super().__init__(data_dir, train_file, val_file, kind="vqa", **kwargs)


class CaptionDataModule(EditDataModule):
    """E-IC: `caption_train_edit.json` / `caption_eval_edit.json`, caption prompts used as they are.

    The other options are EditDataModule's (LightningCLI reads them through `**kwargs`).
    """

    def __init__(
        self,
        data_dir: str,
        train_file: str = "caption_train_edit.json",
        val_file: str = "caption_eval_edit.json",
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, train_file, val_file, kind="caption", **kwargs)


def fact_records(data: EditDataModule, split: str) -> list[Any]:
    """The records whose facts a base model learns in `split`: for train, the train and val records together (the
    editor is later evaluated on the val edits, so the base model must know what they change)."""
    return data.split_records("train") + data.split_records("val") if split == "train" else data.split_records(split)


class FactsDataModule(EditDataModule):
    """Pre-edit facts (`FactCollator` batches) for fine-tuning a base model to know the world.

    Train: the facts of the train and val records together, since the editor is later evaluated
    on the val edits and the base model must first know what they change. Val: the val file's
    facts. They are also trained on, on purpose: validation measures how well the base model
    has learned the facts it will be edited on, not generalization to unseen facts.
    Test (optional): the test file's facts.
    """

    def __init__(
        self, data_dir: str, train_file: str = "vqa_train.json", val_file: str = "vqa_eval.json", **kwargs: Any
    ) -> None:
        if (kwargs.get("train_shards") is None) != (kwargs.get("val_shards") is None):
            raise ValueError(
                "FactsDataModule trains on the train and val facts together: "
                "give both train_shards and val_shards, or neither"
            )
        super().__init__(data_dir, train_file, val_file, **kwargs)

    def build_dataset(self, split: str) -> Dataset:
        records = fact_records(self, split)
        return FactDataset(records, self.image_root, self.kind, self.vqa_template, self.max_image_pixels)

    def build_collator(self) -> Callable[[list[Any]], Any]:
        return FactCollator(self.require_processor())

    def example_builder(self, split: str) -> ExampleBuilder:
        return FactExamples(self.kind, self.vqa_template)

    def records_per_batch(self) -> int:
        """Streamed, a batch holds the facts of whole records: about `batch_size` facts."""
        return max(1, self.batch_size // FACTS_PER_RECORD)

    def split_shards(self, split: str) -> list[Shard]:
        return (
            super().split_shards("train") + super().split_shards("val")
            if split == "train"
            else super().split_shards(split)
        )


class TextEditDataModule(EditDataModule):
    """Text-only edits (zsRE / CounterFact layouts, data_modules/text_records.py) for a text backbone.

    Batches (`TextEditCollator`) hold `edit_inner`, `edit_outer` and `loc` with pixel_values None and no
    image sub-batches, so image metrics and losses are absent, not faked. Defaults: the synthetic world's
    text files (`kedit synth`). Files are JSON only (no shards); prompts are used as they are.
    """

    def __init__(
        self,
        data_dir: str,
        train_file: str = TEXT_FILES["text_train"],
        val_file: str = TEXT_FILES["text_eval"],
        test_file: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        processor: SubBatchEncoder | None = None,
        synthesize: bool = False,
        truncate_prompts: bool = False,
    ) -> None:
        super().__init__(
            data_dir,
            train_file,
            val_file,
            test_file,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            processor=processor,
            synthesize=synthesize,
            truncate_prompts=truncate_prompts,
        )

    def read_split(self, split: str) -> list[TextRecord]:
        """The checked text records of one split; an image-layout file is refused in one line."""
        name = self.files[split]
        if name is None:
            raise ValueError(f"{type(self).__name__}: no {split}_file configured")
        return read_text_records(self.data_dir / name)

    def build_dataset(self, split: str) -> Dataset:
        return TextEditDataset(self.split_records(split))

    def build_collator(self) -> Callable[[list[Any]], Any]:
        return TextEditCollator(self.require_processor())

    def length_problems(self, split: str) -> list[Problem]:
        return text_length_problems(self.split_records(split), self.require_processor())


class TextFactsDataModule(TextEditDataModule):
    """Pre-edit facts of text records (`TextFactDataset`, `FactCollator` batches) for teaching a text base model
    the world, as `FactsDataModule` does for image records: train on the train and val records' facts together
    (the editor is later evaluated on the val edits, so the base model must know what they change), validate on
    the val facts."""

    def build_dataset(self, split: str) -> Dataset:
        return TextFactDataset(fact_records(self, split))

    def build_collator(self) -> Callable[[list[Any]], Any]:
        return FactCollator(self.require_processor())
