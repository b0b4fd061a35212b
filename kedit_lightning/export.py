"""The editor artifact: a trained editor as `editor.safetensors` + `editor.json`, saved, loaded and verified.

    editor.safetensors  the trained editor's state dict (`module.editor`; tensors only, no pickle)
    editor.json         format and version, method, the training module's hyper-parameters, the
                        backbone fingerprint (family, config hash, edited parameter names and
                        shapes), validation metrics, package version, the training config, where
                        the weights came from, and the sha256 of editor.safetensors

An editor is rebuilt the way it was built for training: the method's LightningModule is created
from the recorded hyper-parameters (jsonargparse turns the JSON back into specs), given the
backbone to edit, asked to `build_editor(backbone)`, and the saved state is loaded into its
editor. So an artifact needs nothing beyond what training needed: for SERAC, the scope encoder
and counterfactual model sources named in its hyper-parameters (their weights come from the
artifact). Methods plug in through `METHODS`, name -> training module class.

Loading refuses what it cannot trust, with a message naming the file and the problem: JSON that
does not parse or lacks a field, a format newer than this package, a weights file safetensors
cannot read (truncated) or whose sha256 differs from the recorded one (changed after export),
tensors that do not fit the editor the JSON describes, and a backbone whose fingerprint differs
(`check_fingerprint` says what differs: family, config hash, which parameter's shape).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
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
from lightning.pytorch.cli import instantiate_module
from lightning.pytorch.utilities import rank_zero_info
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

import kedit_lightning
from kedit_lightning.backbones import Backbone, BackboneSpec
from kedit_lightning.modules.editing import REPORT_KEY, EditorModule
from kedit_lightning.modules.ft import FTModule
from kedit_lightning.modules.mend import MENDModule
from kedit_lightning.modules.serac import SERACModule

FORMAT = "kedit-editor"
FORMAT_VERSION = 1
WEIGHTS_FILE = "editor.safetensors"
CARD_FILE = "editor.json"
# Written into every Lightning checkpoint by `ExportEditor`, so an export of that checkpoint
# carries the validation metrics of the weights it holds.
_CARD_FIELDS = ("format", "format_version", "method", "hyper_parameters", "backbone_fingerprint", "weights")


class ArtifactError(ValueError):
    """An editor artifact that is missing, malformed, truncated or changed after export."""


class FingerprintMismatch(ValueError):
    """An editor applied to (or exported for) a backbone other than the one it was trained on."""


METHODS: dict[str, type[EditorModule]] = {"mend": MENDModule, "ft": FTModule, "serac": SERACModule}
"""Each editing method's training module; its editor is `module.editor`. A `WeightEditorModule`'s
edits are new weights (`module.edit`); SERAC's go into a memory that a router answers from."""


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
            f"{path}: the checkpoint does not record its LightningModule class (it was not trained through train.py); name the method, one of {sorted(METHODS)}"
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- fingerprints ----------------------------------------------------------------------------
def fingerprint_problems(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """What differs between the fingerprint an editor was trained on and a backbone's, one line each."""
    problems = []
    if expected["family"] != actual["family"]:
        problems.append(
            f"family: the editor was trained on {expected['family']!r}, the backbone is {actual['family']!r}"
        )
    if expected["config_hash"] != actual["config_hash"]:
        problems.append(
            f"config hash: the editor was trained on a model with config hash {expected['config_hash']}, the backbone's is {actual['config_hash']} (another architecture or size)"
        )
    want, have = expected["edit_params"], actual["edit_params"]
    for name, shape in want.items():
        if name not in have:
            problems.append(f"edited parameter {name}: the backbone does not edit it")
        elif list(have[name]) != list(shape):
            problems.append(f"shape of {name}: the editor expects {list(shape)}, the backbone has {list(have[name])}")
    problems += [
        f"edited parameter {name}: the backbone edits it, the editor was not trained for it"
        for name in have
        if name not in want
    ]
    return problems


def check_fingerprint(expected: Mapping[str, Any], actual: Mapping[str, Any], what: str) -> None:
    problems = fingerprint_problems(expected, actual)
    if problems:
        raise FingerprintMismatch(f"{what} does not fit this backbone:\n  " + "\n  ".join(problems))


# -- loading ---------------------------------------------------------------------------------
def read_card(path: str | Path) -> dict[str, Any]:
    """editor.json of the artifact in `path`, checked for format, version, method and required fields."""
    card_path = Path(path) / CARD_FILE
    if not Path(path).is_dir():
        raise ArtifactError(f"{path}: no such editor directory")
    if not card_path.is_file():
        raise ArtifactError(f"{path}: no {CARD_FILE}, so this is not an exported editor")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{card_path}: not valid JSON ({err})") from err
    if not isinstance(card, dict):
        raise ArtifactError(f"{card_path}: expected a JSON object, got {type(card).__name__}")
    missing = [name for name in _CARD_FIELDS if name not in card]
    if missing:
        raise ArtifactError(f"{card_path}: missing field(s) {missing}")
    if card["format"] != FORMAT:
        raise ArtifactError(f"{card_path}: format {card['format']!r} is not {FORMAT!r}")
    if not isinstance(card["format_version"], int) or card["format_version"] > FORMAT_VERSION:
        raise ArtifactError(
            f"{card_path}: format version {card['format_version']!r}; this kedit-lightning ({kedit_lightning.__version__}) reads up to {FORMAT_VERSION}"
        )
    if card["method"] not in METHODS:
        raise ArtifactError(f"{card_path}: unknown method {card['method']!r}; known: {sorted(METHODS)}")
    return card


def verify_weights(path: str | Path, card: Mapping[str, Any]) -> Path:
    """editor.safetensors, refused if safetensors cannot read its header or its sha256 is not the recorded one."""
    weights = Path(path) / card["weights"]["file"]
    if not weights.is_file():
        raise ArtifactError(f"{weights}: missing (the artifact's weights)")
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except SafetensorError as err:
        raise ArtifactError(f"{weights}: not a readable safetensors file (truncated or corrupted): {err}") from err
    digest = sha256_of(weights)
    if digest != card["weights"]["sha256"]:
        raise ArtifactError(
            f"{weights}: sha256 {digest} differs from {card['weights']['sha256']} recorded in {CARD_FILE}; the weights were changed or truncated after export"
        )
    return weights


def rebuild_module(card: Mapping[str, Any], path: str | Path, backbone: Backbone) -> EditorModule:
    """The method's training module for `backbone` with the artifact's editor weights loaded (editor in eval mode, frozen).

    The caller checks the fingerprint first; `path` holds the verified weights.
    """
    method = card["method"]
    try:
        module = instantiate_module(METHODS[method], card["hyper_parameters"])
    except (argparse.ArgumentError, TypeError, ValueError) as err:
        raise ArtifactError(
            f"{path}: the hyper-parameters in {CARD_FILE} do not build a {method} module: {err}"
        ) from err
    module.backbone = backbone
    module.build_editor(backbone)
    try:
        load_model(module.editor, str(Path(path) / card["weights"]["file"]), strict=True)
    except RuntimeError as err:
        raise ArtifactError(
            f"{path}: the weights do not fit the {method} editor its hyper-parameters describe: {err}"
        ) from err
    module.editor.eval().requires_grad_(False)
    return module.to(next(backbone.parameters()).device)


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

    The artifact is then rebuilt onto `module.backbone` as a loader would, so one that could not
    be loaded again is never left behind silently.
    """
    out = Path(out_dir)
    if (out / CARD_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"{out}: already holds an exported editor ({CARD_FILE}); choose another folder or allow overwriting"
        )
    method = method_of_module(module)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    # Write beside and rename: a crash mid-write never leaves a half file under the final name.
    # One metadata entry: safetensors writes several in no fixed order, and the same editor should give the same bytes.
    partial = out / f".{WEIGHTS_FILE}.partial"
    save_model(
        editor if editor is not None else module.editor, str(partial), metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"}
    )
    os.replace(partial, weights)
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": kedit_lightning.__version__,
        "method": method,
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "hyper_parameters": jsonable({k: v for k, v in module.hparams.items() if not k.startswith("_")}),
        "backbone_fingerprint": jsonable(module.backbone.fingerprint()),
        "metrics": jsonable(metrics or {}),
        "training_config": jsonable(training_config or {}),
        "source": jsonable(source or {}),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_of(weights), "bytes": weights.stat().st_size},
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    rebuild_module(read_card(out), out, module.backbone)
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
    """Export the trained editor when a fit ends, into `dirpath/<run name>/<version>`.

    The run name and version are the logger's (so a run's editor sits beside its logs under the
    same name and never overwrites another run's); without a logger, or with `name` set, that
    name (default `<method>-<backbone family>`) and its next free `version_N`. With `best=True`
    and a ModelCheckpoint that saved a best checkpoint, that checkpoint's editor is exported,
    else the final one; the validation report stored in the checkpoint (`REPORT_KEY`, written by
    `EditorModule.on_save_checkpoint`) goes into the artifact.
    """

    def __init__(self, dirpath: str = "checkpoints", name: str | None = None, best: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.name = name
        self.best = best
        self.exported: Path | None = None

    def run_dir(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        logger = trainer.logger
        if logger is not None and self.name is None:
            version = logger.version
            return self.dirpath / logger.name / (version if isinstance(version, str) else f"version_{version}")
        name = self.name or f"{method_of_module(pl_module)}-{pl_module.backbone.family}"
        taken = {p.name for p in (self.dirpath / name).glob("version_*")}
        return self.dirpath / name / next(f"version_{i}" for i in range(len(taken) + 1) if f"version_{i}" not in taken)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # on every rank: under several processes it is a broadcast from rank 0
        if not trainer.is_global_zero:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if self.best else ""
        config_file = Path(log_dir) / "config.yaml" if log_dir else None
        config = training_config(config_file, pl_module)
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
                overwrite=True,
            )
        else:
            source = {"checkpoint": None, "epoch": trainer.current_epoch, "global_step": trainer.global_step}
            self.exported = export_module(
                pl_module, out, None, pl_module.last_report.get("val"), config, source, overwrite=True
            )
        rank_zero_info(f"exported the editor to {self.exported}")
