"""Records -> per-item texts and images -> tokenized EditBatch (or fact batches).

Datasets hold only the records (strings); each `__getitem__` opens its images from disk, so a DataLoader
worker decodes what it needs and the dataset never sits in RAM as pixels. The collators run in the workers
too and hand back tensors only. `PromptBuilder` says which texts get the VQA template, `EditCollator`
what an EditBatch holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from data_modules.ads_records import ADSRecord
from data_modules.encoding import EditBatch, SubBatch, SubBatchEncoder, TooLongError
from data_modules.records import DEFAULT_MAX_IMAGE_PIXELS, DataError, EditRecord, Problem, too_many_pixels
from data_modules.text_records import TextRecord
from data_modules.visual import LoadedVisual, assemble, visual_files

VQA_TEMPLATE = "Question: {} Short answer:"
DataKind = Literal["vqa", "caption"]
KINDS = ("vqa", "caption")


Where = tuple[str, int, str]
"""(file, record index, field) of one encoded row, for messages."""


def load_image(
    image_root: str | Path,
    record: EditRecord,
    field: str,
    position: int,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> LoadedVisual:
    """Decode the visual input of a record's field as RGB (one image, frames or views), each image's size
    checked from the header first; a `DataError` naming file, record and field if it fails."""
    value = getattr(record, field)
    images = {
        member: _load_file(Path(image_root) / path, record, label, position, max_pixels)
        for label, member, path in visual_files(field, value)
    }
    return assemble(field, value, images)


def _load_file(path: Path, record: EditRecord, field: str, position: int, max_pixels: int | None) -> Image.Image:
    file, index = record.where(position)
    try:
        with Image.open(path) as image:
            too_big = too_many_pixels(image, path, max_pixels)
            if too_big is None:
                return image.convert("RGB")
    except Exception as err:  # Pillow raises many types for missing or broken files
        raise DataError(
            [Problem(file, index, field, f"cannot load image {path}: {type(err).__name__}: {err}")]
        ) from err
    raise DataError([Problem(file, index, field, too_big)])


def encode_rows(
    encode: SubBatchEncoder,
    prompts: Sequence[str],
    targets: Sequence[str],
    images: Sequence[LoadedVisual] | None,
    where: Sequence[Where],
) -> SubBatch:
    """`encode(prompts, targets, images)`; a row too long for the backbone becomes a `DataError`
    naming its file, record and field."""
    try:
        return encode(prompts, targets, images)
    except TooLongError as err:
        raise DataError([Problem(*where[err.row], err.detail)]) from None


class PromptBuilder:
    """Applies the VQA template to the texts that are questions for a record kind.

    VQA records: `src`, `rephrase`, `m_loc_q` and portability questions get the template. Caption
    records: `src` / `rephrase` are caption prompts ("a photo of") used as they are; their `m_loc_q` and
    portability questions still get it, as in EasyEdit's caption loader. `loc` (a text-only NQ question
    with its own phrasing) is always used as it is.
    """

    def __init__(self, kind: str, vqa_template: str = VQA_TEMPLATE) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if "{}" not in vqa_template:
            raise ValueError(f"vqa_template must contain '{{}}' where the question goes, got {vqa_template!r}")
        self.kind = kind
        self.vqa_template = vqa_template

    def question(self, text: str) -> str:
        return self.vqa_template.format(text)

    def edit_prompt(self, text: str) -> str:
        """`src` / `rephrase`: a question for VQA, a caption prompt used as it is for captions."""
        return self.question(text) if self.kind == "vqa" else text


@dataclass
class EditExample:
    """One record's texts with prompts built, and its visual inputs decoded (`image`, `image_rephrase`: an
    image, frames or views; `m_loc_image` an image)."""

    prompt: str
    rephrase: str
    target: str
    image: LoadedVisual
    image_rephrase: LoadedVisual
    loc_prompt: str
    loc_target: str
    m_loc_prompt: str
    m_loc_target: str
    m_loc_image: Image.Image
    port: list[tuple[str, str, str]]  # (hop, prompt, answer)
    meta: dict[str, Any]


def edit_example(
    record: EditRecord, images: Mapping[str, LoadedVisual], prompts: PromptBuilder, position: int = 0
) -> EditExample:
    """The example of one record, its images (`image`, `image_rephrase`, `m_loc`) already decoded;
    `position` names the record in messages when it has no origin."""
    file, index = record.where(position)
    prompt, rephrase = prompts.edit_prompt(record.src), prompts.edit_prompt(record.rephrase)
    m_loc_prompt = prompts.question(record.m_loc_q)
    return EditExample(
        prompt=prompt,
        rephrase=rephrase,
        target=record.alt,
        image=images["image"],
        image_rephrase=images["image_rephrase"],
        loc_prompt=record.loc,
        loc_target=record.loc_ans,
        m_loc_prompt=m_loc_prompt,
        m_loc_target=record.m_loc_a,
        m_loc_image=images["m_loc"],
        port=[(q.hop, prompts.question(q.question), q.answer) for q in record.port],
        meta={
            "prompt": prompt,
            "rephrase": rephrase,
            "pred": record.pred,
            "alt": record.alt,
            "image": record.image,
            "image_rephrase": record.image_rephrase,
            "subject": record.subject,
            # The locality inputs, so that a sequence of edits can tell those it edited itself (editor.py).
            "loc": record.loc,
            **({"loc_image": [m_loc_prompt, record.m_loc]} if record.m_loc else {}),
            "origin": f"{file}:{index}",
            "file": file,
            "index": index,
            **({"groups": record.groups()} if isinstance(record, ADSRecord) else {}),
        },
    )


def example_where(example: EditExample | TextEditExample, field: str) -> Where:
    """(file, index, field) of an example's row, for messages."""
    return example.meta.get("file", "<batch>"), example.meta.get("index", 0), field


def length_problems(records: Sequence[EditRecord], prompts: PromptBuilder, encode: SubBatchEncoder) -> list[Problem]:
    """Every edit row of `records` (as `EditCollator` builds them) longer than `encode` allows, checked
    up front so a split fails before training, not at its first long batch."""
    if encode.max_length is None or encode.truncate_prompts:
        return []
    rows: list[tuple[Where, str, str, bool]] = []
    for position, r in enumerate(records):
        file, index = r.where(position)
        rows += [
            ((file, index, "src"), prompts.edit_prompt(r.src), r.alt, True),
            ((file, index, "rephrase"), prompts.edit_prompt(r.rephrase), r.alt, True),
            ((file, index, "loc"), r.loc, r.loc_ans, False),
            ((file, index, "m_loc_q"), prompts.question(r.m_loc_q), r.m_loc_a, True),
        ]
        rows += [
            ((file, index, f"port_new[{k}]"), prompts.question(q.question), q.answer, True)
            for k, q in enumerate(r.port)
        ]
    lengths = encode.lengths([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    return [Problem(*row[0], encode.too_long(n)) for row, n in zip(rows, lengths) if n > encode.max_length]


class EditDataset(Dataset):
    """Edit records of one split; images decoded per item, in whichever process asks."""

    def __init__(
        self,
        records: Sequence[EditRecord],
        image_root: str | Path,
        kind: DataKind,
        vqa_template: str = VQA_TEMPLATE,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.records = list(records)
        self.image_root = Path(image_root)
        self.prompts = PromptBuilder(kind, vqa_template)
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> EditExample:
        record = self.records[position]
        images = {
            field: load_image(self.image_root, record, field, position, self.max_image_pixels)
            for field in ("image", "image_rephrase", "m_loc")
        }
        return edit_example(record, images, self.prompts, position)


class EditCollator:
    """List of `EditExample` -> EditBatch, tokenized once with the backbone's `SubBatchEncoder`.

    Keys (sub-batches as in data_modules/encoding.py: prompt + target, image):
        edit_inner        src + alt, image
        edit_outer        rephrase + alt, image
        edit_outer_image  src + alt, image_rephrase
        loc               loc + loc_ans, no image
        loc_image         m_loc_q + m_loc_a, m_loc image
        port              question + answer, the record's image (only when some record has port questions)
        port_hops         list[str], the hop of each `port` row ("1-hop".."4-hop")
        port_record       LongTensor [P], the batch row of the record each `port` row belongs to
        meta              one dict per record, plain values for showing examples: prompt (templated src),
                          rephrase, pred, alt, image and image_rephrase (as in the file), subject (or None),
                          origin ("FILE:INDEX"), file, index (int),
                          groups (ADS-Edit records only: their metric groups)

    A row longer than the backbone allows raises a `DataError` naming its record and field.
    """

    def __init__(self, processor: SubBatchEncoder) -> None:
        self.processor = processor

    def __call__(self, examples: Sequence[EditExample]) -> EditBatch:
        def encode(field: str, prompts: list[str], targets: list[str], images: list | None) -> SubBatch:
            where = [example_where(e, field) for e in examples]
            return encode_rows(self.processor, prompts, targets, images, where)

        prompts = [e.prompt for e in examples]
        targets = [e.target for e in examples]
        images = [e.image for e in examples]
        batch: dict[str, Any] = {
            "edit_inner": encode("src", prompts, targets, images),
            "edit_outer": encode("rephrase", [e.rephrase for e in examples], targets, images),
            "edit_outer_image": encode("src", prompts, targets, [e.image_rephrase for e in examples]),
            "loc": encode("loc", [e.loc_prompt for e in examples], [e.loc_target for e in examples], None),
            "loc_image": encode(
                "m_loc_q",
                [e.m_loc_prompt for e in examples],
                [e.m_loc_target for e in examples],
                [e.m_loc_image for e in examples],
            ),
        }
        rows = [
            (row, position, hop, prompt, answer)
            for row, e in enumerate(examples)
            for position, (hop, prompt, answer) in enumerate(e.port)
        ]
        if rows:
            where = [example_where(examples[r[0]], f"port_new[{r[1]}]") for r in rows]
            batch["port"] = encode_rows(
                self.processor, [r[3] for r in rows], [r[4] for r in rows], [examples[r[0]].image for r in rows], where
            )
            batch["port_hops"] = [r[2] for r in rows]
            batch["port_record"] = torch.tensor([r[0] for r in rows], dtype=torch.long)
        batch["meta"] = [e.meta for e in examples]
        return batch


@dataclass
class TextEditExample:
    """One text record's rows: the edit (`prompt` -> `target`), its rephrase, the locality input and the near
    neighbours ((prompt, answer) pairs)."""

    prompt: str
    rephrase: str
    target: str
    loc_prompt: str
    loc_target: str
    meta: dict[str, Any]
    neighbors: tuple[tuple[str, str], ...] = ()


def text_edit_example(record: TextRecord, position: int = 0) -> TextEditExample:
    """The example of one text record (prompts used as they are); `meta` as `EditCollator` gives it."""
    file, index = record.where(position)
    neighbors = tuple((n.prompt, n.answer) for n in record.neighbors)
    meta = {
        "prompt": record.src,
        "rephrase": record.rephrase,
        "pred": record.pred,
        "alt": record.alt,
        # The locality inputs, so that a sequence of edits can tell those it edited itself (editor.py).
        "loc": record.loc,
        "neighbors": [prompt for prompt, _ in neighbors],
        "origin": f"{file}:{index}",
        "file": file,
        "index": index,
    }
    return TextEditExample(record.src, record.rephrase, record.alt, record.loc, record.loc_ans, meta, neighbors)


def text_length_problems(records: Sequence[TextRecord], encode: SubBatchEncoder) -> list[Problem]:
    """`length_problems` for text records: every row `TextEditCollator` builds, checked up front."""
    if encode.max_length is None or encode.truncate_prompts:
        return []
    rows = [
        ((*r.where(position), name), prompt, target)
        for position, r in enumerate(records)
        for name, prompt, target in (
            ("src", r.src, r.alt),
            ("rephrase", r.rephrase, r.alt),
            ("loc", r.loc, r.loc_ans),
            *((f"neighbors[{k}]", n.prompt, n.answer) for k, n in enumerate(r.neighbors)),
        )
    ]
    lengths = encode.lengths([r[1] for r in rows], [r[2] for r in rows], [False] * len(rows))
    return [Problem(*row[0], encode.too_long(n)) for row, n in zip(rows, lengths) if n > encode.max_length]


class TextEditDataset(Dataset):
    """Text edit records of one split."""

    def __init__(self, records: Sequence[TextRecord]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> TextEditExample:
        return text_edit_example(self.records[position], position)


class TextEditCollator:
    """List of `TextEditExample` -> EditBatch with `edit_inner` (src + alt), `edit_outer` (rephrase + alt),
    `loc` (loc + loc_ans), all with pixel_values None, and `meta`; no image sub-batches at all. Where some
    record has near neighbours: `neighbor` (their prompt + answer rows) and `neighbor_record` (LongTensor [K],
    the batch row of each one's record), as `port` rows follow their record."""

    def __init__(self, processor: SubBatchEncoder) -> None:
        self.processor = processor

    def __call__(self, examples: Sequence[TextEditExample]) -> EditBatch:
        def encode(field: str, prompts: list[str], targets: list[str]) -> SubBatch:
            return encode_rows(self.processor, prompts, targets, None, [example_where(e, field) for e in examples])

        targets = [e.target for e in examples]
        batch: dict[str, Any] = {
            "edit_inner": encode("src", [e.prompt for e in examples], targets),
            "edit_outer": encode("rephrase", [e.rephrase for e in examples], targets),
            "loc": encode("loc", [e.loc_prompt for e in examples], [e.loc_target for e in examples]),
        }
        rows = [(row, k, pair) for row, e in enumerate(examples) for k, pair in enumerate(e.neighbors)]
        if rows:
            where = [example_where(examples[row], f"neighbors[{k}]") for row, k, _ in rows]
            batch["neighbor"] = encode_rows(
                self.processor, [pair[0] for *_, pair in rows], [pair[1] for *_, pair in rows], None, where
            )
            batch["neighbor_record"] = torch.tensor([row for row, _, _ in rows], dtype=torch.long)
        batch["meta"] = [e.meta for e in examples]
        return batch


@dataclass
class FactExample:
    """One pre-edit fact: `prompt` (about `image`, or text-only when None) is answered `target`."""

    prompt: str
    target: str
    image: Image.Image | None
    where: Where = ("<facts>", 0, "src")


class FactDataset(Dataset):
    """The world as it is before any edit, for fine-tuning a base model to know it.

    Per record: (src, pred, image), (rephrase, pred, image), (src, pred, image_rephrase),
    (loc, loc_ans, no image), (m_loc_q, m_loc_a, m_loc). Portability answers are post-edit
    truths, so they are not facts here. Examples whose `pred` is empty are left out.
    """

    def __init__(
        self,
        records: Sequence[EditRecord],
        image_root: str | Path,
        kind: DataKind,
        vqa_template: str = VQA_TEMPLATE,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.records = list(records)
        self.image_root = Path(image_root)
        self.max_image_pixels = max_image_pixels
        build = PromptBuilder(kind, vqa_template)
        # (record position, prompt, target, image field or None, prompt field): strings only, images load per item.
        self.facts: list[tuple[int, str, str, str | None, str]] = []
        for position, r in enumerate(self.records):
            if r.pred.strip():
                self.facts += [
                    (position, build.edit_prompt(r.src), r.pred, "image", "src"),
                    (position, build.edit_prompt(r.rephrase), r.pred, "image", "rephrase"),
                    (position, build.edit_prompt(r.src), r.pred, "image_rephrase", "src"),
                ]
            self.facts += [
                (position, r.loc, r.loc_ans, None, "loc"),
                (position, build.question(r.m_loc_q), r.m_loc_a, "m_loc", "m_loc_q"),
            ]

    def __len__(self) -> int:
        return len(self.facts)

    def __getitem__(self, i: int) -> FactExample:
        position, prompt, target, field, text_field = self.facts[i]
        record = self.records[position]
        image = None if field is None else load_image(self.image_root, record, field, position, self.max_image_pixels)
        return FactExample(prompt, target, image, (*record.where(position), text_field))


class TextFactDataset(Dataset):
    """The world of text records as it is before any edit, for teaching a text base model to know it: per record
    (src, pred) and (rephrase, pred) unless `pred` is empty, (loc, loc_ans) and each neighbour's (prompt, answer),
    all without an image (`FactDataset`'s facts, for the zsRE / CounterFact layouts)."""

    def __init__(self, records: Sequence[TextRecord]) -> None:
        self.facts: list[FactExample] = []
        for position, r in enumerate(records):
            file, index = r.where(position)
            if r.pred.strip():
                self.facts += [
                    FactExample(r.src, r.pred, None, (file, index, "src")),
                    FactExample(r.rephrase, r.pred, None, (file, index, "rephrase")),
                ]
            self.facts.append(FactExample(r.loc, r.loc_ans, None, (file, index, "loc")))
            self.facts += [
                FactExample(n.prompt, n.answer, None, (file, index, f"neighbors[{k}]"))
                for k, n in enumerate(r.neighbors)
            ]

    def __len__(self) -> int:
        return len(self.facts)

    def __getitem__(self, i: int) -> FactExample:
        return self.facts[i]


class FactCollator:
    """List of `FactExample` -> {"with_image": sub_batch, "text_only": sub_batch}, empty kinds omitted."""

    def __init__(self, processor: SubBatchEncoder) -> None:
        self.processor = processor

    def __call__(self, examples: Sequence[FactExample]) -> dict[str, SubBatch]:
        with_image = [e for e in examples if e.image is not None]
        text_only = [e for e in examples if e.image is None]
        out = {}
        if with_image:
            out["with_image"] = encode_rows(
                self.processor,
                [e.prompt for e in with_image],
                [e.target for e in with_image],
                [e.image for e in with_image],
                [e.where for e in with_image],
            )
        if text_only:
            out["text_only"] = encode_rows(
                self.processor,
                [e.prompt for e in text_only],
                [e.target for e in text_only],
                None,
                [e.where for e in text_only],
            )
        return out
