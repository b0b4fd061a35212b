"""The record schema: public layouts round-trip, and every kind of bad input is named precisely.

`make_record` and `write_split` are also used by test_validate.py and test_datamodules.py.
"""

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from data_modules.records import (
    DataError,
    EditRecord,
    PortQuestion,
    Problem,
    SkippedRecordsWarning,
    check_images,
    read_records,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}


def make_record(i: int, **fields) -> dict:
    """A public-layout E-VQA record about image `img/{i}.png` (colours cycle with i)."""
    names = list(COLOURS)
    record = {
        "src": "what colour is it ?",
        "pred": names[i % 4],
        "alt": names[(i + 1) % 4],
        "rephrase": "which colour is shown ?",
        "image": f"img/{i}.png",
        "image_rephrase": f"img/{i}_view.png",
        "loc": "who wrote hamlet ?",
        "loc_ans": "shakespeare",
        "m_loc": f"img/other{i}.png",
        "m_loc_q": "what shape is it ?",
        "m_loc_a": "square",
    }
    record.update(fields)
    return record


def write_split(root: Path, name: str, records: list, size: int = 48) -> Path:
    """Write `records` as `root/name` and draw a PNG for every image path they name."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(json.dumps(records, indent=1))
    for n, record in enumerate(r for r in records if isinstance(r, dict)):
        for view, field in enumerate(("image", "image_rephrase", "m_loc")):
            if not isinstance(record.get(field), str) or not record[field]:
                continue
            image_path = root / "images" / record[field]
            image_path.parent.mkdir(parents=True, exist_ok=True)
            colour = list(COLOURS.values())[(n + view) % len(COLOURS)]
            image = Image.new("RGB", (size, size), (250, 250, 250))
            ImageDraw.Draw(image).rectangle([4 + 6 * view, 6, size - 8, size - 4 - 6 * view], fill=colour)
            image.save(image_path)
    return path


MULTIHOP_PORT = [
    {"port_type": "1-hop", "Q&A": {"Question": "where does it live ?", "Answer": "sea"}},
    {"port_type": "2-hop", "Q&A": {"Question": "what colour is the sea ?", "Answer": "blue"}},
]
ONEHOP_EDIT_PORT = [
    {"port_q": "where does it live ?", "port_a": "desert", "port_edit_q": "what does it eat ?", "port_edit_a": "sand"}
]


@pytest.mark.parametrize(
    "port", [None, MULTIHOP_PORT, ONEHOP_EDIT_PORT], ids=["e-vqa", "vlkeb-multihop", "vlkeb-onehop-edit"]
)
def test_public_layouts_round_trip(tmp_path, port):
    raw = [make_record(0), make_record(1)]
    if port is not None:
        raw[1]["port_new"] = port
    path = write_split(tmp_path, "data.json", raw)
    records = read_records(path)
    assert [r.to_dict() for r in records] == raw
    assert [EditRecord.from_dict(r.to_dict()) for r in records] == records


def test_port_forms_parse_to_port_questions():
    multihop = EditRecord.from_dict(make_record(0, port_new=MULTIHOP_PORT))
    assert multihop.port == (
        PortQuestion("1-hop", "where does it live ?", "sea"),
        PortQuestion("2-hop", "what colour is the sea ?", "blue"),
    )
    onehop = EditRecord.from_dict(make_record(0, port_new=ONEHOP_EDIT_PORT))
    assert onehop.port == (PortQuestion("1-hop", "where does it live ?", "desert", "what does it eat ?", "sand"),)
    typed = EditRecord.from_dict(make_record(0, port_new=[{"port_type": "2-hop", **ONEHOP_EDIT_PORT[0]}]))
    assert typed.port[0].hop == "2-hop"
    assert typed.to_dict()["port_new"][0]["port_type"] == "2-hop"


def test_unknown_fields_are_ignored():
    record = EditRecord.from_dict(make_record(3, textual_rephrase="x", id=17))
    assert record.to_dict() == make_record(3)


def problems_of(path) -> list[str]:
    with pytest.raises(DataError) as caught:
        read_records(path)
    return [str(p) for p in caught.value.problems]


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"src": "a",\n   oops}\n]')
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: invalid JSON at line 3, column 4")


def test_top_level_must_be_a_list(tmp_path):
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"records": [make_record(0)]}))
    assert problems_of(path) == [f"{path}: the top level is a JSON dict, expected a list of records"]


def test_missing_file_is_a_problem(tmp_path):
    assert problems_of(tmp_path / "nope.json") == [f"{tmp_path / 'nope.json'}: file not found"]


def test_every_record_problem_is_collected_with_file_record_and_field(tmp_path):
    missing = make_record(1)
    del missing["m_loc_q"]
    raw = [
        make_record(0),
        missing,
        "not a record",
        make_record(3, alt=7),
        make_record(4, loc_ans=" "),
        make_record(5, image=""),
        make_record(
            6,
            port_new=[
                {"port_type": "1-hop", "Q&A": {"Question": "q ?"}},
                {"question": "q"},
                {"port_type": "2-hop", "Q&A": {"Question": "q", "Answer": ""}},
            ],
        ),
        make_record(7, port_new={"port_type": "1-hop"}),
        make_record(8, port_new=[{**ONEHOP_EDIT_PORT[0], "port_edit_a": ""}]),
    ]
    path = write_split(tmp_path, "data.json", raw)
    f = str(path)
    problems = problems_of(path)
    assert problems[:6] == [
        f"{f}: record 1: field 'm_loc_q': missing field",
        f"{f}: record 2: expected an object, got str",
        f"{f}: record 3: field 'alt': expected a string, got int",
        f"{f}: record 4: field 'loc_ans': empty target",
        f"{f}: record 5: field 'image': empty image path",
        f"{f}: record 6: field 'port_new[0].Q&A.Answer': missing field",
    ]
    assert problems[6].startswith(f"{f}: record 6: field 'port_new[1]': neither a {{port_type, Q&A}} nor a {{port_q,")
    assert problems[7:] == [
        f"{f}: record 6: field 'port_new[2].Q&A.Answer': empty target",
        f"{f}: record 7: field 'port_new': expected a list, got dict",
        f"{f}: record 8: field 'port_new[0].port_edit_a': empty target",
    ]


def test_data_error_message_lists_the_first_ten():
    error = DataError([Problem("f.json", i, "alt", "empty target") for i in range(13)])
    lines = str(error).splitlines()
    assert lines[0] == "13 problem(s) in the data:"
    assert lines[1].strip() == "f.json: record 0: field 'alt': empty target"
    assert len(lines) == 12 and lines[-1].strip() == "... and 3 more"


def test_empty_alt_is_skipped_with_one_counted_warning_and_indices_are_kept(tmp_path):
    raw = [make_record(0), make_record(1, alt=""), make_record(2), make_record(3, alt="  ")]
    path = write_split(tmp_path, "data.json", raw)
    with pytest.warns(
        SkippedRecordsWarning, match=r"skipped 2 of 4 record\(s\) with an empty 'alt' \(records 1, 3\)"
    ) as caught:
        records = read_records(path)
    assert len(caught) == 1
    assert [r.origin.index for r in records] == [0, 2]


def test_check_images_names_missing_and_unreadable_images(tmp_path):
    path = write_split(tmp_path, "data.json", [make_record(0), make_record(1), make_record(2, m_loc="img/other0.png")])
    images = tmp_path / "images"
    (images / "img/1_view.png").unlink()
    (images / "img/other0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records = read_records(path)
    f = str(path)
    problems = [str(p) for p in check_images(records, images)]
    assert problems[0].startswith(
        f"{f}: record 0: field 'm_loc': unreadable image {images / 'img/other0.png'}: UnidentifiedImageError"
    )
    assert problems[1] == f"{f}: record 1: field 'image_rephrase': missing image {images / 'img/1_view.png'}"
    assert problems[2].startswith(f"{f}: record 2: field 'm_loc': unreadable image")
    assert len(problems) == 3
    # The cheap check only looks for the files.
    assert [str(p) for p in check_images(records, images, verify=False)] == [problems[1]]


def test_check_images_without_origin_uses_the_given_file_and_position(tmp_path):
    problem = check_images([EditRecord(**make_record(0))], tmp_path, "mem.json")[0]
    assert str(problem) == f"mem.json: record 0: field 'image': missing image {tmp_path / 'img/0.png'}"


def test_a_utf8_bom_is_accepted(tmp_path):
    path = write_split(tmp_path, "bom.json", [make_record(0)])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r.src for r in read_records(path)] == ["what colour is it ?"]


def test_an_empty_file_is_refused_in_one_line(tmp_path):
    path = write_split(tmp_path, "empty.json", [])
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}: no records (the file is an empty list)"
    path = write_split(tmp_path, "no_alt.json", [make_record(0, alt="")])
    with pytest.warns(SkippedRecordsWarning), pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}: no usable records (all 1 have an empty 'alt')"


def test_duplicate_keys_are_named_with_their_record(tmp_path):
    path = write_split(tmp_path, "data.json", [make_record(0), make_record(1, port_new=MULTIHOP_PORT)])
    text = path.read_text()
    text = text.replace('"src": "what colour is it ?"', '"src": "a", "src": "b"', 1)
    text = text.replace('"Answer": "sea"', '"Answer": "sea", "Answer": "lake"')
    path.write_text(text)
    assert problems_of(path) == [
        f"{path}: record 0: field 'src': duplicate key (JSON keeps only the last value)",
        f"{path}: record 1: field 'port_new[0].Q&A.Answer': duplicate key (JSON keeps only the last value)",
    ]


def test_blank_prompts_and_control_characters_are_refused(tmp_path):
    raw = [
        make_record(0, src="   "),
        make_record(1, rephrase="which\x00colour ?"),
        make_record(2, alt="re\u202eder"),
        make_record(3, port_new=[{"port_type": "1-hop", "Q&A": {"Question": " ", "Answer": "sea"}}]),
        make_record(4, loc="tabs\tand\nnewlines are fine"),
    ]
    path = write_split(tmp_path, "data.json", raw)
    assert problems_of(path) == [
        f"{path}: record 0: field 'src': empty or whitespace-only prompt",
        f"{path}: record 1: field 'rephrase': control character U+0000 (control character) at character 5",
        f"{path}: record 2: field 'alt': control character U+202E (RIGHT-TO-LEFT OVERRIDE) at character 2",
        f"{path}: record 3: field 'port_new[0].Q&A.Question': empty or whitespace-only prompt",
    ]


def test_deeply_nested_json_is_one_problem(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert problems_of(path) == [f"{path}: JSON nested too deeply to read"]


def test_image_paths_must_stay_inside_the_image_roots(tmp_path):
    outside = tmp_path / "nuscenes"
    write_split(tmp_path / "elsewhere", "x.json", [make_record(9)])  # draws images under elsewhere/images
    outside.mkdir()
    (outside / "cam.png").write_bytes((tmp_path / "elsewhere/images/img/9.png").read_bytes())
    path = write_split(tmp_path, "data.json", [make_record(i) for i in range(3)])
    images = tmp_path / "images"
    (images / "img/link.png").symlink_to(outside / "cam.png")
    records = [
        EditRecord.from_dict(make_record(0, image="../nuscenes/cam.png"), str(path), 0),
        EditRecord.from_dict(make_record(1, image_rephrase=str(outside / "cam.png")), str(path), 1),
        EditRecord.from_dict(make_record(2, m_loc="img/link.png"), str(path), 2),
    ]
    problems = [str(p) for p in check_images(records, images)]
    target = (outside / "cam.png").resolve()
    assert problems == [
        f"{path}: record {i}: field '{name}': image path {str(images / given)!r} resolves to {target}, outside the "
        "image root (name its folder with extra_image_roots / --extra-image-root to allow it)"
        for i, name, given in [
            (0, "image", "../nuscenes/cam.png"),
            (1, "image_rephrase", outside / "cam.png"),
            (2, "m_loc", "img/link.png"),
        ]
    ]
    assert check_images(records, images, extra_roots=[outside]) == []


def test_images_above_the_pixel_limit_are_refused_from_the_header(tmp_path):
    path = write_split(tmp_path, "data.json", [make_record(0)], size=100)
    records = read_records(path)
    problems = [str(p) for p in check_images(records, tmp_path / "images", max_pixels=9_999)]
    assert problems[0] == (
        f"{path}: record 0: field 'image': image {tmp_path / 'images/img/0.png'} is 100x100 = 10000 pixels, "
        "more than the limit of 9999"
    )
    assert len(problems) == 3
    assert check_images(records, tmp_path / "images", max_pixels=10_000) == []
