"""The editor artifact, read and verified: a folder an editor is rebuilt from with torch and transformers alone.

    editor.safetensors   the editor's state dict (tensors only, no pickle)
    editor.json          format and version, method, the editor's class and constructor config
                         (`editor`), the backbone fingerprint (family, config hash, edited parameter
                         names and shapes), validation metrics, package version, the training
                         module's hyper-parameters and config (a record; nothing is rebuilt from
                         them), where the weights came from, and the sha256 of editor.safetensors
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
not fit it, and a backbone whose fingerprint differs (`check_fingerprint` says what differs:
family, config hash, which parameter's shape).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from torch import nn
from transformers import AutoTokenizer

import kedit_lightning
from data_modules.encoding import SubBatchEncoder
from kedit_lightning.backbones import Backbone, TextLMBackbone
from kedit_lightning.editors.ft import FineTune
from kedit_lightning.editors.mend import MEND
from kedit_lightning.editors.serac import SERAC, SERACEncoder

FORMAT = "kedit-editor"
FORMAT_VERSION = 2  # 2: the `editor` section, and SERAC's tokenizers inside the artifact
WEIGHTS_FILE = "editor.safetensors"
CARD_FILE = "editor.json"
SCOPE_TOKENIZER = "scope_tokenizer"
COUNTERFACTUAL_TOKENIZER = "counterfactual_tokenizer"
_CARD_FIELDS = ("format", "format_version", "method", "hyper_parameters", "backbone_fingerprint", "weights")

EDITORS: dict[str, type[nn.Module]] = {"mend": MEND, "ft": FineTune, "serac": SERAC}
"""Each editing method's editor class; `cls.from_config(editor.config)` rebuilds an editor. Each edits
the edited model it makes (`editor.edited_model(backbone)`) when called: MEND and FT with low-rank
weight changes, SERAC with memory entries."""


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


def check_fingerprint(expected: Mapping[str, Any], actual: Mapping[str, Any], what: str) -> None:
    problems = fingerprint_problems(expected, actual)
    if problems:
        raise FingerprintMismatch(f"{what} does not fit this backbone:\n  " + "\n  ".join(problems))


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
    if version < FORMAT_VERSION:
        raise ArtifactError(
            f"{card_path}: format version {version} does not record the editor's own config; "
            "re-export the training checkpoint with `kedit export CKPT --out DIR`"
        )
    method = card["method"]
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


def rebuild_editor(card: Mapping[str, Any], path: str | Path) -> nn.Module:
    """The artifact's editor, built from the config in editor.json with its weights loaded; in eval mode, frozen.

    `card` comes from `read_card`; `path` holds the weights `verify_weights` checked.
    """
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
