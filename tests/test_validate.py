"""`kedit validate`: every problem printed with file, record and field; exit status 1 on any."""

import subprocess
import sys

from test_records import make_record, write_split

from kedit_lightning.cli import main


def test_clean_file_exits_zero(tmp_path, capsys):
    path = write_split(tmp_path, "vqa_train.json", [make_record(i) for i in range(3)])
    assert main(["validate", "--data", str(path), "--images", str(tmp_path / "images")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{path}: 3 record(s), 9 distinct image(s) checked: OK"]


def test_every_problem_is_listed_and_the_exit_status_is_one(tmp_path, capsys):
    missing_field = make_record(3)
    del missing_field["rephrase"]
    raw = [
        make_record(0),
        make_record(1, alt=""),
        make_record(2, pred=["blue"]),
        missing_field,
        make_record(4),
        make_record(5),
    ]
    path = write_split(tmp_path, "vqa_eval.json", raw)
    images = tmp_path / "images"
    (images / "img/4.png").unlink()
    (images / "img/other2.png").unlink()  # images of records that fail to parse are checked too
    truncated = (images / "img/5_view.png").read_bytes()
    (images / "img/5_view.png").write_bytes(truncated[: len(truncated) // 2])
    assert main(["validate", "--data", str(path), "--images", str(images)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    f = str(path)
    assert out[:5] == [
        f"{f}: record 1: field 'alt': empty target (training skips this record)",
        f"{f}: record 2: field 'pred': expected a string, got list",
        f"{f}: record 2: field 'm_loc': missing image {images / 'img/other2.png'}",
        f"{f}: record 3: field 'rephrase': missing field",
        f"{f}: record 4: field 'image': missing image {images / 'img/4.png'}",
    ]
    assert out[5].startswith(f"{f}: record 5: field 'image_rephrase': unreadable image {images / 'img/5_view.png'}")
    assert out[6] == f"{f}: 6 record(s), 18 distinct image(s) checked: 6 problem(s)"


def test_invalid_json_through_the_console_entry_point(tmp_path):
    path = tmp_path / "vqa_train.json"
    path.write_text('[{"src": "a"}\n{"src": "b"}]')
    done = subprocess.run(
        [sys.executable, "-m", "kedit_lightning.cli", "validate", "--data", str(path), "--images", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[0] == f"{path}: invalid JSON at line 2, column 1: Expecting ',' delimiter"


def test_a_missing_image_folder_is_one_line(tmp_path, capsys):
    path = write_split(tmp_path, "vqa_train.json", [make_record(i) for i in range(5)])
    assert main(["validate", "--data", str(path), "--images", str(tmp_path / "nope")]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"{tmp_path / 'nope'}: image folder not found",
        f"{path}: 5 record(s), 15 distinct image(s) checked: 1 problem(s)",
    ]


def test_an_empty_file_is_refused(tmp_path, capsys):
    path = write_split(tmp_path, "vqa_train.json", [])
    assert main(["validate", "--data", str(path), "--images", str(tmp_path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"{path}: no records (the file is an empty list)"


def test_paths_outside_the_images_need_an_extra_root_and_big_images_a_higher_limit(tmp_path, capsys):
    # ADS-Edit's multi-view files name `../nuscenes/...` next to the image root (write_split draws it there).
    path = write_split(tmp_path, "vqa_train.json", [make_record(0, image="../nuscenes/cam.png")])
    nuscenes = tmp_path / "nuscenes"
    args = ["validate", "--data", str(path), "--images", str(tmp_path / "images")]
    assert main(args) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{path}: record 0: field 'image': image path ")
    assert "outside the image root" in first
    assert main([*args, "--extra-image-root", str(nuscenes)]) == 0
    capsys.readouterr()
    assert main([*args, "--extra-image-root", str(nuscenes), "--max-image-pixels", "100"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("is 48x48 = 2304 pixels, more than the limit of 100")
    assert out[0].startswith(f"{path}: record 0: field 'image': image ")
