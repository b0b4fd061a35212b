"""One edit record in the public E-VQA / E-IC / VLKEB JSON layout, read and checked.

A data file is a JSON list of objects with the string fields in `RECORD_FIELDS` (MMEdit, Cheng et al. 2023)
and, in VLKEB (Huang et al. 2024), an optional `port_new` list of portability questions in one of two forms:

    {"port_type": "2-hop", "Q&A": {"Question": q, "Answer": a}}            multi-hop files
    {"port_q": q, "port_a": a, "port_edit_q": eq, "port_edit_a": ea}       eval_edit_onehop.json

Reading collects every problem of a file (record index and field) into one `DataError`, so a file is fixed
in one pass and training never meets bad data in a worker. An optional `subject` string (ours; `kedit synth`
writes the entity's name) says what the edited fact is about: `kedit eval --sequential` reads it to tell
which edits a later edit of the same fact supersedes. Unknown fields are ignored; records with an
empty `alt` are skipped with one counted warning, as the public loaders skip them.
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_modules.visual import VISUAL_FIELDS, Visual, parse_visual, visual_files, visual_json

RECORD_FIELDS = (
    "src",
    "pred",
    "alt",
    "rephrase",
    "image",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
)
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
# Answers a sub-batch supervises: an empty one has no tokens to score. (`alt` is handled apart:
# records with an empty `alt` are skipped, not rejected; `pred` is never a sub-batch target.)
TARGET_FIELDS = ("loc_ans", "m_loc_a")
PROMPT_FIELDS = ("src", "rephrase", "loc", "m_loc_q")
# Characters that reorder or hide text (bidi overrides, isolates and marks); with the C0/C1 controls
# other than tab and newlines, they make a prompt read differently from what the model is given.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
ALLOWED_CONTROLS = frozenset("\t\n\r")
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_HOP = "1-hop"
SHOWN_PROBLEMS = 10


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data file; `index` and `field` are None when they do not apply."""

    file: str
    index: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = [self.file]
        if self.index is not None:
            where.append(f"record {self.index}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return ": ".join([*where, self.message])


class DataError(ValueError):
    """Bad input data; `problems` lists everything found, the message shows the first few (a single
    problem is the whole one-line message).

    A plain message is accepted too: that is how a DataLoader worker's error is rebuilt in the
    main process (its problems already spelled out in the text).
    """

    def __init__(self, problems: Sequence[Problem] | str) -> None:
        if isinstance(problems, str):
            self.problems: list[Problem] = []
            super().__init__(problems)
            return
        self.problems = list(problems)
        if len(self.problems) == 1:  # one problem, one line
            super().__init__(str(self.problems[0]))
            return
        lines = [str(p) for p in self.problems[:SHOWN_PROBLEMS]]
        if len(self.problems) > SHOWN_PROBLEMS:
            lines.append(f"... and {len(self.problems) - SHOWN_PROBLEMS} more")
        super().__init__(f"{len(self.problems)} problem(s) in the data:\n  " + "\n  ".join(lines))


class SkippedRecordsWarning(UserWarning):
    """Records were left out of a split (empty `alt`), as the public loaders do."""


@dataclass(frozen=True)
class Origin:
    """Where a record was read from, so later errors (a broken image in a worker) can say so."""

    file: str
    index: int


@dataclass(frozen=True)
class PortQuestion:
    """A portability question: after the edit, `question` about the image should give `answer`.

    `edit_question` / `edit_answer` (`port_edit_q` / `port_edit_a`) are set only for VLKEB's one-hop-edit
    variant: that one-hop fact about the entity is edited too, and `answer` follows from it. `hop` is
    "1-hop" there unless the item has a `port_type`.
    """

    hop: str
    question: str
    answer: str
    edit_question: str = ""
    edit_answer: str = ""

    def to_dict(self) -> dict[str, Any]:
        if self.edit_question or self.edit_answer:
            item = {
                "port_q": self.question,
                "port_a": self.answer,
                "port_edit_q": self.edit_question,
                "port_edit_a": self.edit_answer,
            }
            return item if self.hop == DEFAULT_HOP else {"port_type": self.hop, **item}
        return {"port_type": self.hop, "Q&A": {"Question": self.question, "Answer": self.answer}}


class Located:
    """A record that may know where it was read from (`origin`)."""

    origin: Origin | None

    def where(self, fallback_index: int = 0, fallback_file: str = "<records>") -> tuple[str, int]:
        """(file, index) for messages: the origin when known, else the given fallback."""
        if self.origin is None:
            return fallback_file, fallback_index
        return self.origin.file, self.origin.index


@dataclass(frozen=True)
class EditRecord(Located):
    """One edit: `src` about `image` used to be answered `pred` and should now be answered `alt`."""

    src: str
    pred: str
    alt: str
    rephrase: str
    image: Visual
    image_rephrase: Visual
    loc: str
    loc_ans: str
    m_loc: str
    m_loc_q: str
    m_loc_a: str
    port: tuple[PortQuestion, ...] = ()
    subject: str | None = None  # optional: what the edited fact is about (sequential scoring's key, editor.py)
    origin: Origin | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: Any, file: str = "<dict>", index: int = 0) -> EditRecord:
        """Parse one public-layout object; raises `DataError` listing every problem in it."""
        record, problems = parse_record(raw, file, index)
        if record is None:
            raise DataError(problems)
        return record

    def to_dict(self) -> dict[str, Any]:
        """The public layout (`port_new` only when there are portability questions)."""
        out: dict[str, Any] = {name: visual_json(getattr(self, name)) for name in RECORD_FIELDS}
        if self.port:
            out["port_new"] = [q.to_dict() for q in self.port]
        if self.subject is not None:
            out["subject"] = self.subject
        return out


def json_type(value: Any) -> str:
    """The type of a parsed JSON value as messages name it ("dict", "list", "str", ...)."""
    return "dict" if isinstance(value, dict) else type(value).__name__


class JSONObject(dict):
    """A parsed JSON object that remembers keys given more than once (json keeps only the last)."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> JSONObject:
    obj = JSONObject(pairs)
    if len(obj) < len(pairs):
        obj.duplicates = tuple(sorted(key for key, n in Counter(k for k, _ in pairs).items() if n > 1))
    return obj


def _duplicate_problems(value: Any, file: str, index: int, path: str = "") -> list[Problem]:
    """A problem per duplicated key anywhere inside one record."""
    problems = []
    if isinstance(value, dict):
        problems += [
            Problem(file, index, f"{path}{key}", "duplicate key (JSON keeps only the last value)")
            for key in getattr(value, "duplicates", ())
        ]
        for key, item in value.items():
            problems += _duplicate_problems(item, file, index, f"{path}{key}.")
    elif isinstance(value, list):
        for position, item in enumerate(value):
            problems += _duplicate_problems(item, file, index, f"{path[:-1]}[{position}].")
    return problems


def control_character(text: str) -> str | None:
    """A description of the first control or bidi character in `text`, or None."""
    for position, char in enumerate(text):
        if char in BIDI_CONTROLS or (unicodedata.category(char) == "Cc" and char not in ALLOWED_CONTROLS):
            name = unicodedata.name(char, "control character")
            return f"control character U+{ord(char):04X} ({name}) at character {position}"
    return None


def _text_problems(value: Any, file: str, index: int, path: str) -> list[Problem]:
    """A problem per string inside one record that holds a control or bidi character."""
    if isinstance(value, str):
        found = control_character(value)
        return [] if found is None else [Problem(file, index, path, found)]
    if isinstance(value, dict):
        return [
            p for key, item in value.items() for p in _text_problems(item, file, index, f"{path}.{key}".lstrip("."))
        ]
    if isinstance(value, list):
        return [
            p for position, item in enumerate(value) for p in _text_problems(item, file, index, f"{path}[{position}]")
        ]
    return []


def _string_problems(
    raw: Mapping[str, Any], keys: Iterable[str], file: str, index: int, prefix: str = ""
) -> list[Problem]:
    problems = []
    for key in keys:
        name = f"{prefix}{key}"
        if key not in raw:
            problems.append(Problem(file, index, name, "missing field"))
        elif not isinstance(raw[key], str):
            problems.append(Problem(file, index, name, f"expected a string, got {json_type(raw[key])}"))
    return problems


def _parse_port_item(item: Any, file: str, index: int, position: int) -> tuple[PortQuestion | None, list[Problem]]:
    prefix = f"port_new[{position}]."
    if not isinstance(item, dict):
        return None, [Problem(file, index, f"port_new[{position}]", f"expected an object, got {json_type(item)}")]
    if "Q&A" in item:
        problems = _string_problems(item, ["port_type"], file, index, prefix)
        qa = item["Q&A"]
        if not isinstance(qa, dict):
            problems.append(Problem(file, index, f"{prefix}Q&A", f"expected an object, got {json_type(qa)}"))
            return None, problems
        problems += _string_problems(qa, ["Question", "Answer"], file, index, f"{prefix}Q&A.")
        if problems:
            return None, problems
        question = PortQuestion(item["port_type"], qa["Question"], qa["Answer"])
        answer_field = f"{prefix}Q&A.Answer"
    elif "port_q" in item:
        problems = _string_problems(item, ["port_q", "port_a", "port_edit_q", "port_edit_a"], file, index, prefix)
        if "port_type" in item:
            problems += _string_problems(item, ["port_type"], file, index, prefix)
        if problems:
            return None, problems
        hop = item.get("port_type", DEFAULT_HOP)
        question = PortQuestion(hop, item["port_q"], item["port_a"], item["port_edit_q"], item["port_edit_a"])
        if not question.edit_answer.strip():
            return None, [Problem(file, index, f"{prefix}port_edit_a", "empty target")]
        answer_field = f"{prefix}port_a"
    else:
        keys = sorted(item)
        return None, [
            Problem(
                file,
                index,
                f"port_new[{position}]",
                f"neither a {{port_type, Q&A}} nor a {{port_q, port_a, port_edit_q, port_edit_a}} item (keys: {keys})",
            )
        ]
    if not question.answer.strip():
        return None, [Problem(file, index, answer_field, "empty target")]
    if not question.question.strip():
        question_field = answer_field.replace("Answer", "Question").replace("port_a", "port_q")
        return None, [Problem(file, index, question_field, "empty or whitespace-only prompt")]
    return question, []


def parse_record(raw: Any, file: str, index: int) -> tuple[EditRecord | None, list[Problem]]:
    """A record and no problems, or None and every problem found in `raw`."""
    if not isinstance(raw, dict):
        return None, [Problem(file, index, None, f"expected an object, got {json_type(raw)}")]
    checked = {key: raw[key] for key in (*RECORD_FIELDS, "port_new") if key in raw}
    problems = _duplicate_problems(raw, file, index) + _text_problems(checked, file, index, "")
    problems += _string_problems(raw, [n for n in RECORD_FIELDS if n not in VISUAL_FIELDS], file, index)
    visuals, visual_problems = parse_visuals(raw, file, index)
    problems += visual_problems
    bad = {p.field for p in problems}
    for name in PROMPT_FIELDS:
        if name not in bad and not raw[name].strip():
            problems.append(Problem(file, index, name, "empty or whitespace-only prompt"))
    for name in TARGET_FIELDS:
        if name not in bad and not raw[name].strip():
            problems.append(Problem(file, index, name, "empty target"))
    subject = raw.get("subject")
    if subject is not None and (not isinstance(subject, str) or not subject.strip()):
        problems.append(Problem(file, index, "subject", f"expected a non-empty string, got {subject!r}"))
    for name in IMAGE_FIELDS:
        if name not in bad and name not in VISUAL_FIELDS and not raw[name].strip():
            problems.append(Problem(file, index, name, "empty image path"))
    port: list[PortQuestion] = []
    port_raw = raw.get("port_new")
    if port_raw is not None and not isinstance(port_raw, list):
        problems.append(Problem(file, index, "port_new", f"expected a list, got {json_type(port_raw)}"))
    for position, item in enumerate(port_raw if isinstance(port_raw, list) else []):
        question, item_problems = _parse_port_item(item, file, index, position)
        problems += item_problems
        if question is not None:
            port.append(question)
    if problems:
        return None, problems
    fields = {name: raw[name] for name in RECORD_FIELDS} | visuals
    return EditRecord(**fields, port=tuple(port), subject=subject, origin=Origin(file, index)), []


def parse_visuals(raw: Mapping[str, Any], file: str, index: int) -> tuple[dict[str, Visual], list[Problem]]:
    """The visual inputs (`VISUAL_FIELDS`) of a raw record: a path, frames or views each."""
    visuals, problems = {}, []
    for name in VISUAL_FIELDS:
        if name not in raw:
            problems.append(Problem(file, index, name, "missing field"))
            continue
        value, found = parse_visual(raw[name], file, index, name)
        problems += found
        if value is not None:
            visuals[name] = value
    return visuals, problems


def image_refs(values: Mapping[str, Any], file: str, index: int) -> list[ImageRef]:
    """The image files a record names (`values`: its fields, raw or parsed), each with its field label;
    values that do not parse name none."""
    refs = []
    for name in IMAGE_FIELDS:
        value = values.get(name)
        if name in VISUAL_FIELDS and not isinstance(value, str):
            value, found = parse_visual(value, file, index, name)
            if found:
                continue
        elif not isinstance(value, str) or not value.strip():
            continue
        refs += [(file, index, label, path) for label, _, path in visual_files(name, value)]
    return refs


ImageRef = tuple[str, int, str, str]
"""(file, record index, field, image path relative to the image root)."""


@dataclass(frozen=True)
class Scan:
    """Everything read from one file: the records that parsed (empty `alt` included), the problems,
    and every image path named by any record, parsed or not (so one pass finds every problem)."""

    file: str
    records: list  # EditRecord, or TextRecord for text-only files (data_modules/text_records.py)
    problems: list[Problem]
    total: int
    image_refs: list[ImageRef]

    @property
    def empty_alt(self) -> list[EditRecord]:
        return [r for r in self.records if not r.alt.strip()]


def read_json_list(path: str | Path) -> tuple[list[Any], list[Problem]]:
    """The top-level JSON list of a data file, or [] and the one problem that stops reading it."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a leading BOM (Windows editors) is not data
    except FileNotFoundError:
        return [], [Problem(file, None, None, "file not found")]
    except (OSError, UnicodeDecodeError) as err:
        return [], [Problem(file, None, None, f"cannot read: {err}")]
    try:
        raw = json.loads(text, object_pairs_hook=_object_pairs)
    except RecursionError:
        return [], [Problem(file, None, None, "JSON nested too deeply to read")]
    except json.JSONDecodeError as err:
        return [], [Problem(file, None, None, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}")]
    if not isinstance(raw, list):
        return [], [Problem(file, None, None, f"the top level is a JSON {json_type(raw)}, expected a list of records")]
    if not raw:
        return [], [Problem(file, None, None, "no records (the file is an empty list)")]
    return raw, []


def scan_records(path: str | Path, parse: Callable[..., tuple[Any, list[Problem]]] = parse_record) -> Scan:
    """Read and check a data file without raising: for `kedit validate` and `read_records`. `parse` reads one
    record (`parse_record`; data_modules/ads_records.py has ADS-Edit's)."""
    file = str(path)
    raw, problems = read_json_list(path)
    if problems:
        return Scan(file, [], problems, 0, [])
    records, problems, refs = [], [], []
    for index, item in enumerate(raw):
        record, item_problems = parse(item, file, index)
        problems += item_problems
        if record is not None:
            records.append(record)
        if isinstance(item, dict):
            refs += image_refs(item, file, index)
    return Scan(file, records, problems, len(raw), refs)


def read_records(path: str | Path) -> list[EditRecord]:
    """The usable records of a data file; one `DataError` naming the problems if there are any.

    Records with an empty `alt` are skipped with one `SkippedRecordsWarning` giving their count.
    """
    return usable_records(scan_records(path))


def usable_records(scan: Scan) -> list[Any]:
    """The records of `scan` with a target (`read_records`, for any record layout)."""
    if scan.problems:
        raise DataError(scan.problems)
    skipped = scan.empty_alt
    if skipped:
        shown = ", ".join(str(r.origin.index) for r in skipped[:SHOWN_PROBLEMS])
        more = ", ..." if len(skipped) > SHOWN_PROBLEMS else ""
        warnings.warn(
            f"{scan.file}: skipped {len(skipped)} of {scan.total} record(s) with an empty 'alt' "
            f"(records {shown}{more})",
            SkippedRecordsWarning,
            stacklevel=3,
        )
    records = [r for r in scan.records if r.alt.strip()]
    if not records:
        raise DataError([Problem(scan.file, None, None, f"no usable records (all {scan.total} have an empty 'alt')")])
    return records


def check_images(
    records: Sequence[EditRecord],
    image_root: str | Path,
    file: str = "<records>",
    verify: bool = True,
    extra_roots: Sequence[str | Path] = (),
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Problem]:
    """Problems with the images `records` name under `image_root`, per record and field.

    Every path must resolve (symlinks followed) inside `image_root` or one of `extra_roots`.
    `verify=False` only checks that each file exists (cheap enough for every training start);
    `verify=True` also opens it with Pillow, checks its size from the header against `max_pixels`
    and verifies its structure without decoding pixels. `file` names records that carry no origin.
    """
    refs = []
    for position, record in enumerate(records):
        source, index = record.where(position, file)
        refs += image_refs({name: getattr(record, name) for name in IMAGE_FIELDS}, source, index)
    return check_image_refs(refs, image_root, verify, extra_roots, max_pixels)


def check_image_refs(
    refs: Iterable[ImageRef],
    image_root: str | Path,
    verify: bool = True,
    extra_roots: Sequence[str | Path] = (),
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Problem]:
    """`check_images` for (file, index, field, path) references; each distinct path is checked once.

    A missing image root is one problem, not one per record."""
    roots = [Path(image_root), *map(Path, extra_roots)]
    missing = [Problem(str(r), None, None, "image folder not found") for r in roots if not r.is_dir()]
    if missing:
        return missing
    resolved_roots = [r.resolve() for r in roots]
    verdicts: dict[Path, str | None] = {}
    problems = []
    for source, index, name, relative in refs:
        path = roots[0] / relative
        if path not in verdicts:
            verdicts[path] = _image_problem(path, resolved_roots, verify, max_pixels)
        if verdicts[path] is not None:
            problems.append(Problem(source, index, name, verdicts[path]))
    return problems


def outside_roots(path: Path, resolved_roots: Sequence[Path]) -> str | None:
    """Why `path` may not be read (it resolves outside every root), or None."""
    target = path.resolve()
    if any(target.is_relative_to(root) for root in resolved_roots):
        return None
    return (
        f"image path {str(path)!r} resolves to {target}, outside the image root "
        "(name its folder with extra_image_roots / --extra-image-root to allow it)"
    )


def too_many_pixels(image: Image.Image, path: Path, max_pixels: int | None) -> str | None:
    """Why an opened (not yet decoded) image is refused for its size, or None."""
    width, height = image.size
    if max_pixels is None or width * height <= max_pixels:
        return None
    return f"image {path} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"


def _image_problem(path: Path, resolved_roots: Sequence[Path], verify: bool, max_pixels: int | None) -> str | None:
    outside = outside_roots(path, resolved_roots)
    if outside is not None:
        return outside
    if not path.is_file():
        return f"missing image {path}"
    if verify:
        try:
            with Image.open(path) as image:  # reads the header only; pixels are never decoded here
                too_big = too_many_pixels(image, path, max_pixels)
                if too_big is not None:
                    return too_big
                image.verify()
        except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ValueError) for broken files
            return f"unreadable image {path}: {type(err).__name__}: {err}"
    return None
