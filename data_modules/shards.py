"""webdataset shards of edit records: `kedit shard` writes them, `ShardStream` streams them.

One sample per record, self-contained: KEY.json ({"record": the record in the public layout, "origin":
{"file", "index"}}) and the bytes of its image files as on disk (KEY.image.EXT, KEY.image_rephrase.EXT,
KEY.m_loc.EXT; frames or camera views KEY.image.0.EXT, KEY.image.1.EXT, ... in the record's order), KEY
being the record's zero-padded index; NAME.shards.json indexes the shards' sample counts and the records' metric
groups (ADS-Edit's `data_type/<name>`, `image_type/<name>`). Images are decoded in the DataLoader worker
that reads them, so host memory stays flat.

Shard i goes to rank i mod W (W ranks) and there to worker (i div W) mod K (K = max(1, num_workers));
shards are never split, so every reader's record count is known from the index in every process.
Train (`even=True`): every rank yields as many full batches of B records (each from one reader's shards)
as the poorest rank can fill, so DDP never waits; records that do not fit are left out of that epoch, with
a warning. None is left out when every reader's count is the same multiple of B: e.g. equal shards, their
number a multiple of W*K, the shard size a multiple of B. Val/test (`even=False`): every record once;
ranks may yield different numbers of batches, so no collectives per validation step (epoch-end syncs are
fine). Training reshuffles each reader's shards and, within `shuffle_buffer`, their records every epoch.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_modules.ads_records import metric_groups, record_from_dict, scan_any
from data_modules.records import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_FIELDS,
    DataError,
    EditRecord,
    Origin,
    Problem,
    check_image_refs,
)
from data_modules.validate import add_image_arguments
from data_modules.visual import (
    DEFAULT_MAX_FRAMES,
    VISUAL_FIELDS,
    LoadedVisual,
    assemble,
    frame_count_problems,
    visual_files,
    visual_kind,
)

FORMAT = "kedit-shards/1"
INDEX_SUFFIX = ".shards.json"
SHARD_PATTERN = "{name}-%06d.tar"
KEY_DIGITS = 9
DEFAULT_SHUFFLE_BUFFER = 64


@dataclass(frozen=True)
class Shard:
    """One tar file and the number of records (samples) in it."""

    url: str
    samples: int


# ---------------------------------------------------------------------------------------------
# Writing


def member_name(field: str, image_path: str) -> str:
    """The tar member suffix of an image field: the field and the image file's own extension."""
    return field + (PurePosixPath(image_path).suffix.lower() or ".bin")


def shard_problems(
    data: str | Path,
    images: str | Path,
    extra_roots: Sequence[str] = (),
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
) -> tuple[list[EditRecord], list[Problem]]:
    """The records of `data` and every problem `kedit validate` would report (empty `alt` included)."""
    scan = scan_any(data)
    problems = list(scan.problems)
    problems += [Problem(scan.file, r.origin.index, "alt", "empty target") for r in scan.empty_alt]
    problems += frame_count_problems(scan.records, max_frames)
    problems += check_image_refs(scan.image_refs, images, True, extra_roots, max_pixels)
    return scan.records, problems


def _sample(record: EditRecord, image_root: Path) -> dict[str, Any]:
    file, index = record.where()
    key = f"{index:0{KEY_DIGITS}d}"
    doc = {"record": record.to_dict(), "origin": {"file": file, "index": index}}
    sample: dict[str, Any] = {
        "__key__": key,
        "json": json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }
    for field in IMAGE_FIELDS:
        for _, member, path in visual_files(field, getattr(record, field)):
            sample[member_name(member, path)] = (image_root / path).read_bytes()
    return sample


def write_shards(
    data: str | Path,
    images: str | Path,
    out: str | Path,
    shard_size: int,
    name: str | None = None,
    extra_roots: Sequence[str] = (),
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
) -> Path:
    """Check `data` and its images, write its records as shards under `out`; the index's path.
    Every frame and view of a record goes into its sample; the index lists the records' metric groups.

    Raises `DataError` (listing the problems) before writing anything if the data is not clean,
    and `FileExistsError` if `out` already holds shards or an index of that name.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    records, problems = shard_problems(data, images, extra_roots, max_pixels, max_frames)
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError(f"{data}: no records to shard")
    out = Path(out)
    name = name or Path(data).stem
    index_path = out / f"{name}{INDEX_SUFFIX}"
    existing = sorted(out.glob(f"{name}-*.tar")) + ([index_path] if index_path.exists() else [])
    if existing:
        raise FileExistsError(
            f"{out} already holds shards named {name!r} ({existing[0].name}, ...); choose another --out or --name"
        )
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    image_root = Path(images)
    # Members are bytes already (encoder=False); a fixed mtime makes the tar files reproducible.
    pattern = str(out / SHARD_PATTERN.format(name=name.replace("%", "%%")))
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, encoder=False, mtime=0) as writer:
        for record in records:
            writer.write(_sample(record, image_root))
            shard = Path(writer.fname).name
            counts[shard] = counts.get(shard, 0) + 1
    index = {
        "format": FORMAT,
        "source": str(data),
        "samples": len(records),
        "shard_size": shard_size,
        "shardlist": [{"url": url, "nsamples": n} for url, n in counts.items()],
        "groups": metric_groups(records),
        "visual_kinds": sorted({visual_kind(getattr(r, field)) for r in records for field in VISUAL_FIELDS}),
    }
    index_path.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, metavar="FILE", help="a JSON data file in the E-VQA / E-IC / VLKEB layout"
    )
    parser.add_argument(
        "--images", required=True, metavar="DIR", help="the image root the record image paths are relative to"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the .tar shards and their index")
    parser.add_argument("--shard-size", required=True, type=int, metavar="N", help="records per shard")
    parser.add_argument("--name", default=None, help="shard name prefix (default: the data file's stem)")
    add_image_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        index_path = write_shards(
            args.data,
            args.images,
            args.out,
            args.shard_size,
            args.name,
            args.extra_image_root,
            args.max_image_pixels,
            args.max_frames,
        )
    except (DataError, FileExistsError, ValueError) as err:
        print(f"kedit shard: {err}", file=sys.stderr)
        return 1
    shards = read_index(index_path)
    print(
        f"{args.data}: {sum(s.samples for s in shards)} record(s) in {len(shards)} shard(s) under {args.out}; "
        f"index {index_path}"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# Finding shards


def read_index(path: str | Path) -> list[Shard]:
    """The shards an index lists, their paths resolved next to the index."""
    path = Path(path)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: shard index not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the shard index: {err}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f'{path}: not a kedit shard index (expected "format": {FORMAT!r})')
    entries = index.get("shardlist")
    shards = []
    for position, entry in enumerate(entries if isinstance(entries, list) else [None]):
        url, count = (entry.get("url"), entry.get("nsamples")) if isinstance(entry, dict) else (None, None)
        if not isinstance(url, str) or not isinstance(count, int) or count < 0:
            raise DataError(
                f'{path}: shardlist[{position}] must be {{"url": str, "nsamples": int >= 0}}, got {entry!r}'
            )
        shards.append(Shard(str(path.parent / url), count))
    return shards


def index_files(spec: str | Path) -> list[Path]:
    """The shard index files a shard spec (as `resolve_shards` takes) names or sits beside."""
    path = Path(spec)
    if path.is_dir():
        return sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if str(spec).endswith(INDEX_SUFFIX):
        return [path]
    folders = {Path(p).parent for p in wds.shardlists.expand_urls(str(spec))}
    return [index for folder in sorted(folders) for index in sorted(folder.glob(f"*{INDEX_SUFFIX}"))]


def shard_index_values(spec: str | Path, key: str) -> list[str]:
    """The sorted union of the list `key` (`groups`, `visual_kinds`) in the indexes of a shard spec."""
    values: set[str] = set()
    for index in index_files(spec):
        values.update(json.loads(index.read_text(encoding="utf-8")).get(key, []))
    return sorted(values)


def resolve_shards(spec: str | Path) -> list[Shard]:
    """The shards named by an index file, a folder with one index, or tar files as webdataset names
    them (`dir/train-{000000..000003}.tar`, lists joined by `::`), counted by the index beside them."""
    path = Path(spec)
    if path.is_dir():
        indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
        if len(indexes) != 1:
            found = ", ".join(i.name for i in indexes) or "none"
            raise DataError(
                f"{path}: expected exactly one *{INDEX_SUFFIX} shard index, found {found}; name the index file instead"
            )
        shards = read_index(indexes[0])
    elif str(spec).endswith(INDEX_SUFFIX):
        shards = read_index(path)
    else:
        files = [Path(p) for p in wds.shardlists.expand_urls(str(spec))]  # webdataset's own: braces, '::' lists
        listed: dict[Path, int] = {}
        for folder in sorted({f.parent for f in files}):
            for index in sorted(folder.glob(f"*{INDEX_SUFFIX}")):
                listed.update({Path(s.url).resolve(): s.samples for s in read_index(index)})
        unlisted = [f for f in files if f.resolve() not in listed]
        if unlisted:
            raise DataError(
                f"{unlisted[0]}: not listed in any *{INDEX_SUFFIX} index in {unlisted[0].parent} "
                f"(`kedit shard` writes one next to its shards; {len(unlisted)} shard(s) unlisted)"
            )
        shards = [Shard(str(f), listed[f.resolve()]) for f in files]
    missing = [s.url for s in shards if not Path(s.url).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: shard file not found ({len(missing)} of {len(shards)} missing)")
    if not shards:
        raise DataError(f"{spec}: names no shards")
    return shards


# ---------------------------------------------------------------------------------------------
# Reading


def decode_sample(url: str, sample: Mapping[str, Any]) -> tuple[EditRecord, dict[str, LoadedVisual]]:
    """One shard sample -> its record (origin: the source file and index) and decoded RGB images."""
    key = sample.get("__key__", "?")
    where = f"{url}: sample {key}"
    if "json" not in sample:
        members = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
        raise DataError(f"{where}: no {key}.json member (members: {members})")
    try:
        doc = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{where}: {key}.json is not valid JSON: {err}") from None
    origin = doc.get("origin") if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("record"), dict)
        or not isinstance(origin, dict)
        or not isinstance(origin.get("file"), str)
        or not isinstance(origin.get("index"), int)
    ):
        raise DataError(
            f"{where}: {key}.json is not a kedit shard sample "
            '(expected {"record": {...}, "origin": {"file", "index"}})'
        )
    record = record_from_dict(doc["record"], file=where, index=origin["index"])
    if not record.alt.strip():
        raise DataError(f"{where}: field 'alt': empty target (kedit shard never writes such a record)")
    record = replace(record, origin=Origin(origin["file"], origin["index"]))
    images = {}
    for field in IMAGE_FIELDS:
        value = getattr(record, field)
        decoded = {}
        for label, member, path in visual_files(field, value):
            name = member_name(member, path)
            if name not in sample:
                raise DataError(f"{where}: field {label!r}: no {key}.{name} member")
            try:
                with Image.open(io.BytesIO(sample[name])) as image:
                    decoded[member] = image.convert("RGB")
            except Exception as err:  # Pillow raises many types for broken data
                raise DataError(
                    f"{where}: field {label!r}: cannot decode image {key}.{name} ({path}): {type(err).__name__}: {err}"
                ) from None
        images[field] = assemble(field, value, decoded)
    return record, images


class ExampleBuilder(Protocol):
    """Turns one record and its decoded images into the examples a collator takes.

    `skips_records`: whether it may return no example for a record (then the number of batches
    cannot be known before reading, and such a stream is allowed for val/test only).
    """

    skips_records: bool

    def __call__(self, record: EditRecord, images: Mapping[str, LoadedVisual]) -> list[Any]: ...


def reader_shards(count: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Indices of the shards one (rank, worker) reads: webdataset's split_by_node, then split_by_worker."""
    return list(range(count))[rank::world_size][worker::num_workers]


def _allot(full: Sequence[int], total: int) -> list[int]:
    """Spread `total` batches over workers one at a time, in worker order, each up to its `full`."""
    quota = [0] * len(full)
    while sum(quota) < total:
        for w in range(len(full)):
            if quota[w] < full[w] and sum(quota) < total:
                quota[w] += 1
    return quota


def resume_point(quota: Sequence[int], batches: int) -> tuple[list[int], int]:
    """Where a pass stands after its first `batches` batches: how many each reader has yielded, and the
    reader whose batch comes next. A DataLoader takes batches from its workers in turn, passing over those
    that have yielded their quota."""
    yielded, reader = [0] * len(quota), 0
    batches = min(batches, sum(quota))
    while batches:
        if yielded[reader] < quota[reader]:
            yielded[reader] += 1
            batches -= 1
        reader = (reader + 1) % len(quota)
    return yielded, reader


class UnevenShardsWarning(UserWarning):
    """Some records do not fit the equal number of full batches every rank must yield."""


class ShardStream(IterableDataset):
    """Batches (lists of examples) of the records in `shards` that this rank's workers read.

    `records_per_batch` records make one batch; `builder` turns each record into examples;
    `rank` / `world_size` say which process this is, `num_workers` the DataLoader's workers (0:
    read in the main process). See the module doc for how shards are split and what `even` does.
    Use with `StreamLoader`, which sets `epoch` (and `skip`, the batches a resumed pass leaves out) before
    each pass.
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        builder: ExampleBuilder,
        records_per_batch: int,
        *,
        even: bool,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        name: str = "shards",
    ) -> None:
        if records_per_batch < 1:
            raise ValueError(f"records_per_batch must be at least 1, got {records_per_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if even and builder.skips_records:
            raise ValueError(
                f"{name}: {type(builder).__name__} may skip records, so equal batch counts per rank cannot be planned; "
                "use it for val/test only"
            )
        self.shards = list(shards)
        self.builder = builder
        self.records_per_batch = records_per_batch
        self.even = even
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.name = name
        self.epoch = 0
        self.skip = 0
        readers = max(1, num_workers)
        counts = [
            [
                sum(self.shards[i].samples for i in reader_shards(len(self.shards), r, world_size, w, readers))
                for w in range(readers)
            ]
            for r in range(world_size)
        ]
        self.quota = self._plan(counts)

    def _plan(self, counts: list[list[int]]) -> list[int]:
        """Batches each worker of this rank yields (all of them, for an uneven stream)."""
        b, total, ranks = self.records_per_batch, sum(map(sum, counts)), len(counts)
        where = (
            f"{self.name}: {len(self.shards)} shard(s), {total} record(s) "
            f"over {ranks} rank(s) x {len(counts[0])} reader(s)"
        )
        if not self.even:
            empty = [r for r in range(ranks) if sum(counts[r]) == 0]
            if ranks > 1 and empty:
                raise DataError(
                    f"{where}: rank {empty[0]} gets no record (shards are never split); "
                    f"write at least {ranks} non-empty shards (kedit shard --shard-size smaller)"
                )
            return [math.ceil(n / b) for n in counts[self.rank]]
        full = [[n // b for n in row] for row in counts]
        per_rank = min(sum(row) for row in full)
        if per_rank == 0:
            poorest = min(range(ranks), key=lambda r: sum(full[r]))
            raise DataError(
                f"{where}: rank {poorest} cannot fill one batch of {b} (each batch comes from one reader's shards); "
                "write smaller or more shards, or lower the batch size or num_workers"
            )
        left_out = total - per_rank * b * ranks
        if left_out:
            warnings.warn(
                f"{where}: {left_out} record(s) per epoch do not fit the {per_rank} full batch(es) of {b} "
                "every rank yields and are left out (see data_modules/shards.py for a layout that loses none)",
                UnevenShardsWarning,
                stacklevel=3,
            )
        return _allot(full[self.rank], per_rank)

    def __len__(self) -> int:
        if self.builder.skips_records:
            raise TypeError(
                f"{self.name}: the number of batches is not known before reading "
                f"({type(self.builder).__name__} skips records)"
            )
        return sum(self.quota)

    def _records(self, urls: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        expected = {s.url: s.samples for s in self.shards}
        for url in urls:
            count = 0
            try:
                for sample in wds.tarfile_samples([{"url": url}]):
                    count += 1
                    yield url, sample
            except DataError:
                raise
            except Exception as err:  # tarfile / webdataset errors for a broken archive
                raise DataError(
                    f"{url}: not a readable shard (after {count} sample(s)): "
                    f"{type(err).__name__}: {err.args[0] if err.args else err}"
                ) from None
            if count != expected[url]:
                raise DataError(
                    f"{url}: holds {count} sample(s) but its index says {expected[url]}; rewrite it with kedit shard"
                )

    def __iter__(self) -> Iterator[list[Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(1, self.num_workers):
            raise RuntimeError(
                f"{self.name}: planned for num_workers={self.num_workers} but read by {workers} worker(s); "
                "build the stream with the loader's num_workers"
            )
        # A resumed pass starts with worker 0, so worker w reads as the reader `first + w` (in turn from
        # the reader whose batch came next), and the batches come in the uninterrupted pass's order.
        yielded, first = resume_point(self.quota, self.skip)
        reader = (first + worker) % workers
        urls = [
            self.shards[i].url for i in reader_shards(len(self.shards), self.rank, self.world_size, reader, workers)
        ]
        if not self.shuffle:
            yield from self._batches(self._records(urls), self.quota[reader], yielded[reader])
            return
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{reader}")
        rng.shuffle(urls)
        shuffled = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(self._records(urls))
        yield from self._batches(shuffled, self.quota[reader], yielded[reader])

    def _batches(self, samples: Iterator[tuple[str, dict[str, Any]]], quota: int, skip: int) -> Iterator[list[Any]]:
        """Batches up to `quota`, the first `skip` of them counted but not decoded or yielded."""
        if quota == 0:
            return
        batch: list[Any] = []
        records, done = 0, 0
        for url, sample in samples:
            if done < skip:  # only train (even) streams resume, and their builders never skip a record
                records += 1
                if records == self.records_per_batch:
                    records, done = 0, done + 1
                continue
            examples = self.builder(*decode_sample(url, sample))
            if not examples:
                continue
            batch += examples
            records += 1
            if records == self.records_per_batch:
                yield batch
                batch, records, done = [], 0, done + 1
                if self.even and done == quota:
                    return
        if batch and not self.even:
            yield batch


class StartOnFirstNext:
    """An iterator that calls `start()` at its first `next()`: Lightning calls `iter()` on a resumed run's
    loader before it sets the run's epoch, and a pass's order is fixed when it starts."""

    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self.start = start
        self.iterator: Iterator[Any] | None = None

    def __iter__(self) -> StartOnFirstNext:
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.start()
        return next(self.iterator)

    def __getattr__(self, name: str) -> Any:  # e.g. `_shutdown_workers`, which Lightning calls when it has one
        if self.iterator is None:
            raise AttributeError(name)
        return getattr(self.iterator, name)


class StreamLoader(DataLoader):
    """A DataLoader over a `ShardStream`: the stream yields whole batches, `collate_fn` tensorizes them.

    Before each pass it sets the stream's epoch (from `epoch()` when given, e.g. the Trainer's
    current epoch, else by counting passes). Workers are started afresh each pass
    (persistent_workers=False) so they receive that epoch, and with it a new shuffle.
    Its position (epoch, batches yielded) goes into Lightning's checkpoints: a resumed pass skips the
    batches already trained on. `epoch_done()` says when the pass is over (then no position is saved).
    """

    def __init__(
        self,
        stream: ShardStream,
        collate_fn: Callable[[list[Any]], Any],
        epoch: Callable[[], int | None] | None = None,
        epoch_done: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(
            stream,
            batch_size=None,
            num_workers=stream.num_workers,
            collate_fn=collate_fn,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(stream.seed),  # workers' seeds: the global random state stays
        )
        self.epoch_source = epoch
        self.epoch_done = epoch_done
        self.passes = 0
        self.yielded = 0
        self.resume_at: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return StartOnFirstNext(self._start)

    def _start(self) -> Iterator[Any]:
        epoch = self.epoch_source() if self.epoch_source is not None else None
        self.dataset.epoch = self.passes if epoch is None else epoch
        self.passes += 1
        resume, self.resume_at = self.resume_at, None
        self.dataset.skip = resume["batches"] if resume and resume["epoch"] == self.dataset.epoch else 0
        self.yielded = self.dataset.skip
        return self._count(super().__iter__())

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self.yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if self.epoch_done is not None and self.epoch_done():
            return {}
        return {"epoch": self.dataset.epoch, "batches": self.yielded}

    def load_state_dict(self, state_dict: Mapping[str, int]) -> None:
        self.resume_at = dict(state_dict) or None
