"""ADS-Edit records (Wang et al. 2025, "ADS-Edit: A Multimodal Knowledge Editing Dataset for Autonomous
Driving Systems"): edits about driving scenes seen as a video, six camera views or one image.

A data file is a JSON list of objects with the string fields `data_type` (the scenario, e.g. "Obstacle
recognition"), `image_type` ("video" | "multi-image" | "single-image"), `source`, `src`, `rephrase`, `alt`,
`original_gr` (the answer before the edit), `rephrase_images_original_gr`, `loc`, `loc_ans`, `m_loc`,
`m_loc_q`, `m_loc_a`, and the visual inputs `image` / `image_rephrase` whose kind `image_type` fixes
(frames, an object of camera views, or one path; data_modules/visual.py). `m_loc` is one image.
An `ADSRecord` is an `EditRecord` whose `pred` is `original_gr`, so every loader and metric applies.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from data_modules.records import (
    DataError,
    EditRecord,
    JSONObject,
    Problem,
    Scan,
    _string_problems,
    _text_problems,
    json_type,
    parse_record,
    read_json_list,
    scan_records,
)
from data_modules.visual import VISUAL_FIELDS, visual_json, visual_kind

ADS_FIELDS = (
    "data_type",
    "image_type",
    "source",
    "src",
    "rephrase",
    "alt",
    "image",
    "image_rephrase",
    "original_gr",
    "rephrase_images_original_gr",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
)
ADS_ONLY_FIELDS = ("data_type", "image_type", "source", "original_gr", "rephrase_images_original_gr")
IMAGE_TYPES = {"video": "video", "multi-image": "views", "single-image": "image"}
"""`image_type` -> the kind of visual input its `image` and `image_rephrase` hold."""
GROUP_FIELDS = ("data_type", "image_type")
"""Record fields whose values split the metrics (`data_type/<name>/reliability`, ...)."""
EXPECTED = {"video": "a list of frame paths", "views": "an object of camera name -> path", "image": "one path"}


@dataclass(frozen=True)
class ADSRecord(EditRecord):
    """An ADS-Edit edit: an `EditRecord` (`pred` = `original_gr`) and its scenario and source."""

    data_type: str = ""
    image_type: str = ""
    source: str = ""
    rephrase_images_original_gr: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The ADS-Edit layout."""
        values = {name: getattr(self, name) for name in ADS_FIELDS if name != "original_gr"}
        values["original_gr"] = self.pred
        return {name: visual_json(values[name]) for name in ADS_FIELDS}

    def groups(self) -> list[str]:
        """The metric groups this record counts in: `data_type/<name>`, `image_type/<name>`."""
        return [f"{name}/{getattr(self, name)}" for name in GROUP_FIELDS]


def parse_ads_record(raw: Any, file: str, index: int) -> tuple[ADSRecord | None, list[Problem]]:
    """An ADS-Edit record and no problems, or None and every problem found in `raw`."""
    if not isinstance(raw, dict):
        return None, [Problem(file, index, None, f"expected an object, got {json_type(raw)}")]
    problems = _string_problems(raw, ADS_ONLY_FIELDS, file, index)
    problems += _text_problems({k: raw[k] for k in ADS_ONLY_FIELDS if k in raw and k != "original_gr"}, file, index, "")
    # The shared fields are checked as any record's, `original_gr` read as its `pred`.
    shared = JSONObject(raw)
    shared.duplicates = getattr(raw, "duplicates", ())
    original = raw.get("original_gr")
    shared["pred"] = original if isinstance(original, str) else ""
    record, found = parse_record(shared, file, index)
    problems += [replace(p, field="original_gr") if p.field == "pred" else p for p in found]
    image_type = raw.get("image_type")
    kind = IMAGE_TYPES.get(image_type) if isinstance(image_type, str) else None
    if isinstance(image_type, str) and kind is None:
        problems.append(
            Problem(
                file, index, "image_type", f"unknown image type {image_type!r} (expected one of {list(IMAGE_TYPES)})"
            )
        )
    if isinstance(raw.get("data_type"), str) and not raw["data_type"].strip():
        problems.append(Problem(file, index, "data_type", "empty scenario name"))
    if record is not None and kind is not None:
        for name in VISUAL_FIELDS:
            actual = visual_kind(getattr(record, name))
            if actual != kind:
                problems.append(
                    Problem(
                        file, index, name, f"a {actual} input in an {image_type!r} record (expected {EXPECTED[kind]})"
                    )
                )
    if problems:
        return None, problems
    extra = {name: raw[name] for name in ("data_type", "image_type", "source", "rephrase_images_original_gr")}
    return ADSRecord(**{f.name: getattr(record, f.name) for f in fields(EditRecord)}, **extra), []


def scan_ads_records(path: str | Path) -> Scan:
    """`scan_records` for an ADS-Edit file."""
    return scan_records(path, parse_ads_record)


def file_is_ads(path: str | Path) -> bool:
    """Whether a data file's first record is in the ADS-Edit layout (it has an `image_type`)."""
    raw, problems = read_json_list(path)
    return not problems and isinstance(raw[0], dict) and "image_type" in raw[0]


def scan_any(path: str | Path) -> Scan:
    """The scan of an ADS-Edit or an E-VQA / E-IC / VLKEB file, whichever it is."""
    return scan_ads_records(path) if file_is_ads(path) else scan_records(path)


def record_from_dict(raw: Any, file: str, index: int) -> EditRecord:
    """`EditRecord.from_dict`, or `ADSRecord`'s for an object with an `image_type`."""
    if isinstance(raw, dict) and "image_type" in raw:
        record, problems = parse_ads_record(raw, file, index)
        if record is None:
            raise DataError(problems)
        return record
    return EditRecord.from_dict(raw, file, index)


def metric_groups(records: list[EditRecord]) -> list[str]:
    """The sorted metric groups of `records` (none for records without scenarios)."""
    return sorted({group for record in records if isinstance(record, ADSRecord) for group in record.groups()})
