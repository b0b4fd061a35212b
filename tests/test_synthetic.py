"""The synthetic world: deterministic bytes, the public layouts, and facts that agree with each other."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.records import IMAGE_FIELDS, RECORD_FIELDS
from data_modules.synthetic import (
    COLOURS,
    ENTITY_QUESTIONS,
    FILES,
    HOP_QUESTIONS,
    IMAGE_SIZE,
    TEXT_FILES,
    VIEWS_PER_ENTITY,
    WHERE_QUESTIONS,
    build_world,
    planned_sizes,
    write_synthetic_world,
)
from data_modules.text_records import read_text_records
from kedit_lightning.cli import main

ENTITIES = 8


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "synthetic"
    summary = write_synthetic_world(out, seed=0, entities=ENTITIES)
    return out, summary


@pytest.fixture(scope="module")
def world(world_dir):
    out, _ = world_dir
    doc = json.loads((out / "world.json").read_text())
    doc["by_view"] = {v["path"]: e for e in doc["entities"] for v in e["views"]}
    doc["files_read"] = {name: json.loads((out / path).read_text()) for name, path in FILES.items()}
    return doc


def test_same_seed_same_bytes_other_seed_other_bytes(world_dir, tmp_path):
    out, _ = world_dir
    write_synthetic_world(tmp_path / "again", seed=0, entities=ENTITIES)
    write_synthetic_world(tmp_path / "other", seed=1, entities=ENTITIES)
    first, again, other = _all_bytes(out), _all_bytes(tmp_path / "again"), _all_bytes(tmp_path / "other")
    assert len(first) == len(FILES) + len(TEXT_FILES) + 1 + ENTITIES * VIEWS_PER_ENTITY
    assert first == again
    for path in [*FILES.values(), *TEXT_FILES.values(), "world.json"]:
        assert first[path] != other[path], path
    assert set(first) != set(other)  # image folders are named after the (seeded) entities


def test_every_file_has_the_public_fields_and_the_planned_size(world_dir, world):
    out, summary = world_dir
    sizes = planned_sizes(ENTITIES)
    assert summary.records == {FILES[name]: sizes[name] for name in FILES} | {
        TEXT_FILES["text_train"]: 21,
        TEXT_FILES["text_eval"]: 7,
    }
    assert summary.images == sizes["images"] == len(list((out / "images").rglob("*.png")))
    for name, records in world["files_read"].items():
        assert len(records) == sizes[name], name
        for record in records:
            assert all(isinstance(record[f], str) and record[f] for f in RECORD_FIELDS), record
            assert ("port_new" in record) == (name in ("vlkeb_multihop", "vlkeb_onehop"))
            for field in IMAGE_FIELDS:
                assert (out / "images" / record[field]).is_file()
    view = Image.open(out / "images" / world["entities"][0]["views"][0]["path"])
    assert view.format == "PNG" and view.mode == "RGB" and view.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert not {"date", "time", "Software", "Creation Time"} & set(view.info)


def test_train_and_eval_edits_are_about_disjoint_entities(world):
    split_of = {e["name"]: e["split"] for e in world["entities"]}
    for name, records in world["files_read"].items():
        wanted = "train" if name.endswith("train") else "eval"
        for record in records:
            assert split_of[world["by_view"][record["image"]]["name"]] == wanted
            assert split_of[world["by_view"][record["m_loc"]]["name"]] == wanted
    # Held-out entities still state their pre-edit facts somewhere, so a base model can learn them all.
    for kind, field in (("vqa", "city"), ("caption", "caption")):
        told = {
            (world["by_view"][r["image"]]["name"], r["pred"])
            for name, rs in world["files_read"].items()
            if name.startswith(kind)
            for r in rs
        }
        assert told == {(e["name"], e[field]) for e in world["entities"]}


def test_views_and_locality_images_belong_to_the_right_entities(world_dir, world):
    out, _ = world_dir
    for records in world["files_read"].values():
        for record in records:
            entity = world["by_view"][record["image"]]
            assert record["image_rephrase"] != record["image"]
            assert world["by_view"][record["image_rephrase"]] is entity
            assert world["by_view"][record["m_loc"]] is not entity
    record = world["files_read"]["vqa_train"][0]
    pixels = [Image.open(out / "images" / record[f]).tobytes() for f in ("image", "image_rephrase")]
    assert pixels[0] != pixels[1]


def test_answers_agree_with_the_world(world):
    geo = world["geography"]
    facts = {**geo["cities"], **geo["countries"], **geo["continents"], **geo["oceans"]}
    kinds = {q: k for k, qs in ENTITY_QUESTIONS.items() for q in ([qs] if isinstance(qs, str) else qs)}
    seen_kinds = set()
    for name, records in world["files_read"].items():
        for record in records:
            entity = world["by_view"][record["image"]]
            if name.startswith("caption"):
                assert record["pred"] == entity["caption"]
                changed = [a != b for a, b in zip(record["pred"].split(), record["alt"].split())]
                assert len(record["alt"].split()) == 4 and sum(changed) == 1
            else:
                assert (
                    record["pred"] == entity["city"]
                    and record["alt"] in geo["cities"]
                    and record["alt"] != record["pred"]
                )
                assert record["src"] in WHERE_QUESTIONS and record["rephrase"] in WHERE_QUESTIONS
            assert record["src"] != record["rephrase"]
            subject = [word.rstrip("?") for word in record["loc"].split() if word.rstrip("?") in facts]
            assert len(subject) == 1 and facts[subject[0]] == record["loc_ans"]
            kind = kinds[record["m_loc_q"]]
            seen_kinds.add(kind)
            assert record["m_loc_a"] == world["by_view"][record["m_loc"]][kind]
    assert seen_kinds == set(ENTITY_QUESTIONS)


def test_multihop_portability_follows_the_chain_from_the_new_city(world):
    geo = world["geography"]

    def chain(city):
        country = geo["cities"][city]
        continent = geo["countries"][country]
        ocean = geo["continents"][continent]
        return [country, continent, ocean, geo["oceans"][ocean]]

    multihop, plain = world["files_read"]["vlkeb_multihop"], world["files_read"]["vlkeb_eval"]
    assert [{k: v for k, v in r.items() if k != "port_new"} for r in multihop] == plain
    for record in multihop:
        assert [p["port_type"] for p in record["port_new"]] == list(HOP_QUESTIONS)
        assert [p["Q&A"]["Question"] for p in record["port_new"]] == list(HOP_QUESTIONS.values())
        answers = [p["Q&A"]["Answer"] for p in record["port_new"]]
        assert answers == chain(record["alt"])
        # Eval edits cross continents, so no hop can be answered right without the edit.
        assert all(new != old for new, old in zip(answers, chain(record["pred"])))


def test_one_hop_edits_move_the_new_citys_country_and_ask_the_1_hop_question(world):
    cities = world["geography"]["cities"]
    onehop, plain = world["files_read"]["vlkeb_onehop"], world["files_read"]["vlkeb_eval"]
    assert [{k: v for k, v in r.items() if k != "port_new"} for r in onehop] == plain
    for record in onehop:
        [item] = record["port_new"]
        assert item["port_q"] == HOP_QUESTIONS["1-hop"] and item["port_a"] == item["port_edit_a"]
        assert record["alt"] in item["port_edit_q"] and item["port_edit_q"].split()[0] in ("Which", "In")
        # Neither the world's answer nor the main edit alone gives the new country.
        assert item["port_a"] != cities[record["alt"]]


def test_kedit_validate_accepts_every_file(world_dir, capsys):
    out, _ = world_dir
    for path in FILES.values():
        assert main(["validate", "--data", str(out / path), "--images", str(out / "images")]) == 0, (
            capsys.readouterr().out
        )


def test_looks_are_unique_and_drawn_in_their_colour(world_dir):
    out, _ = world_dir
    world = build_world(0, ENTITIES)
    assert len({(e.shape, e.colour, e.pattern) for e in world.entities}) == ENTITIES
    assert len({e.name for e in world.entities}) == ENTITIES
    for entity in world.entities:
        target = COLOURS[entity.colour]
        pixels = np.asarray(Image.open(out / "images" / entity.views[0].path).convert("RGB")).reshape(-1, 3).tolist()
        close = sum(all(abs(a - b) < 40 for a, b in zip(p, target)) for p in pixels)
        assert close > 0.05 * len(pixels), entity


def test_cli_writes_the_world_and_reports_it(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "w"), "--seed", "3", "--entities", "5"]) == 0
    line = capsys.readouterr().out.strip()
    assert "5 entities" in line and "vqa/vqa_train.json" in line and line.count("\n") == 0
    assert json.loads((tmp_path / "w" / "world.json").read_text())["seed"] == 3
    # Writing again over a previous world replaces it; a foreign non-empty folder is refused.
    assert main(["synth", "--out", str(tmp_path / "w"), "--entities", "4"]) == 0
    assert len(list((tmp_path / "w" / "images").iterdir())) == 4
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["synth", "--out", str(tmp_path / "mine")]) == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["synth", "--out", str(tmp_path / "x"), "--entities", "2"]) == 2
    assert "between 4 and 256" in capsys.readouterr().err


def test_default_size_is_quick(tmp_path):
    summary = write_synthetic_world(tmp_path / "default")
    assert summary.seconds < 30
    assert 1000 <= sum(n for path, n in summary.records.items() if "train" in path) <= 3000


def test_text_edits_change_geography_facts_with_locality_about_other_subjects(world_dir, world):
    out, _ = world_dir
    geography = world["geography"]
    known = {**geography["cities"], **geography["countries"], **geography["continents"]}
    subjects = {}
    for name, path in TEXT_FILES.items():
        records = read_text_records(out / path)
        subjects[name] = set()
        for r in records:
            (subject,) = [word for word in r.src.rstrip("?").split() if word in known]
            subjects[name].add(subject)
            assert r.pred == known[subject] != r.alt, r
            assert subject in r.rephrase and subject not in r.loc, r
    assert not subjects["text_train"] & subjects["text_eval"]  # held-out subjects
