"""`kedit synth`: a small made-up world, written in the public E-VQA, E-IC and VLKEB layouts.

Everything is invented, so no pretrained model already knows it: a tiny model must learn the facts from
the records, and an editor must then change them (README.md, "The synthetic world", says what it holds).
Output under DIR: images/<name>/view<k>.png, vqa/vqa_{train,eval}.json, caption/caption_{train,eval}_edit.json,
vlkeb/{train,eval,eval_multihop,eval_edit_onehop}.json (only the last two carry `port_new`, as in VLKEB),
text/text_{train,eval}.json (text-only edits of the geography facts, zsRE layout) and world.json (the facts,
templates and the vocabulary). The same seed gives byte-identical files: every random choice comes from a
`random.Random` seeded by (seed, purpose), JSON is written with sorted keys, and PNGs carry no metadata.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from PIL import Image, ImageDraw, ImageFilter

from data_modules.ads_synth import write_ads_set

FORMAT = "kedit-synthetic-world/1"
DEFAULT_ENTITIES = 64
MIN_ENTITIES = 4
EVAL_FRACTION = 0.25
VIEWS_PER_ENTITY = 6
IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and box-downsample: smooth edges, no resampling artefacts
CANVAS = IMAGE_SIZE * SUPERSAMPLE
OBJECT_RADIUS = 0.40  # of the canvas; every shape fits this circle, so rotation never clips it
OUTLINE = 6  # canvas pixels (1.5 px in the PNG): keeps light objects apart from light backgrounds
SCALE_RANGE = (0.72, 1.0)
MAX_ANGLE = 15.0  # degrees; small enough that a square never looks like the diamond
EVAL_CITY_EDITS = 6  # per eval entity, all on other continents
EVAL_CAPTION_EDITS_PER_ATTRIBUTE = 2
TEXT_NEIGHBORS = 2  # near neighbours per text edit
# Tokenizers' `Whitespace` pre-tokenizer splits text the same way: words and punctuation runs.
WORD_PATTERN = r"\w+|[^\w\s]+"

CITIES = (
    "Velor",
    "Marun",
    "Tessik",
    "Brivo",
    "Calder",
    "Dovin",
    "Elsk",
    "Fennor",
    "Gorran",
    "Hessa",
    "Ilvar",
    "Jorren",
    "Kavik",
    "Lissen",
    "Myra",
    "Norwin",
)
COUNTRIES = ("Zandia", "Morvel", "Kestra", "Lunor", "Pellia", "Ostara", "Vireth", "Galdun")
CONTINENTS = ("Arvenia", "Borelis", "Caldora", "Dunmar")
OCEANS = ("Thalmar", "Velmora", "Serith", "Quorra")
CREATURES = ("kraken", "serpent", "dragon", "turtle")

COLOURS = {
    "red": (220, 30, 30),
    "pink": (245, 110, 185),
    "yellow": (250, 215, 30),
    "green": (30, 160, 50),
    "cyan": (30, 200, 220),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
    "black": (25, 25, 25),
}
LIGHT_COLOURS = frozenset({"pink", "yellow", "cyan"})  # patterned in black ink, the rest in white
OUTLINE_RGB = (30, 30, 30)
PATTERNS = ("solid", "striped", "dotted", "checkered")
STRIPE_PERIOD, DOT_SPACING, DOT_RADIUS, CHECKER_CELL = 48, 46, 11, 36  # canvas pixels
BACKGROUNDS = (
    (250, 240, 230),
    (230, 240, 250),
    (235, 250, 235),
    (250, 235, 245),
    (245, 245, 220),
    (240, 235, 250),
    (225, 245, 245),
    (240, 240, 240),
)


def _star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    corners = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        corners.append((radius * math.cos(angle), radius * math.sin(angle)))
    return tuple(corners)


# Each shape is a union of primitives in units of the object radius, centred on the origin:
# ("polygon", corners) or ("ellipse", (cx, cy, r)).
SHAPES: dict[str, tuple[tuple[str, Any], ...]] = {
    "circle": (("ellipse", (0.0, 0.0, 0.92)),),
    "square": (("polygon", ((-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72))),),
    "triangle": (("polygon", ((0.0, -1.0), (0.87, 0.55), (-0.87, 0.55))),),
    "diamond": (("polygon", ((0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0))),),
    "star": (("polygon", _star()),),
    "cross": (
        ("polygon", ((-0.3, -0.95), (0.3, -0.95), (0.3, 0.95), (-0.3, 0.95))),
        ("polygon", ((-0.95, -0.3), (0.95, -0.3), (0.95, 0.3), (-0.95, 0.3))),
    ),
    "heart": (
        ("ellipse", (-0.42, -0.35, 0.5)),
        ("ellipse", (0.42, -0.35, 0.5)),
        ("polygon", ((-0.9, -0.2), (0.9, -0.2), (0.0, 0.92))),
    ),
    "arrow": (
        ("polygon", ((-0.95, -0.3), (0.1, -0.3), (0.1, -0.75), (0.95, 0.0), (0.1, 0.75), (0.1, 0.3), (-0.95, 0.3))),
    ),
}

# The words of a caption ("a red striped circle") that an E-IC edit may change, and their values.
LOOK = {"colour": tuple(COLOURS), "pattern": PATTERNS, "shape": tuple(SHAPES)}
MAX_ENTITIES = len(COLOURS) * len(PATTERNS) * len(SHAPES)  # one unique look each

WHERE_QUESTIONS = (
    "Where is this object located?",
    "In which city is this object?",
    "Which city is this object in?",
    "Where can this object be found?",
)
CAPTION_PROMPTS = ("a photo of", "a picture of", "an image of", "a drawing of")
ENTITY_QUESTIONS = {
    "colour": "What colour is this object?",
    "shape": "What shape is this object?",
    "pattern": "What pattern does this object have?",
    "name": "What is the name of this object?",
    "city": WHERE_QUESTIONS,
}
FACT_QUESTIONS = {
    "country": ("Which country is {} in?", "In which country is the city of {}?"),
    "continent": ("Which continent is {} on?", "On which continent does {} lie?"),
    "ocean": ("Which ocean borders {}?", "What ocean lies beside {}?"),
    "creature": ("Which creature guards {}?", "What creature lives in {}?"),
}
HOP_QUESTIONS = {
    "1-hop": "Which country contains the city where this object is located?",
    "2-hop": "Which continent contains the country where this object is located?",
    "3-hop": "Which ocean borders the continent where this object is located?",
    "4-hop": "Which creature guards the ocean that borders the continent where this object is located?",
}

FILES = {
    "vqa_train": "vqa/vqa_train.json",
    "vqa_eval": "vqa/vqa_eval.json",
    "caption_train": "caption/caption_train_edit.json",
    "caption_eval": "caption/caption_eval_edit.json",
    "vlkeb_train": "vlkeb/train.json",
    "vlkeb_eval": "vlkeb/eval.json",
    "vlkeb_multihop": "vlkeb/eval_multihop.json",
    "vlkeb_onehop": "vlkeb/eval_edit_onehop.json",
}
TEXT_FILES = {"text_train": "text/text_train.json", "text_eval": "text/text_eval.json"}
"""Text-only edits of the geography facts, zsRE layout (data_modules/text_records.py)."""
WORLD_FILE = "world.json"
IMAGE_DIR = "images"

T = TypeVar("T")


@dataclass(frozen=True)
class Geography:
    """city -> country -> continent -> ocean -> creature; every map is total on its domain."""

    country_of: dict[str, str]
    continent_of: dict[str, str]
    ocean_of: dict[str, str]
    creature_of: dict[str, str]

    def chain(self, city: str) -> dict[str, str]:
        """The 1- to 4-hop answers for an object located in `city`."""
        country = self.country_of[city]
        continent = self.continent_of[country]
        ocean = self.ocean_of[continent]
        return {"1-hop": country, "2-hop": continent, "3-hop": ocean, "4-hop": self.creature_of[ocean]}

    def facts(self) -> list[tuple[str, str]]:
        """Every text-only (question, answer) pair: each relation in each of its phrasings."""
        relations = (
            ("country", self.country_of),
            ("continent", self.continent_of),
            ("ocean", self.ocean_of),
            ("creature", self.creature_of),
        )
        return [
            (template.format(subject), answer)
            for relation, mapping in relations
            for subject, answer in sorted(mapping.items())
            for template in FACT_QUESTIONS[relation]
        ]


@dataclass(frozen=True)
class View:
    """One picture of an entity: where it sits, how big, how turned, on which background."""

    path: str  # relative to the image root
    scale: float
    angle: float
    dx: int  # canvas pixels
    dy: int
    background: tuple[int, int, int]


@dataclass(frozen=True)
class Entity:
    name: str
    shape: str
    colour: str
    pattern: str
    city: str
    split: str  # "train" or "eval"
    views: tuple[View, ...]

    @property
    def caption(self) -> str:
        return caption_for(self.colour, self.pattern, self.shape)

    def answer(self, question_kind: str) -> str:
        """The true answer to an `ENTITY_QUESTIONS` kind: colour, shape, pattern, name or city."""
        return getattr(self, question_kind)


@dataclass(frozen=True)
class World:
    seed: int
    geography: Geography
    entities: tuple[Entity, ...]

    def split(self, name: str) -> tuple[Entity, ...]:
        return tuple(e for e in self.entities if e.split == name)


@dataclass(frozen=True)
class SynthSummary:
    """What `write_synthetic_world` wrote."""

    out: Path
    seed: int
    entities: int
    train_entities: int
    eval_entities: int
    images: int
    records: dict[str, int]  # file path relative to `out` -> number of records
    vocabulary: int
    seconds: float

    def line(self) -> str:
        files = ", ".join(f"{path} {count}" for path, count in self.records.items())
        return (
            f"synthetic world seed={self.seed}: {self.entities} entities ({self.train_entities} train, "
            f"{self.eval_entities} eval), {self.images} images, {self.vocabulary} words; records: {files}; "
            f"{self.seconds:.1f} s -> {self.out}"
        )


def caption_for(colour: str, pattern: str, shape: str) -> str:
    return f"a {colour} {pattern} {shape}"


def split_counts(entities: int) -> tuple[int, int]:
    """(train, eval) entity counts for `entities` entities."""
    _check_entity_count(entities)
    held_out = max(2, round(entities * EVAL_FRACTION))
    return entities - held_out, held_out


def planned_sizes(entities: int = DEFAULT_ENTITIES) -> dict[str, int]:
    """Records per file (keys of `FILES`) and "images", without generating anything."""
    train, held_out = split_counts(entities)
    city_train, city_eval = train * (len(CITIES) - 1), held_out * EVAL_CITY_EDITS
    caption_alternatives = sum(len(values) - 1 for values in LOOK.values())
    caption_eval = held_out * EVAL_CAPTION_EDITS_PER_ATTRIBUTE * len(LOOK)
    return {
        "vqa_train": city_train,
        "vqa_eval": city_eval,
        "caption_train": train * caption_alternatives,
        "caption_eval": caption_eval,
        "vlkeb_train": city_train,
        "vlkeb_eval": city_eval,
        "vlkeb_multihop": city_eval,
        "vlkeb_onehop": city_eval,
        "images": entities * VIEWS_PER_ENTITY,
    }


def _check_entity_count(entities: int) -> None:
    if not MIN_ENTITIES <= entities <= MAX_ENTITIES:
        raise ValueError(
            f"entities must be between {MIN_ENTITIES} and {MAX_ENTITIES} (one unique look each), got {entities}"
        )


def _rng(seed: int, purpose: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, identically on every run and platform.
    return random.Random(f"{FORMAT}:{seed}:{purpose}")


def _words(text: str) -> list[str]:
    return re.findall(WORD_PATTERN, text)


def _reserved_words() -> set[str]:
    texts = [
        *CITIES,
        *COUNTRIES,
        *CONTINENTS,
        *OCEANS,
        *CREATURES,
        *COLOURS,
        *PATTERNS,
        *SHAPES,
        *WHERE_QUESTIONS,
        *CAPTION_PROMPTS,
        *HOP_QUESTIONS.values(),
        *(q for q in ENTITY_QUESTIONS.values() if isinstance(q, str)),
        *(t for pair in FACT_QUESTIONS.values() for t in pair),
    ]
    return {w.lower() for text in texts for w in _words(text)}


def _make_names(count: int, rng: random.Random) -> list[str]:
    """`count` distinct pronounceable made-up words: consonant, vowel, consonant, vowel, coda.

    The codas are rare at the end of English words, so a name is very unlikely to be a real word.
    """
    onsets, vowels, codas = "bdfklmnprstvz", "aeiou", ("k", "x", "th", "z", "v", "sh")
    reserved, names = _reserved_words(), []
    while len(names) < count:
        name = rng.choice(onsets) + rng.choice(vowels) + rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
        if name not in reserved:
            reserved.add(name)
            names.append(name.capitalize())
    return names


def _make_geography(seed: int) -> Geography:
    rng = _rng(seed, "geography")

    def grouped(children: Sequence[str], parents: Sequence[str]) -> dict[str, str]:
        shuffled = list(children)
        rng.shuffle(shuffled)
        per_parent = len(children) // len(parents)
        return {child: parents[i // per_parent] for i, child in enumerate(shuffled)}

    return Geography(
        grouped(CITIES, COUNTRIES),
        grouped(COUNTRIES, CONTINENTS),
        grouped(CONTINENTS, OCEANS),
        grouped(OCEANS, CREATURES),
    )


def _make_views(name: str, rng: random.Random) -> tuple[View, ...]:
    views = []
    for k, background in enumerate(rng.sample(BACKGROUNDS, VIEWS_PER_ENTITY)):
        scale = round(rng.uniform(*SCALE_RANGE), 3)
        # Keep the object (radius + outline) inside the canvas wherever it is moved.
        reach = int(CANVAS / 2 - (OBJECT_RADIUS * 1.05 * scale * CANVAS + OUTLINE) - 2)
        views.append(
            View(
                path=f"{name.lower()}/view{k}.png",
                scale=scale,
                angle=round(rng.uniform(-MAX_ANGLE, MAX_ANGLE), 1),
                dx=rng.randint(-reach, reach),
                dy=rng.randint(-reach, reach),
                background=background,
            )
        )
    return tuple(views)


def build_world(seed: int = 0, entities: int = DEFAULT_ENTITIES) -> World:
    """The facts and picture plans of the world for `seed`; pure, writes nothing."""
    _, held_out = split_counts(entities)
    rng = _rng(seed, "entities")
    looks = rng.sample(list(itertools.product(SHAPES, COLOURS, PATTERNS)), entities)
    names = _make_names(entities, rng)
    homes = [CITIES[i % len(CITIES)] for i in range(entities)]
    rng.shuffle(homes)
    eval_names = set(rng.sample(names, held_out))
    made = [
        Entity(
            name=name,
            shape=shape,
            colour=colour,
            pattern=pattern,
            city=home,
            split="eval" if name in eval_names else "train",
            views=_make_views(name, rng),
        )
        for name, (shape, colour, pattern), home in zip(names, looks, homes)
    ]
    return World(seed, _make_geography(seed), tuple(sorted(made, key=lambda e: e.name)))


def _shape_mask(shape: str) -> Image.Image:
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    centre, radius = CANVAS / 2, OBJECT_RADIUS * CANVAS
    for kind, spec in SHAPES[shape]:
        if kind == "ellipse":
            x, y, r = spec
            draw.ellipse(
                [
                    centre + (x - r) * radius,
                    centre + (y - r) * radius,
                    centre + (x + r) * radius,
                    centre + (y + r) * radius,
                ],
                fill=255,
            )
        else:
            draw.polygon([(centre + x * radius, centre + y * radius) for x, y in spec], fill=255)
    return mask


def _pattern_mask(pattern: str) -> Image.Image:
    """Where the pattern's ink goes, anchored on the canvas centre so every view shows the same pattern."""
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    centre = CANVAS // 2
    if pattern == "striped":
        for top in range(centre - 4 * STRIPE_PERIOD + STRIPE_PERIOD // 4, CANVAS, STRIPE_PERIOD):
            draw.rectangle([0, top, CANVAS, top + STRIPE_PERIOD // 2 - 1], fill=255)
    elif pattern == "dotted":
        for row in range(-4, 5):
            shift = DOT_SPACING // 2 if row % 2 else 0
            for column in range(-4, 5):
                x, y = centre + column * DOT_SPACING + shift, centre + row * DOT_SPACING
                draw.ellipse([x - DOT_RADIUS, y - DOT_RADIUS, x + DOT_RADIUS, y + DOT_RADIUS], fill=255)
    elif pattern == "checkered":
        for row in range(-4, 4):
            for column in range(-4, 4):
                if (row + column) % 2 == 0:
                    left, top = centre + column * CHECKER_CELL, centre + row * CHECKER_CELL
                    draw.rectangle([left, top, left + CHECKER_CELL - 1, top + CHECKER_CELL - 1], fill=255)
    return mask


def _object_layer(entity: Entity) -> Image.Image:
    """The entity on a transparent canvas, upright and full size (premultiplied RGBa for clean resampling)."""
    shape = _shape_mask(entity.shape)
    body = Image.new("RGB", (CANVAS, CANVAS), COLOURS[entity.colour])
    ink = (20, 20, 20) if entity.colour in LIGHT_COLOURS else (255, 255, 255)
    body.paste(ink, mask=_pattern_mask(entity.pattern))
    outline = shape
    for _ in range(OUTLINE):
        outline = outline.filter(ImageFilter.MaxFilter(3))
    layer = Image.new("RGBA", (CANVAS, CANVAS), OUTLINE_RGB + (0,))
    layer.putalpha(outline)
    layer.paste(body, mask=shape)
    return layer.convert("RGBa")


def _draw_view(layer: Image.Image, view: View) -> Image.Image:
    """One `IMAGE_SIZE` RGB picture of an object layer (from `_object_layer`) as `view` places it."""
    size = round(CANVAS * view.scale)
    placed = (
        layer.resize((size, size), Image.Resampling.BICUBIC)
        .rotate(view.angle, Image.Resampling.BICUBIC)
        .convert("RGBA")
    )
    canvas = Image.new("RGB", (CANVAS, CANVAS), view.background)
    corner = ((CANVAS - size) // 2 + view.dx, (CANVAS - size) // 2 + view.dy)
    canvas.paste(placed.convert("RGB"), corner, placed.getchannel("A"))
    return canvas.reduce(SUPERSAMPLE)


class _Deal(Generic[T]):
    """Hands out items in freshly shuffled rounds, so every item is used before any repeats."""

    def __init__(self, items: Sequence[T], rng: random.Random) -> None:
        self.items, self.rng, self.pending = list(items), rng, []

    def _refill(self) -> None:
        round_ = list(self.items)
        self.rng.shuffle(round_)
        self.pending.extend(round_)

    def next(self, allowed: Callable[[T], bool] = lambda item: True) -> T:
        for _ in range(2):
            for i, item in enumerate(self.pending):
                if allowed(item):
                    return self.pending.pop(i)
            self._refill()
        raise ValueError("no allowed item to deal")


@dataclass(frozen=True)
class _Edit:
    entity: Entity
    pred: str
    alt: str


def _city_edits(world: World, split: str, rng: random.Random) -> list[_Edit]:
    edits = []
    for entity in world.split(split):
        if split == "train":
            alts = [c for c in CITIES if c != entity.city]
        else:
            home_continent = world.geography.chain(entity.city)["2-hop"]
            far = [c for c in CITIES if world.geography.chain(c)["2-hop"] != home_continent]
            alts = rng.sample(far, EVAL_CITY_EDITS)
        edits += [_Edit(entity, entity.city, alt) for alt in alts]
    return edits


def _caption_edits(world: World, split: str, rng: random.Random) -> list[_Edit]:
    edits = []
    for entity in world.split(split):
        looks = []
        for attribute, values in LOOK.items():
            others = [v for v in values if v != getattr(entity, attribute)]
            if split == "eval":
                others = rng.sample(others, EVAL_CAPTION_EDITS_PER_ATTRIBUTE)
            looks += [
                {"colour": entity.colour, "pattern": entity.pattern, "shape": entity.shape, attribute: v}
                for v in others
            ]
        edits += [_Edit(entity, entity.caption, caption_for(**look)) for look in looks]
    return edits


def _records(
    world: World, split: str, edits: list[_Edit], prompts: Sequence[str], rng: random.Random, multihop: bool
) -> list[dict[str, Any]]:
    """Public-layout records for `edits`, in a shuffled order, with locality dealt round-robin."""
    edits = list(edits)
    rng.shuffle(edits)
    facts = _Deal(world.geography.facts(), rng)
    probes = _Deal([(e, kind) for e in world.split(split) for kind in ENTITY_QUESTIONS], rng)
    records = []
    for edit in edits:
        src, rephrase = rng.sample(list(prompts), 2)
        image, image_rephrase = rng.sample(edit.entity.views, 2)
        loc, loc_ans = facts.next()
        other, kind = probes.next(lambda probe, entity=edit.entity: probe[0] is not entity)
        question = ENTITY_QUESTIONS[kind]
        record = {
            "src": src,
            "rephrase": rephrase,
            "pred": edit.pred,
            "alt": edit.alt,
            "image": image.path,
            "image_rephrase": image_rephrase.path,
            "loc": loc,
            "loc_ans": loc_ans,
            "m_loc": rng.choice(other.views).path,
            "m_loc_q": rng.choice(question) if isinstance(question, tuple) else question,
            "m_loc_a": other.answer(kind),
            "subject": edit.entity.name,
        }
        if multihop:
            chain = world.geography.chain(edit.alt)
            record["port_new"] = [
                {"port_type": hop, "Q&A": {"Question": HOP_QUESTIONS[hop], "Answer": chain[hop]}}
                for hop in HOP_QUESTIONS
            ]
        records.append(record)
    return records


def _one_hop_edits(world: World, records: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """`records` with VLKEB's one-hop edit: the new city's country becomes another, and the
    1-hop question follows it."""
    countries = sorted(set(world.geography.country_of.values()))
    out = []
    for record in records:
        city = record["alt"]
        country = rng.choice([c for c in countries if c != world.geography.country_of[city]])
        item = {
            "port_q": HOP_QUESTIONS["1-hop"],
            "port_a": country,
            "port_edit_q": rng.choice(FACT_QUESTIONS["country"]).format(city),
            "port_edit_a": country,
        }
        out.append({**record, "port_new": [item]})
    return out


def build_records(world: World) -> dict[str, list[dict[str, Any]]]:
    """Every data file's records (keys of `FILES`), deterministic in the world's seed."""
    seed = world.seed
    out: dict[str, list[dict[str, Any]]] = {}
    for split in ("train", "eval"):
        city_edits = _city_edits(world, split, _rng(seed, f"city-edits/{split}"))
        out[f"vqa_{split}"] = _records(
            world, split, city_edits, WHERE_QUESTIONS, _rng(seed, f"vqa/{split}"), multihop=False
        )
        out[f"vlkeb_{split}"] = _records(
            world, split, city_edits, WHERE_QUESTIONS, _rng(seed, f"vlkeb/{split}"), multihop=split == "eval"
        )
        caption_edits = _caption_edits(world, split, _rng(seed, f"caption-edits/{split}"))
        out[f"caption_{split}"] = _records(
            world, split, caption_edits, CAPTION_PROMPTS, _rng(seed, f"caption/{split}"), multihop=False
        )
    # As in VLKEB, eval_multihop.json holds the eval edits with their portability questions and
    # eval.json the same edits without.
    out["vlkeb_multihop"] = out["vlkeb_eval"]
    out["vlkeb_eval"] = [{k: v for k, v in r.items() if k != "port_new"} for r in out["vlkeb_multihop"]]
    out["vlkeb_onehop"] = _one_hop_edits(world, out["vlkeb_eval"], _rng(seed, "vlkeb/onehop"))
    return {name: out[name] for name in FILES}


def build_text_records(world: World) -> dict[str, list[dict[str, Any]]]:
    """zsRE-style text edits (keys of `TEXT_FILES`): each geography subject's fact changed to another
    object of its relation, asked in its two phrasings, with another subject's fact as locality and
    `TEXT_NEIGHBORS` near neighbours (the same relation about other subjects, with their answers). One
    subject in four is held out for eval."""
    g = world.geography
    rng = _rng(world.seed, "text")
    neighbor_rng = _rng(world.seed, "text/neighbors")  # its own stream: the other fields stay as they were
    relations = (("country", g.country_of), ("continent", g.continent_of), ("ocean", g.ocean_of))
    facts = _Deal(g.facts(), rng)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in TEXT_FILES}
    for relation, mapping in relations:
        objects = sorted(set(mapping.values()))
        for position, (subject, answer) in enumerate(sorted(mapping.items())):
            src, rephrase = (template.format(subject) for template in FACT_QUESTIONS[relation])
            loc, loc_ans = facts.next(lambda fact, subject=subject: subject not in fact[0])
            alt = rng.choice([o for o in objects if o != answer])
            others = neighbor_rng.sample([o for o in sorted(mapping) if o != subject], TEXT_NEIGHBORS)
            neighbors = [{"prompt": FACT_QUESTIONS[relation][0].format(o), "answer": mapping[o]} for o in others]
            record = {"src": src, "rephrase": rephrase, "pred": answer, "alt": alt, "loc": loc, "loc_ans": loc_ans}
            record["neighbors"] = neighbors
            out["text_eval" if position % 4 == 3 else "text_train"].append(record)
    return out


def vocabulary(records: Iterable[dict[str, Any]]) -> list[str]:
    """Sorted distinct words (split by `WORD_PATTERN`) of every text field of `records`."""
    words: set[str] = set()
    text_fields = ("src", "rephrase", "pred", "alt", "loc", "loc_ans", "m_loc_q", "m_loc_a")
    for record in records:
        texts = [record[f] for f in text_fields]
        texts += [text for item in record.get("neighbors", []) for text in item.values()]
        for item in record.get("port_new", []):
            texts += list(item["Q&A"].values()) if "Q&A" in item else list(item.values())
        for text in texts:
            words.update(_words(text))
    return sorted(words)


def _world_document(world: World, sizes: dict[str, int], words: list[str]) -> dict[str, Any]:
    g = world.geography
    return {
        "format": FORMAT,
        "seed": world.seed,
        "image_size": IMAGE_SIZE,
        "geography": {
            "cities": g.country_of,
            "countries": g.continent_of,
            "continents": g.ocean_of,
            "oceans": g.creature_of,
        },
        "entities": [
            {
                "name": e.name,
                "shape": e.shape,
                "colour": e.colour,
                "pattern": e.pattern,
                "city": e.city,
                "caption": e.caption,
                "split": e.split,
                "views": [
                    {
                        "path": v.path,
                        "scale": v.scale,
                        "angle": v.angle,
                        "dx": v.dx,
                        "dy": v.dy,
                        "background": list(v.background),
                    }
                    for v in e.views
                ],
            }
            for e in world.entities
        ],
        "templates": {
            "where": list(WHERE_QUESTIONS),
            "caption": list(CAPTION_PROMPTS),
            "entity": {k: list(v) if isinstance(v, tuple) else v for k, v in ENTITY_QUESTIONS.items()},
            "facts": {k: list(v) for k, v in FACT_QUESTIONS.items()},
            "hops": HOP_QUESTIONS,
        },
        "files": {FILES[name]: count for name, count in sizes.items()},
        "word_pattern": WORD_PATTERN,
        "vocabulary": words,
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8", newline="\n"
    )


def _prepare(out: Path) -> None:
    """Make `out` ready: new, empty, or a previous synthetic world (whose images are replaced)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / WORLD_FILE).is_file():
            raise FileExistsError(
                f"{out} is not empty and holds no {WORLD_FILE}; refusing to write a synthetic world into it"
            )
        # A previous world: its image folders are named after entities, so stale ones must go.
        shutil.rmtree(out / IMAGE_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def write_synthetic_world(out: str | Path, seed: int = 0, entities: int = DEFAULT_ENTITIES) -> SynthSummary:
    """Write the world for `seed` under `out` (see the module doc for the layout) and say what was written."""
    start = time.perf_counter()
    out = Path(out)
    world = build_world(seed, entities)
    _prepare(out)
    for entity in world.entities:
        layer = _object_layer(entity)
        for view in entity.views:
            path = out / IMAGE_DIR / view.path
            path.parent.mkdir(parents=True, exist_ok=True)
            # No metadata chunks and a fixed compression level: the bytes depend on the pixels only.
            _draw_view(layer, view).save(path, format="PNG", compress_level=6)
    records = build_records(world)
    for name, rows in records.items():
        _write_json(out / FILES[name], rows)
    sizes = {name: len(rows) for name, rows in records.items()}
    words = vocabulary(r for rows in records.values() for r in rows)
    _write_json(out / WORLD_FILE, _world_document(world, sizes, words))
    text_records = build_text_records(world)  # their words are the facts', already in the vocabulary
    for name, rows in text_records.items():
        _write_json(out / TEXT_FILES[name], rows)
    train, held_out = len(world.split("train")), len(world.split("eval"))
    return SynthSummary(
        out=out,
        seed=seed,
        entities=entities,
        train_entities=train,
        eval_entities=held_out,
        images=entities * VIEWS_PER_ENTITY,
        records={FILES[n]: c for n, c in sizes.items()} | {TEXT_FILES[n]: len(r) for n, r in text_records.items()},
        vocabulary=len(words),
        seconds=time.perf_counter() - start,
    )


def _entity_count(text: str) -> int:
    try:
        count = int(text)
        _check_entity_count(count)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sizes = planned_sizes(DEFAULT_ENTITIES)
    train, held_out = split_counts(DEFAULT_ENTITIES)
    parser.epilog = (
        f"Default size ({DEFAULT_ENTITIES} entities: {train} train, {held_out} eval): {sizes['images']} PNGs of "
        f"{IMAGE_SIZE} px; records: vqa {sizes['vqa_train']}/{sizes['vqa_eval']}, caption "
        f"{sizes['caption_train']}/{sizes['caption_eval']}, vlkeb {sizes['vlkeb_train']}/{sizes['vlkeb_eval']}/"
        f"{sizes['vlkeb_multihop']}/{sizes['vlkeb_onehop']} (train/eval[/eval_multihop/eval_edit_onehop]). "
        "Sizes scale with --entities."
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output folder (new, empty, or a previous synthetic world)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="world seed; the same seed writes the same bytes (default 0)"
    )
    parser.add_argument(
        "--entities",
        type=_entity_count,
        default=DEFAULT_ENTITIES,
        metavar="N",
        help=f"number of entities, {MIN_ENTITIES} to {MAX_ENTITIES} (default {DEFAULT_ENTITIES})",
    )
    parser.add_argument(
        "--ads",
        action="store_true",
        help="write instead a small ADS-Edit-shaped set under OUT/ads (video, multi-view and single-image records)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.ads:
            written = write_ads_set(args.out, seed=args.seed)
            print(f"{args.out}: " + ", ".join(f"{name} ({n} records)" for name, n in written.items()))
            return 0
        summary = write_synthetic_world(args.out, seed=args.seed, entities=args.entities)
    except (FileExistsError, NotADirectoryError) as err:
        print(f"kedit synth: {err}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0
