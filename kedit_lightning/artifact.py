"""The editor artifact, read and verified: a folder an editor is rebuilt from with torch and transformers alone.

    editor.safetensors   the editor's state dict (tensors only, no pickle)
    editor.json          format and version, method, the editor's class and constructor config
                         (`editor`), the backbone fingerprint (family, config hash, edited parameter
                         names and shapes, a signature of the edited weights' values), validation
                         metrics, package version, the training module's hyper-parameters and config
                         (a record; nothing is rebuilt from them), where the weights came from, and
                         the sha256 of editor.safetensors
    scope_tokenizer/, counterfactual_tokenizer/
                         SERAC only: the tokenizers its scope classifier and counterfactual model
                         read (`save_pretrained` folders)

The editor is rebuilt from its own config (`from_config` of the method's class in `EDITORS`:
fresh weights of the right shapes) and its weights are then loaded strictly from
editor.safetensors. Nothing outside the folder is read but the backbone the caller gives, and
nothing here imports Lightning or jsonargparse; `export.py` writes artifacts from training modules.

Loading refuses what it cannot trust, with a message naming the file and the problem: JSON that
does not parse or lacks a field, a format newer than this package or older than the `editor`
section, a weights file safetensors cannot read (truncated) or whose sha256 differs from the
recorded one (changed after export), a config that does not build the editor or tensors that do
not fit it, values outside sane ranges (`_SANE_CONFIG`: learning rates, rank, shapes, SERAC's
threshold; non-finite tensors), and a backbone whose fingerprint differs (`check_fingerprint` says
what differs: family, config hash, which parameter's shape, or other weights of the same architecture).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from torch import nn
from transformers import AutoTokenizer

import kedit_lightning
from data_modules.encoding import SubBatchEncoder
from kedit_lightning.backbones import Backbone, TextLMBackbone
from kedit_lightning.backbones.base import weights_differ
from kedit_lightning.editors.ft import FineTune
from kedit_lightning.editors.grace import GRACE
from kedit_lightning.editors.ike import IKE
from kedit_lightning.editors.mend import MEND
from kedit_lightning.editors.serac import SERAC, SERACEncoder
from kedit_lightning.editors.tuning import FTL, LoRA
from kedit_lightning.editors.unedited import Unedited
from kedit_lightning.editors.wise import WISE

FORMAT = "kedit-editor"
# 2: the `editor` section, and SERAC's tokenizers inside the artifact. 3: editor.json keeps the edited weights
# in the backbone's order (2 sorted them by name, so MEND's per-weight step sizes, stored in the backbone's
# order, could be read onto the wrong weights).
FORMAT_VERSION = 3
WEIGHTS_FILE = "editor.safetensors"
CARD_FILE = "editor.json"
SCOPE_TOKENIZER = "scope_tokenizer"
COUNTERFACTUAL_TOKENIZER = "counterfactual_tokenizer"
_CARD_FIELDS = ("format", "format_version", "method", "hyper_parameters", "backbone_fingerprint", "weights")

EDITORS: dict[str, type[nn.Module]] = {
    "mend": MEND,
    "ft": FineTune,
    "serac": SERAC,
    "ft-l": FTL,
    "lora": LoRA,
    "ike": IKE,
    "grace": GRACE,
    "wise": WISE,
    "unedited": Unedited,
}
"""Each editing method's editor class; `cls.from_config(editor.config)` rebuilds an editor. Each edits
the edited model it makes (`editor.edited_model(backbone)`) when called: MEND, FT, FT-L and LoRA with
low-rank weight changes, SERAC with memory entries, IKE with in-context demonstrations, GRACE and WISE at
one layer (a codebook, a side memory). The untrained ones are baselines (`baselines.py`: a registry entry
plus kedit_lightning/configs/editors/<name>.yaml)."""


class ArtifactError(ValueError):
    """An editor artifact that is missing, malformed, truncated or changed after export."""


class FingerprintMismatch(ValueError):
    """An editor applied to (or exported for) a backbone other than the one it was trained on."""


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
            f"config hash: the editor was trained on a model with config hash {expected['config_hash']}, the "
            f"backbone's is {actual['config_hash']} (another architecture or size)"
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


def other_weights(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """The edited parameters whose values differ from those the editor was trained on (`weights_differ`).

    Fingerprints written before the `weights` entry existed have nothing to compare: none differ.
    """
    want, have = expected.get("weights", {}), actual.get("weights", {})
    return [name for name, signature in want.items() if name in have and weights_differ(signature, have[name])]


def check_fingerprint(
    expected: Mapping[str, Any], actual: Mapping[str, Any], what: str, allow_other_weights: bool = False
) -> None:
    """Refuse a backbone of another architecture, and one of the same architecture with other weights
    of the edited parameters unless `allow_other_weights` (the editor's statistics are of its base's)."""
    problems = fingerprint_problems(expected, actual)
    if problems:
        raise FingerprintMismatch(f"{what} does not fit this backbone:\n  " + "\n  ".join(problems))
    differ = other_weights(expected, actual)
    if differ and not allow_other_weights:
        raise FingerprintMismatch(
            f"{what} was trained on other weights of this architecture ({len(differ)} of "
            f"{len(expected['weights'])} edited weights differ, e.g. {differ[0]}); pass --allow-other-weights "
            "(allow_other_weights=True) to apply it anyway"
        )


# -- reading ---------------------------------------------------------------------------------
def read_card(path: str | Path) -> dict[str, Any]:
    """editor.json of the artifact in `path`, checked for format, version, method, fields and editor section."""
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
    version = card["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{card_path}: format version {version!r}; this kedit-lightning ({kedit_lightning.__version__}) reads up "
            f"to {FORMAT_VERSION}"
        )
    if version < 2:
        raise ArtifactError(
            f"{card_path}: format version {version} does not record the editor's own config; "
            "re-export the training checkpoint with `kedit export CKPT --out DIR`"
        )
    method = card["method"]
    if version < 3 and method == "mend" and len(card["backbone_fingerprint"].get("edit_params", {})) > 1:
        raise ArtifactError(
            f"{card_path}: format version {version} lists the edited weights sorted by name, not in the order of "
            "MEND's per-weight step sizes; re-export the training checkpoint with `kedit export CKPT --out DIR`"
        )
    if method not in EDITORS:
        raise ArtifactError(f"{card_path}: unknown method {method!r}; known: {sorted(EDITORS)}")
    editor = card.get("editor")
    if not isinstance(editor, dict) or not isinstance(editor.get("config"), dict):
        raise ArtifactError(f"{card_path}: no `editor` section with the editor's class and config")
    if editor.get("class") != EDITORS[method].__name__:
        raise ArtifactError(
            f"{card_path}: the editor section names class {editor.get('class')!r}; "
            f"a {method} editor is a {EDITORS[method].__name__}"
        )
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
            f"{weights}: sha256 {digest} differs from {card['weights']['sha256']} recorded in {CARD_FILE}; the "
            "weights were changed or truncated after export"
        )
    return weights


MAX_LR = 1e2
"""The largest edit learning rate (editor.json's, MEND's trained `edit_lrs`, FT's `lr`) an artifact may hold."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_lr(value: Any) -> bool:
    return _is_number(value) and 0 < value <= MAX_LR


def _are_shapes(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(shape, list) and shape and all(_is_count(d, 1) for d in shape) for shape in value.values()
    )


# What each method's editor config may hold, field -> (check, what a sane value is); read before building,
# so a value that would allocate absurd shapes or blow up every edit is never used.
_SANE_CONFIG: dict[str, dict[str, tuple[Any, str]]] = {
    "mend": {
        "edit_lr": (_is_lr, f"a finite number in (0, {MAX_LR:g}]"),
        "rank": (lambda v: _is_count(v, 1), "an integer >= 1"),
        "n_hidden": (lambda v: _is_count(v, 0), "an integer >= 0"),
        "param_shapes": (_are_shapes, "a map of names to lists of positive integers"),
        "max_edit_ratio": (lambda v: v is None or (_is_number(v) and v > 0), "null or a finite number > 0"),
    },
    "ft": {
        "lr": (_is_lr, f"a finite number in (0, {MAX_LR:g}]"),
        "steps": (lambda v: _is_count(v, 1), "an integer >= 1"),
    },
    "serac": {
        "threshold": (lambda v: _is_number(v) and 0 < v < 1, "a number strictly between 0 and 1"),
        "image_tokens": (lambda v: _is_count(v, 1), "an integer >= 1"),
        "recency_margin": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    },
    "grace": {
        "edit_lr": (_is_lr, f"a finite number in (0, {MAX_LR:g}]"),
        "n_iter": (lambda v: _is_count(v, 1), "an integer >= 1"),
        "eps": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    },
    "wise": {
        "edit_lr": (_is_lr, f"a finite number in (0, {MAX_LR:g}]"),
        "n_iter": (lambda v: _is_count(v, 1), "an integer >= 1"),
        "mask_ratio": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "act_ratio": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
        "save_freq": (lambda v: _is_count(v, 1), "an integer >= 1"),
        "merge_freq": (lambda v: _is_count(v, 1), "an integer >= 1"),
    },
}


def check_editor_values(card: Mapping[str, Any], path: str | Path) -> None:
    """Refuse editor.json values outside sane ranges (`_SANE_CONFIG`), naming the field."""
    config = card["editor"]["config"]
    for name, (sane, description) in _SANE_CONFIG.get(card["method"], {}).items():
        if name in config and not sane(config[name]):
            raise ArtifactError(
                f"{Path(path) / CARD_FILE}: editor.config.{name} is {config[name]!r}; it must be {description}"
            )


def check_editor_weights(editor: nn.Module, path: str | Path) -> None:
    """Refuse non-finite weights, and MEND's trained learning rates outside (-MAX_LR, MAX_LR]."""
    weights = Path(path) / WEIGHTS_FILE
    for name, tensor in editor.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{weights}: tensor {name} holds non-finite values")
    if isinstance(editor, MEND) and bool((editor.edit_lrs.abs() > MAX_LR).any()):
        raise ArtifactError(
            f"{weights}: tensor edit_lrs holds {editor.edit_lrs.abs().max().item():g}; trained edit learning rates "
            f"must be within {MAX_LR:g}"
        )


def rebuild_editor(card: Mapping[str, Any], path: str | Path) -> nn.Module:
    """The artifact's editor, built from the config in editor.json with its weights loaded; in eval mode, frozen.

    `card` comes from `read_card`; `path` holds the weights `verify_weights` checked. Values outside
    sane ranges are refused, in the config before building and in the weights after loading.
    """
    check_editor_values(card, path)
    editor_class = EDITORS[card["method"]]
    try:
        editor = editor_class.from_config(card["editor"]["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(
            f"{path}: the editor config in {CARD_FILE} does not build a {editor_class.__name__}: {err}"
        ) from err
    try:
        load_model(editor, str(Path(path) / card["weights"]["file"]), strict=True)
    except RuntimeError as err:
        raise ArtifactError(
            f"{path}: the weights do not fit the {editor_class.__name__} its config in {CARD_FILE} describes: {err}"
        ) from err
    check_editor_weights(editor, path)
    return editor.eval().requires_grad_(False)


def _read_tokenizer(folder: Path) -> Any:
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: missing (a tokenizer the editor reads its inputs with)")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{folder}: not a readable tokenizer folder ({err})") from err


def read_processor(path: str | Path, editor: nn.Module, backbone: Backbone) -> SubBatchEncoder:
    """What `editor`'s inputs are tokenized with: the backbone's processor, to which SERAC adds the
    tokens of its classifier and counterfactual model, with their tokenizers from the artifact."""
    if not isinstance(editor, SERAC):
        return backbone.processor
    counterfactual = TextLMBackbone.sub_batch_encoder(_read_tokenizer(Path(path) / COUNTERFACTUAL_TOKENIZER))
    return SERACEncoder(backbone.processor, _read_tokenizer(Path(path) / SCOPE_TOKENIZER), counterfactual)


def write_tokenizers(out: Path, processor: SubBatchEncoder) -> None:
    """The tokenizers `read_processor` reads, saved into the artifact folder `out` (SERAC's; others have none)."""
    if isinstance(processor, SERACEncoder):
        processor.scope_tokenizer.save_pretrained(out / SCOPE_TOKENIZER)
        processor.counterfactual.tokenizer.save_pretrained(out / COUNTERFACTUAL_TOKENIZER)
