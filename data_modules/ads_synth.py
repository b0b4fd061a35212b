"""`kedit synth --ads`: a small ADS-Edit-shaped set drawn with Pillow, so ADS code runs offline.

Written under `OUT/ads/`: `train.json` and `test.json` in the ADS-Edit layout, with every `image_type`:
"video" records name frame lists (`images/<split>/<scene>/<k>.png`), "multi-image" records six camera views
under `../nuscenes/samples/CAM_*/` (outside the image root `images/`, as in the public files: load them
with the extra image root `nuscenes/`), "single-image" records a CODA-LM annotation name (`test_0001.json`,
whose image is `images/test/images/0001.jpg`). Each scene shows an obstacle of one colour (moving across a
video's frames, in one camera of the views); the edit changes the answer to "what colour is the obstacle".
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from data_modules.ads_records import IMAGE_TYPES

ADS_DIR = "ads"
SIZE = 32
FRAMES = 4
CAMERAS = ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40)}
SCENARIOS = {"video": "Safe driving", "multi-image": "Obstacle recognition", "single-image": "Signboard understanding"}
SOURCES = {"video": "lingoqa", "multi-image": "drivelm", "single-image": "codalm"}
RECORDS_PER_TYPE = {"train": 4, "test": 2}
LOCALITY = (
    ("nq question: how many legs does a spider have", "eight"),
    ("nq question: what colour is the sky on a clear day", "blue"),
    ("nq question: how many days are in a week", "seven"),
)


def _scene(colour: str, x: int) -> Image.Image:
    """A road seen from the car, an obstacle of `colour` at column `x`."""
    image = Image.new("RGB", (SIZE, SIZE), (120, 170, 220))
    draw = ImageDraw.Draw(image)
    draw.polygon([(0, SIZE), (SIZE, SIZE), (SIZE * 5 // 8, SIZE // 2), (SIZE * 3 // 8, SIZE // 2)], fill=(90, 90, 90))
    draw.rectangle([x, SIZE // 2 + 4, x + 7, SIZE // 2 + 11], fill=COLOURS[colour])
    return image


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG", quality=90)


def _visual(root: Path, image_type: str, name: str, colour: str, rng: random.Random) -> Any:
    """Draw one visual input of `image_type` under `root` (the image root); its JSON value."""
    if image_type == "video":
        paths = [f"{name}/{k}.png" for k in range(FRAMES)]
        for k, path in enumerate(paths):
            _save(_scene(colour, 2 + k * 5), root / path)
        return paths
    if image_type == "multi-image":
        seen_by = rng.choice(CAMERAS)
        views = {}
        for camera in CAMERAS:
            path = f"../nuscenes/samples/{camera}/{Path(name).name}__{camera}.png"
            scene = _scene(colour, 12) if camera == seen_by else _scene(colour, 12).crop((0, 0, SIZE, SIZE // 2))
            _save(scene.resize((SIZE, SIZE)), root / path)
            views[camera] = path
        return views
    split, number = name.split("/")
    _save(_scene(colour, 12), root / f"{split}/images/{number}.jpg")
    return f"{split}_{number}.json"


def build_ads_records(out: Path, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Draw the scenes under `out/images` (and `out/nuscenes`) and return the records per split."""
    rng = random.Random(f"ads/{seed}")
    root = out / "images"
    records: dict[str, list[dict[str, Any]]] = {}
    number = 0
    for split, count in RECORDS_PER_TYPE.items():
        rows = []
        for image_type in IMAGE_TYPES:
            for _ in range(count):
                number += 1
                before, after, other = rng.sample(sorted(COLOURS), 3)
                name = f"test/{number:04d}" if image_type == "single-image" else f"{split}/scene{number:04d}"
                image = _visual(root, image_type, name, before, rng)
                rephrase_name = f"test/{number + 500:04d}" if image_type == "single-image" else f"{name}r"
                image_rephrase = _visual(root, image_type, rephrase_name, other, rng)
                loc, loc_ans = rng.choice(LOCALITY)
                coco = f"val2014/COCO_val2014_{number:012d}.png"
                _save(_scene(other, 20), root / coco)
                rows.append(
                    {
                        "data_type": SCENARIOS[image_type],
                        "image_type": image_type,
                        "source": SOURCES[image_type],
                        "src": "what colour is the obstacle ?",
                        "rephrase": "which colour does the obstacle ahead have ?",
                        "alt": after,
                        "image": image,
                        "image_rephrase": image_rephrase,
                        "original_gr": before,
                        "rephrase_images_original_gr": other,
                        "loc": loc,
                        "loc_ans": loc_ans,
                        "m_loc": coco,
                        "m_loc_q": "what colour is the box ?",
                        "m_loc_a": other,
                    }
                )
        records[split] = rows
    return records


def write_ads_set(out: str | Path, seed: int = 0) -> dict[str, int]:
    """Write the set under `out/ads` (see the module doc); records per file written."""
    folder = Path(out) / ADS_DIR
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "train.json").is_file():
        raise FileExistsError(f"{folder} is not empty and holds no train.json; refusing to write an ADS set into it")
    records = build_ads_records(folder, seed)
    for split, rows in records.items():
        (folder / f"{split}.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {f"{ADS_DIR}/{split}.json": len(rows) for split, rows in records.items()}
