"""Baseline editors by name: `configs/editors/<name>.yaml` (class_path + init_args) or any such YAML file.

A baseline is an editor class registered in `artifact.EDITORS` plus a config file; `kedit eval
--baseline NAME` and the end-of-fit table (`callbacks.CompareWithFineTuning(baselines=...)`) build it
here and score it with the one evaluation loop, on the same backbone and edits as the main editor.
IKE also needs demonstration records (`demonstrate`).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from torch import nn

from kedit_lightning.artifact import EDITORS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "editors"


def known_baselines() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def baseline_path(spec: str) -> Path:
    """The YAML file of `spec`: a name under configs/editors, or a path."""
    if spec.endswith((".yaml", ".yml")):
        if not Path(spec).is_file():
            raise ValueError(f"--baseline {spec}: no such file")
        return Path(spec)
    path = CONFIG_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise ValueError(f"--baseline {spec}: not a known baseline ({', '.join(known_baselines())}) nor a YAML file")
    return path


def load_baseline(spec: str) -> tuple[str, nn.Module]:
    """(name, editor) of a baseline: the file's stem, and its class (one of `EDITORS`) built from init_args."""
    path = baseline_path(spec)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("class_path"), str):
        raise ValueError(f"{path}: expected a mapping with class_path (and init_args)")
    classes = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in EDITORS.values()}
    editor_class = classes.get(config["class_path"])
    if editor_class is None:
        raise ValueError(
            f"{path}: class_path {config['class_path']} is not a registered editor ({', '.join(sorted(classes))})"
        )
    init_args = config.get("init_args") or {}
    try:
        return path.stem, editor_class.from_config(init_args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: init_args do not build a {editor_class.__name__}: {err}") from None
