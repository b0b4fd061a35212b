"""Every `kedit` subcommand and train.py: a user error is one line on stderr, a non-zero exit, no traceback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VAL_FILE

from kedit_lightning.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bad(tmp_path_factory, fitted):
    """Bad inputs of every kind, as files."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.ckpt").write_bytes(b"")
    (root / "text.ckpt").write_text("not a checkpoint\n")
    good = fitted.best_checkpoint.read_bytes()
    (root / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (root / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "object.json").write_text('{"src": "a question", "alt": "an answer"}')
    (root / "broken.json").write_text('[{"src": "a question",')
    (root / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (root / "a-file").write_text("a file, not a folder")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("keep me")
    unsigned = root / "unsigned-editor"
    shutil.copytree(fitted.artifact, unsigned)
    card = json.loads((unsigned / "editor.json").read_text())
    del card["weights"]["sha256"]
    (unsigned / "editor.json").write_text(json.dumps(card))
    no_card = root / "no-card-editor"
    shutil.copytree(fitted.artifact, no_card)
    (no_card / "editor.json").unlink()
    return root


def catalogue(bad: Path, fitted, world: Path, base_dir: Path) -> dict[str, list[str]]:
    data, images, editor = str(world / VAL_FILE), str(world / "images"), str(fitted.artifact)
    use = ["--editor", editor, "--backbone", str(base_dir), "--data", data, "--images", images, "--device", "cpu"]
    edit = ["edit", *use, "--out", str(bad / "edited")]
    evaluate = ["eval", *use, "--no-progress"]
    cases = {
        "no subcommand": [],
        "unknown subcommand": ["frobnicate"],
        "unknown flag": ["validate", "--data", data, "--images", images, "--colour"],
        "missing required flag": ["eval", "--backbone", str(base_dir), "--data", data, "--images", images],
        "synth: too few entities": ["synth", "--out", str(bad / "w"), "--entities", "2"],
        "synth: --out under a file": ["synth", "--out", str(bad / "a-file" / "world")],
        "validate: missing data file": ["validate", "--data", str(bad / "missing.json"), "--images", images],
        "validate: deeply nested JSON": ["validate", "--data", str(bad / "nested.json"), "--images", images],
        "validate: malformed JSON": ["validate", "--data", str(bad / "broken.json"), "--images", images],
        "validate: binary file": ["validate", "--data", str(bad / "binary.json"), "--images", images],
        "shard: missing data file": ["shard", "--data", str(bad / "missing.json"), "--images", images, "--out", "x"],
        "shard: --out under a file": ["shard", "--data", data, "--images", images, "--out", str(bad / "a-file" / "s")],
        "shard: bad shard size": ["shard", "--data", data, "--images", images, "--out", "x", "--shard-size", "big"],
        "export: empty file": ["export", str(bad / "empty.ckpt"), "--out", str(bad / "e1")],
        "export: text file": ["export", str(bad / "text.ckpt"), "--out", str(bad / "e2")],
        "export: truncated checkpoint": ["export", str(bad / "truncated.ckpt"), "--out", str(bad / "e3")],
        "export: missing checkpoint": ["export", str(bad / "missing.ckpt"), "--out", str(bad / "e4")],
        "export: unknown method": ["export", str(fitted.best_checkpoint), "--out", str(bad / "e5"), "--method", "x"],
        "eval: --device cuda without CUDA": [*evaluate, "--device", "cuda"],
        "eval: --device bogus": [*evaluate, "--device", "bogus"],
        "eval: --dtype bogus": [*evaluate, "--dtype", "bogus"],
        "eval: editor.json without weights.sha256": [*evaluate, "--editor", str(bad / "unsigned-editor")],
        "eval: artifact without editor.json": [*evaluate, "--editor", str(bad / "no-card-editor")],
        "eval: missing editor folder": [*evaluate, "--editor", str(bad / "no-editor")],
        "eval: missing backbone": [*evaluate, "--backbone", str(bad / "no-backbone")],
        "eval: missing data file": [*evaluate, "--data", str(bad / "missing.json")],
        "eval: bad --hops": [*evaluate, "--hops", "one"],
        "eval: more sequential edits than records": [*evaluate, "--sequential", "500"],
        "eval: --curve without --sequential": [*evaluate, "--curve", str(bad / "curves")],
        "eval: unknown --protocol": [*evaluate, "--protocol", "mend"],
        "eval: --probe 0": [*evaluate, "--sequential", "2", "--probe", "0"],
        "eval: --max-edit-ratio 0": [*evaluate, "--max-edit-ratio", "0"],
        "eval: --threshold without --editor": [
            *("eval", "--baseline", "unedited", "--backbone", "configs/backbones/blip2-tiny.yaml"),
            *("--data", data, "--images", images, "--threshold", "0.3"),
        ],
        "edit: data file of the wrong layout": [*edit, "--data", str(bad / "object.json")],
        "edit: malformed data file": [*edit, "--data", str(bad / "broken.json")],
        "edit: --batch-size 0": [*edit, "--sequential", "--batch-size", "0"],
        "edit: --batch-size without --sequential": [*edit, "--batch-size", "2"],
        "edit: --out not empty": [*edit, "--out", str(bad / "full")],
    }
    if torch.cuda.is_available():
        del cases["eval: --device cuda without CUDA"]
    return cases


def is_one_line_error(code: int, err: str) -> bool:
    return code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def is_one_problem_report(code: int, out: str, err: str) -> bool:
    """`kedit validate`'s report on stdout: the problem's line, then the summary counting one problem."""
    lines = out.strip().splitlines()
    return code == 1 and not err and len(lines) == 2 and lines[1].endswith(": 1 problem(s)")


def test_every_bad_input_is_one_line(bad, fitted, world, base_dir, capsys):
    cases = catalogue(bad, fitted, world, base_dir)
    assert len(cases) >= 25
    failures = {}
    for name, argv in cases.items():
        code = main(argv)
        out, err = capsys.readouterr()
        if not (is_one_line_error(code, err) or is_one_problem_report(code, out, err)):
            failures[name] = (code, out[-1000:], err[-2000:])
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())
    assert (bad / "full" / "keep.txt").read_text() == "keep me"


def test_debug_shows_the_traceback(bad):
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        main(["--debug", "export", str(bad / "empty.ckpt"), "--out", str(bad / "e")])


def run_script(*argv: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=environment, capture_output=True, text=True)


def test_the_real_exit_paths_are_one_line(bad, world, tmp_path):
    images = str(world / "images")
    done = run_script("-m", "kedit_lightning.cli", "validate", "--data", str(bad / "nested.json"), "--images", images)
    # validate reports a bad file as its problem lines and a summary on stdout, exit 1, no traceback.
    assert done.returncode == 1 and not done.stderr and "Traceback" not in done.stdout
    assert f"{bad / 'nested.json'}: JSON nested too deeply to read" in done.stdout
    (tmp_path / "bad.yaml").write_text("model: [\n")
    configs = {
        "missing config": ["--config", str(tmp_path / "missing.yaml")],
        "malformed YAML": ["--config", str(tmp_path / "bad.yaml")],
        "unknown class path": ["--config", "configs/quickstart.yaml", "--model.class_path", "nowhere.Editor"],
    }
    for name, argv in configs.items():
        done = run_script("train.py", "fit", *argv)
        assert is_one_line_error(done.returncode, done.stderr), (name, done.stderr)
        assert done.stderr.startswith("train.py: "), name
    done = run_script("train.py", "fit", *configs["missing config"], KEDIT_DEBUG="1")
    assert done.returncode != 0 and "Traceback" in done.stderr
