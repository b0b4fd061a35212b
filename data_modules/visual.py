"""A record's visual input: one image, a video (a list of frame paths) or named views (camera -> path).

In JSON an `image` / `image_rephrase` value is a path (kind "image"), a list of paths ("video") or an
object of camera name -> path ("views", e.g. ADS-Edit's six nuScenes cameras). Loaded, the same shapes
hold PIL images, which is what a collator hands the backbone's encoder: a family declares the kinds it
encodes (`Backbone.visual_inputs`) and records of other kinds are refused before training or evaluation.

A CODA-LM annotation name (`test_3391.json`, as ADS-Edit's single-image records give) stands for that
annotation's image, `test/images/3391.jpg`, found as CODA-LM's own loader finds it (README, "ADS-Edit").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image

Visual = str | tuple[str, ...] | dict[str, str]
"""A visual input as read from JSON (a list becomes a tuple)."""
LoadedVisual = Image.Image | list[Image.Image] | dict[str, Image.Image]
VISUAL_FIELDS = ("image", "image_rephrase")
VISUAL_KINDS = ("image", "video", "views")
DEFAULT_MAX_FRAMES = 32
VIEW_NAME = re.compile(r"[A-Za-z0-9_-]+")
CODA_ANNOTATION = re.compile(r"(?P<split>[A-Za-z]+)_(?P<id>\d+)\.json")


def visual_kind(value: Visual | LoadedVisual) -> str:
    """ "image", "video" or "views" for a visual input, paths or images."""
    if isinstance(value, Mapping):
        return "views"
    if isinstance(value, (list, tuple)):
        return "video"
    return "image"


def image_file(path: str) -> str:
    """The image file a path names: itself, or for a CODA-LM annotation name the image it annotates."""
    head, _, name = path.rpartition("/")
    match = CODA_ANNOTATION.fullmatch(name)
    if match is None:
        return path
    return f"{head}/" * bool(head) + f"{match['split']}/images/{match['id']}.jpg"


def parse_visual(raw: Any, file: str, index: int, field: str) -> tuple[Visual | None, list[Any]]:
    """A visual input from its JSON value, or None and the problems (file, record, field of each)."""
    from data_modules.records import Problem, json_type  # records imports this module

    if isinstance(raw, str):
        if not raw.strip():
            return None, [Problem(file, index, field, "empty image path")]
        return raw, []
    if isinstance(raw, (list, tuple)):
        if not raw:
            return None, [Problem(file, index, field, "empty list of frames")]
        problems = [
            Problem(file, index, f"{field}[{k}]", f"expected a non-empty frame path, got {json_type(p)} {p!r}"[:200])
            for k, p in enumerate(raw)
            if not isinstance(p, str) or not p.strip()
        ]
        return (None, problems) if problems else (tuple(raw), [])
    if isinstance(raw, dict):
        if not raw:
            return None, [Problem(file, index, field, "empty object of views")]
        problems = [
            Problem(file, index, f"{field}.{name}", "view name must be letters, digits, '_' or '-'")
            for name in raw
            if not VIEW_NAME.fullmatch(name)
        ]
        problems += [
            Problem(file, index, f"{field}.{name}", f"expected a non-empty image path, got {json_type(p)} {p!r}"[:200])
            for name, p in raw.items()
            if not isinstance(p, str) or not p.strip()
        ]
        return (None, problems) if problems else (dict(raw), [])
    return None, [
        Problem(
            file,
            index,
            field,
            f"expected an image path, a list of frame paths or an object of views, got {json_type(raw)}",
        )
    ]


def visual_json(value: Visual) -> Any:
    """The JSON value of a visual input (frames as a list)."""
    return list(value) if isinstance(value, tuple) else value


def visual_files(field: str, value: Visual) -> list[tuple[str, str, str]]:
    """(label, member, image file) per image of a visual input: `label` names it in messages (`image`,
    `image[2]`, `image.CAM_FRONT`), `member` in a shard sample (`image`, `image.2`; views by position too, as
    webdataset lower-cases member names)."""
    if isinstance(value, str):
        return [(field, field, image_file(value))]
    if isinstance(value, Mapping):
        return [(f"{field}.{name}", f"{field}.{k}", image_file(path)) for k, (name, path) in enumerate(value.items())]
    return [(f"{field}[{k}]", f"{field}.{k}", image_file(path)) for k, path in enumerate(value)]


def assemble(field: str, value: Visual, images: Mapping[str, Image.Image]) -> LoadedVisual:
    """The loaded visual input of `value`, its images taken from `images` by member name."""
    loaded = [images[member] for _, member, _ in visual_files(field, value)]
    if isinstance(value, str):
        return loaded[0]
    if isinstance(value, Mapping):
        return dict(zip(value, loaded))
    return loaded


def frame_count_problems(records: Sequence[Any], max_frames: int | None, fallback_file: str = "<records>") -> list[Any]:
    """A problem per visual input of `records` with more frames or views than `max_frames`."""
    from data_modules.records import Problem

    if max_frames is None:
        return []
    problems = []
    for position, record in enumerate(records):
        for field in VISUAL_FIELDS:
            value = getattr(record, field)
            if not isinstance(value, str) and len(value) > max_frames:
                kind = "frames" if visual_kind(value) == "video" else "views"
                message = f"{len(value)} {kind}, more than the limit of {max_frames} (--max-frames / max_frames)"
                problems.append(Problem(*record.where(position, fallback_file), field, message))
    return problems


def unsupported_visual_problems(
    records: Sequence[Any], accepted: Iterable[str], family: str, fallback_file: str = "<records>"
) -> list[Any]:
    """A problem for the first record of each visual kind the `family` backbone does not encode."""
    from data_modules.records import Problem

    accepted = set(accepted)
    problems, seen = [], set()
    for position, record in enumerate(records):
        for field in VISUAL_FIELDS:
            if not hasattr(record, field):  # text-only records
                continue
            kind = visual_kind(getattr(record, field))
            if kind in accepted or kind in seen:
                continue
            seen.add(kind)
            file, index = record.where(position, fallback_file)
            problems.append(
                Problem(
                    file,
                    index,
                    field,
                    f"a {kind} input, which the {family} backbone does not encode (it takes: "
                    f"{', '.join(sorted(accepted))}); use a family that accepts {kind} inputs",
                )
            )
    return problems
