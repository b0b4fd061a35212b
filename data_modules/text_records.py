"""Text-only edit records (no images), read and checked like the image layouts in records.py.

Three public layouts are read, each record on its own (a file may mix them):

    zsRE (MEND / EasyEdit)      src, rephrase, alt, loc, loc_ans; optional pred (the pre-edit answer)
    CounterFact (ROME / MEMIT)  requested_rewrite {prompt with "{}", subject, target_new.str, target_true.str},
                                paraphrase_prompts [..], neighborhood_prompts [..]
    CounterFact (EasyEdit)      prompt, subject, target_new, ground_truth, rephrase_prompt,
                                locality_prompt, locality_ground_truth

CounterFact's first paraphrase prompt is the rephrase and its first neighbourhood prompt the locality
input, whose answer is `target_true` (the neighbours share the true object, as in ROME's evaluation).
A text record has no image fields: a record that has an `image` field belongs to the image layouts.

Near neighbours (same relation, another subject, with the pre-edit answer) are an optional list in the
zsRE and EasyEdit layouts, `neighbors: [{"prompt": p, "answer": a}, ...]`; ROME's CounterFact gives them
as every `neighborhood_prompts` item, answered `target_true`. They are scored as `n_locality`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_modules.records import (
    Located,
    Origin,
    Problem,
    Scan,
    _duplicate_problems,
    _string_problems,
    _text_problems,
    json_type,
    read_json_list,
    usable_records,
)

ZSRE_FIELDS = ("src", "rephrase", "alt", "loc", "loc_ans")
EASYEDIT_COUNTERFACT_FIELDS = (
    "prompt",
    "target_new",
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
)
PROMPTS = {"src": "prompt", "rephrase": "rephrase_prompt", "loc": "locality_prompt"}
"""TextRecord prompt fields -> EasyEdit CounterFact field, for naming the field a user wrote."""


@dataclass(frozen=True)
class Neighbor:
    """A near neighbour of an edit: the edit's relation about another subject, and its pre-edit answer."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class TextRecord(Located):
    """One text edit: `src` used to be answered `pred` and should now be answered `alt`; `rephrase`
    too, while `loc` stays answered `loc_ans` and each of `neighbors` its answer."""

    src: str
    rephrase: str
    alt: str
    loc: str
    loc_ans: str
    pred: str = ""
    neighbors: tuple[Neighbor, ...] = ()
    origin: Origin | None = field(default=None, compare=False, repr=False)


def is_text_record(raw: Any) -> bool:
    """Whether a parsed JSON item is in a text layout (it names no image)."""
    return (
        isinstance(raw, dict) and "image" not in raw and ("src" in raw or "prompt" in raw or "requested_rewrite" in raw)
    )


def file_is_text(path: str | Path) -> bool:
    """Whether a data file's first record is a text record (False also when the file cannot be read)."""
    raw, problems = read_json_list(path)
    return not problems and is_text_record(raw[0])


def _first(raw: Mapping[str, Any], key: str, file: str, index: int) -> tuple[str | None, list[Problem]]:
    """The first string of the list `raw[key]`, or the problem with it."""
    items = raw.get(key)
    if key not in raw:
        return None, [Problem(file, index, key, "missing field")]
    if not isinstance(items, list) or not items:
        got = "an empty list" if isinstance(items, list) else json_type(items)
        return None, [Problem(file, index, key, f"expected a non-empty list of strings, got {got}")]
    if not isinstance(items[0], str):
        return None, [Problem(file, index, f"{key}[0]", f"expected a string, got {json_type(items[0])}")]
    return items[0], []


def _neighbors(raw: Mapping[str, Any], file: str, index: int) -> tuple[tuple[Neighbor, ...], list[Problem]]:
    """The optional `neighbors` list of a zsRE or EasyEdit record, or the problems with it."""
    items = raw.get("neighbors", [])
    if not isinstance(items, list):
        return (), [Problem(file, index, "neighbors", f"expected a list, got {json_type(items)}")]
    neighbors, problems = [], []
    for position, item in enumerate(items):
        name = f"neighbors[{position}]"
        if not isinstance(item, dict):
            problems.append(Problem(file, index, name, f"expected an object, got {json_type(item)}"))
            continue
        more = _string_problems(item, ["prompt", "answer"], file, index, f"{name}.")
        if not more and not item["prompt"].strip():
            more.append(Problem(file, index, f"{name}.prompt", "empty or whitespace-only prompt"))
        if not more and not item["answer"].strip():
            more.append(Problem(file, index, f"{name}.answer", "empty target"))
        problems += more
        if not more:
            neighbors.append(Neighbor(item["prompt"], item["answer"]))
    return tuple(neighbors), problems


def _rome_neighbors(raw: Mapping[str, Any], answer: str, file: str, index: int) -> tuple[tuple[Neighbor, ...], list]:
    """Every `neighborhood_prompts` item as a neighbour answered `answer` (`target_true`)."""
    problems = [
        Problem(file, index, f"neighborhood_prompts[{k}]", f"expected a string, got {json_type(item)}")
        for k, item in enumerate(raw["neighborhood_prompts"])
        if not isinstance(item, str)
    ]
    if problems:
        return (), problems
    return tuple(Neighbor(prompt, answer) for prompt in raw["neighborhood_prompts"] if prompt.strip()), []


def _rome_fields(raw: Mapping[str, Any], file: str, index: int) -> tuple[dict[str, str], list[Problem], dict]:
    """ROME's CounterFact: the TextRecord fields, problems, and the field each came from."""
    rewrite = raw["requested_rewrite"]
    if not isinstance(rewrite, dict):
        kind = json_type(rewrite)
        return {}, [Problem(file, index, "requested_rewrite", f"expected an object, got {kind}")], {}
    problems = _string_problems(rewrite, ["prompt", "subject"], file, index, "requested_rewrite.")
    targets = {}
    for key in ("target_new", "target_true"):
        target = rewrite.get(key)
        if not isinstance(target, dict):
            got = "missing field" if key not in rewrite else f"expected an object, got {json_type(target)}"
            problems.append(Problem(file, index, f"requested_rewrite.{key}", got))
        else:
            problems += _string_problems(target, ["str"], file, index, f"requested_rewrite.{key}.")
            targets[key] = target.get("str")
    rephrase, more = _first(raw, "paraphrase_prompts", file, index)
    loc, most = _first(raw, "neighborhood_prompts", file, index)
    problems += more + most
    if problems:
        return {}, problems, {}
    if "{}" not in rewrite["prompt"]:
        return {}, [Problem(file, index, "requested_rewrite.prompt", "no '{}' where the subject goes")], {}
    fields = {
        "src": rewrite["prompt"].format(rewrite["subject"]),
        "rephrase": rephrase,
        "alt": targets["target_new"],
        "loc": loc,
        "loc_ans": targets["target_true"],
        "pred": targets["target_true"],
    }
    names = {
        "src": "requested_rewrite.prompt",
        "rephrase": "paraphrase_prompts[0]",
        "alt": "requested_rewrite.target_new.str",
        "loc": "neighborhood_prompts[0]",
        "loc_ans": "requested_rewrite.target_true.str",
    }
    return fields, [], names


def parse_text_record(raw: Any, file: str, index: int) -> tuple[TextRecord | None, list[Problem]]:
    """A text record and no problems, or None and every problem found in `raw`."""
    if not isinstance(raw, dict):
        return None, [Problem(file, index, None, f"expected an object, got {json_type(raw)}")]
    problems = _duplicate_problems(raw, file, index) + _text_problems(raw, file, index, "")
    if "requested_rewrite" in raw:
        fields, more, names = _rome_fields(raw, file, index)
        if fields:
            fields["neighbors"], most = _rome_neighbors(raw, fields["loc_ans"], file, index)
            more += most
    elif "src" in raw:
        keys = [*ZSRE_FIELDS, *(["pred"] if "pred" in raw else [])]
        more = _string_problems(raw, keys, file, index)
        fields = {key: raw.get(key) for key in keys}
        names = {key: key for key in ZSRE_FIELDS}
    else:
        more = _string_problems(raw, EASYEDIT_COUNTERFACT_FIELDS, file, index)
        fields = {
            "src": raw.get("prompt"),
            "rephrase": raw.get("rephrase_prompt"),
            "alt": raw.get("target_new"),
            "loc": raw.get("locality_prompt"),
            "loc_ans": raw.get("locality_ground_truth"),
            "pred": raw.get("ground_truth"),
        }
        names = {**PROMPTS, "alt": "target_new", "loc_ans": "locality_ground_truth"}
    if "requested_rewrite" not in raw:
        fields["neighbors"], most = _neighbors(raw, file, index)
        more += most
    problems += more
    for key in ("src", "rephrase", "loc", "loc_ans"):
        value = fields.get(key)
        if isinstance(value, str) and not value.strip():
            message = "empty target" if key == "loc_ans" else "empty or whitespace-only prompt"
            problems.append(Problem(file, index, names[key], message))
    if problems:
        return None, problems
    return TextRecord(**fields, origin=Origin(file, index)), []


def scan_text_records(path: str | Path) -> Scan:
    """Read and check a text data file without raising (records with an empty `alt` included)."""
    file = str(path)
    raw, problems = read_json_list(path)
    if raw and isinstance(raw[0], dict) and "image" in raw[0]:
        message = "image edit records (E-VQA / E-IC layout), not text records (zsRE / CounterFact layout)"
        return Scan(file, [], [Problem(file, None, None, message)], len(raw), [])
    records = []
    for index, item in enumerate(raw):
        record, item_problems = parse_text_record(item, file, index)
        problems += item_problems
        if record is not None:
            records.append(record)
    return Scan(file, records, problems, len(raw), [])


def read_text_records(path: str | Path) -> list[TextRecord]:
    """The usable records of a text data file; one `DataError` naming the problems if there are any.

    Records with an empty `alt` are skipped with one `SkippedRecordsWarning`, as for image records.
    """
    return usable_records(scan_text_records(path))
