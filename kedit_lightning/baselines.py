"""Baseline editors by name: the package's `configs/editors/<name>.yaml` (class_path + init_args) or any such
YAML file. The named configs are package data (read through importlib.resources), so they come with the wheel.

A baseline is an editor class registered in `artifact.EDITORS` plus a config file; `kedit eval
--baseline NAME` and the end-of-fit table (`callbacks.CompareWithFineTuning(baselines=...)`) build it
here and score it with the one evaluation loop, on the same backbone and edits as the main editor.
IKE also needs demonstration records (`demonstrate`).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from torch import nn

from kedit_lightning.artifact import EDITORS

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CONFIG_DIR = files("kedit_lightning") / "configs" / "editors"


def known_baselines() -> list[str]:
    return sorted(entry.name.removesuffix(".yaml") for entry in CONFIG_DIR.iterdir() if entry.name.endswith(".yaml"))


def baseline_path(spec: str) -> Path | Traversable:
    """The YAML file of `spec`: a name of the package's configs/editors, or a path."""
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
        return path.name.rsplit(".", 1)[0], editor_class.from_config(init_args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: init_args do not build a {editor_class.__name__}: {err}") from None
