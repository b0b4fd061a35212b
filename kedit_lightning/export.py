"""Writing editor artifacts from Lightning: a training module's editor, a checkpoint's, or the one a fit ends with.

The artifact (see `artifact.py`, which reads and verifies it without Lightning) holds the plain
editor's state dict and its constructor config, so it is rebuilt without the training module;
the module's hyper-parameters and training config are recorded beside them. SERAC's artifact
also holds the tokenizers of its classifier and counterfactual model. Every artifact written is
loaded again at once, as `Editor.from_pretrained` loads it, so one that could not be used is
never left behind silently. Methods plug in through `METHODS`, name -> training module class.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import save_model
from torch import nn

import kedit_lightning
from kedit_lightning.artifact import (
    CARD_FILE,
    EDITORS,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    check_fingerprint,
    sha256_of,
    write_tokenizers,
)
from kedit_lightning.backbones import BackboneSpec
from kedit_lightning.callbacks import next_free_version, run_folder
from kedit_lightning.editor import Editor
from kedit_lightning.modules.editing import REPORT_KEY, EditorModule
from kedit_lightning.modules.ft import FTModule
from kedit_lightning.modules.mend import MENDModule
from kedit_lightning.modules.serac import SERACModule

METHODS: dict[str, type[EditorModule]] = {"mend": MENDModule, "ft": FTModule, "serac": SERACModule}
"""Each editing method's training module; its editor is `module.editor`, of the class `EDITORS` names for the method."""


def method_of_module(module: LightningModule) -> str:
    for name, module_class in METHODS.items():
        if isinstance(module, module_class):
            return name
    raise TypeError(f"{type(module).__name__} is not the training module of a known editing method ({sorted(METHODS)})")


def method_of_checkpoint(checkpoint: Mapping[str, Any], path: str | Path, method: str | None = None) -> str:
    """`method` if given, else the method whose module class LightningCLI recorded in the hyper-parameters."""
    if method is not None:
        if method not in METHODS:
            raise ValueError(f"unknown editing method {method!r}; known: {sorted(METHODS)}")
        return method
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path")
    if class_path is None:
        raise ValueError(
            f"{path}: the checkpoint does not record its LightningModule class (it was not trained through "
            f"train.py); name the method, one of {sorted(METHODS)}"
        )
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    for name, module_class in METHODS.items():
        if issubclass(cls, module_class):
            return name
    raise ValueError(f"{path}: {class_path} does not train a known editing method ({sorted(METHODS)})")


def jsonable(value: Any) -> Any:
    """Hyper-parameters and configs as JSON data: dataclasses as dicts, tuples as lists, other objects as text."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# -- saving ----------------------------------------------------------------------------------
def save_editor(
    out_dir: str | Path,
    module: EditorModule,
    editor: nn.Module | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_config: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `editor` (default: `module.editor`), trained by `module`, as an artifact in `out_dir`; returns `out_dir`.

    The artifact is then loaded onto `module.backbone` as `Editor.from_pretrained` loads it, so one
    that could not be loaded again is never left behind silently.
    """
    out = Path(out_dir)
    if (out / CARD_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"{out}: already holds an exported editor ({CARD_FILE}); choose another folder or allow overwriting"
        )
    method = method_of_module(module)
    editor = editor if editor is not None else module.editor
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    # Write beside and rename: a crash mid-write never leaves a half file under the final name.
    # One metadata entry: safetensors writes several in no fixed order, and the same editor should give the same bytes.
    partial = out / f".{WEIGHTS_FILE}.partial"
    save_model(editor, str(partial), metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
    os.replace(partial, weights)
    write_tokenizers(out, module.input_processor())
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": kedit_lightning.__version__,
        "method": method,
        # The method's class, not type(editor): sharding (FSDP2's replicate) swaps in a subclass.
        "editor": {"class": EDITORS[method].__name__, "config": jsonable(editor.config)},
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "hyper_parameters": jsonable({k: v for k, v in module.hparams.items() if not k.startswith("_")}),
        "backbone_fingerprint": jsonable(module.backbone.fingerprint()),
        "metrics": jsonable(metrics or {}),
        "training_config": jsonable(training_config or {}),
        "source": jsonable(source or {}),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_of(weights), "bytes": weights.stat().st_size},
    }
    # Written last: an artifact folder with editor.json in it is complete. Keys stay in their order: the
    # edited weights' order is the order of MEND's per-weight step sizes in the weights file.
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    Editor.from_pretrained(out).attach(module.backbone)
    return out


def training_config(
    config_file: Path | None, module: LightningModule | None = None, checkpoint: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """LightningCLI's saved config.yaml when there is one, else the model's and data's hyper-parameters."""
    if config_file is not None and config_file.is_file():
        return yaml.safe_load(config_file.read_text()) or {}
    if module is not None:
        model = {
            "class_path": f"{type(module).__module__}.{type(module).__qualname__}",
            "init_args": dict(module.hparams),
        }
        datamodule = module._trainer.datamodule if module._trainer is not None else None
        data = (
            {
                "class_path": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
                "init_args": dict(datamodule.hparams),
            }
            if datamodule is not None
            else None
        )
        return {"model": model, "data": data}
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    data = dict(checkpoint.get("datamodule_hyper_parameters", {}))
    return {
        "model": {"class_path": hparams.pop("_class_path", None), "init_args": hparams},
        "data": {"class_path": data.pop("_class_path", None), "init_args": data},
    }


def checkpoint_editor_state(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The `editor.*` entries of a Lightning checkpoint's state dict, prefix removed."""
    return {
        key.removeprefix("editor."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("editor.")
    }


def export_module(
    module: EditorModule,
    out_dir: str | Path,
    editor_state: Mapping[str, torch.Tensor] | None = None,
    metrics: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a live training module's editor, or `editor_state` (e.g. a checkpoint's) in a copy of it."""
    editor = None
    if editor_state is not None:
        editor = copy.deepcopy(module.editor)
        editor.load_state_dict(editor_state, strict=True)
    config = config if config is not None else training_config(None, module)
    return save_editor(
        out_dir, module, editor, metrics=metrics, training_config=config, source=source, overwrite=overwrite
    )


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    method: str | None = None,
    backbone: str | None = None,
    overwrite: bool = False,
) -> Path:
    """`kedit export`: a Lightning checkpoint -> an artifact.

    The training module is rebuilt from the checkpoint (which loads its backbone: `backbone`
    replaces the spec's `pretrained` source when the model has moved), and the backbone must
    still have the fingerprint recorded at training time. The checkpoint is a pickle: export
    only checkpoints you trust; the artifact itself holds no pickle.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    method = method_of_checkpoint(checkpoint, path, method)
    overrides = {}
    if backbone is not None:
        spec = checkpoint["hyper_parameters"]["backbone"]
        spec = spec if isinstance(spec, BackboneSpec) else BackboneSpec(**spec)
        overrides["backbone"] = BackboneSpec(
            **{**asdict(spec), "pretrained": backbone, "config": None, "bootstrap": None}
        )
    with warnings.catch_warnings():
        # The backbone is rebuilt from its spec, never stored in checkpoints: its keys are missing on purpose.
        warnings.filterwarnings(
            "ignore", message="Found keys that are in the model state dict but not in the checkpoint"
        )
        module = METHODS[method].load_from_checkpoint(path, map_location="cpu", weights_only=False, **overrides)
    if "backbone_fingerprint" in checkpoint:
        check_fingerprint(
            checkpoint["backbone_fingerprint"],
            module.backbone.fingerprint(),
            f"{path} (trained on another backbone than its spec loads now)",
        )
    return export_module(
        module,
        out_dir,
        editor_state=checkpoint_editor_state(checkpoint),
        metrics=checkpoint.get(REPORT_KEY),
        config=training_config(path.parent.parent / "config.yaml", checkpoint=checkpoint),
        source={
            "checkpoint": str(path),
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
        },
        overwrite=overwrite,
    )


# -- export at the end of a fit ---------------------------------------------------------------
class ExportEditor(Callback):
    """Export the trained editor when a fit ends, by default into the run's folder: `<run folder>/editor`.

    The run folder is `callbacks.run_folder`: the logger's (e.g. `runs/<name>/version_N`), so a run's
    editor sits beside its logs and config.yaml. With `dirpath`, into `dirpath/<run name>/<version>`
    instead: the logger's name and version; without a logger, or with `name` set, that name (default
    `<method>-<backbone family>`) and its next free `version_N`. An existing artifact is never written
    over: a run resumed into its version folder exports to `editor_1`, `editor_2`, ...; with `dirpath`,
    a taken version folder (logs moved away, the logger counting from 0 again) gives the name's next
    free `version_N`; `overwrite` replaces the first choice instead. With `best=True` and a
    ModelCheckpoint that saved a best checkpoint, that checkpoint's editor is exported, else the final
    one; the validation report stored in the checkpoint (`REPORT_KEY`, written by
    `EditorModule.on_save_checkpoint`) goes into the artifact.
    """

    def __init__(
        self, dirpath: str | None = None, name: str | None = None, best: bool = True, overwrite: bool = False
    ) -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.name = name
        self.best = best
        self.overwrite = overwrite
        self.exported: Path | None = None

    def run_dir(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        if self.dirpath is None:
            folder = run_folder(trainer)
            free = (folder / ("editor" if i == 0 else f"editor_{i}") for i in itertools.count())
            return folder / "editor" if self.overwrite else next(p for p in free if not p.exists())
        logger = trainer.logger
        if logger is not None and self.name is None:
            version = logger.version
            logged = self.dirpath / logger.name / (version if isinstance(version, str) else f"version_{version}")
            if self.overwrite or not logged.exists():
                return logged
            return next_free_version(self.dirpath / logger.name)
        return next_free_version(
            self.dirpath / (self.name or f"{method_of_module(pl_module)}-{pl_module.backbone.family}")
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if self.best else ""
        config = training_config(run_folder(trainer) / "config.yaml", pl_module)
        out = self.run_dir(trainer, pl_module)
        if best:
            checkpoint = torch.load(best, map_location="cpu", weights_only=False)
            source = {
                "checkpoint": best,
                "epoch": checkpoint.get("epoch"),
                "global_step": checkpoint.get("global_step"),
            }
            self.exported = export_module(
                pl_module,
                out,
                checkpoint_editor_state(checkpoint),
                checkpoint.get(REPORT_KEY),
                config,
                source,
                overwrite=self.overwrite,
            )
        else:
            source = {"checkpoint": None, "epoch": trainer.current_epoch, "global_step": trainer.global_step}
            self.exported = export_module(
                pl_module, out, None, pl_module.last_report.get("val"), config, source, overwrite=self.overwrite
            )
        rank_zero_info(f"exported the editor to {self.exported}")
