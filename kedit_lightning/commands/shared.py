"""What the `kedit export | edit | eval` subcommands share: editor and data arguments, loading."""

from __future__ import annotations

import argparse

import torch
import transformers

from data_modules.datasets import KINDS, VQA_TEMPLATE
from data_modules.text_records import file_is_text
from kedit_lightning.backbones import Backbone
from kedit_lightning.editor import Editor
from kedit_lightning.editors.mend import MEND

TEXT_KIND = "text"


def add_editor_arguments(parser: argparse.ArgumentParser, editor_required: bool = True) -> None:
    parser.add_argument(
        "--editor", required=editor_required, help="an exported editor directory (editor.json + editor.safetensors)"
    )
    parser.add_argument(
        "--backbone",
        required=True,
        help="hub id or directory of the model to edit (the family the editor was trained on)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda when available)",
    )
    parser.add_argument(
        "--dtype", default=None, help="backbone dtype, e.g. bfloat16 (default: the one used in training)"
    )
    parser.add_argument(
        "--max-edit-ratio",
        type=float,
        default=None,
        metavar="R",
        help="MEND: scale each edit's update down to at most R times the norm of the weights it edits, for long "
        "sequences of edits (default: the limit the editor was trained under, if any)",
    )
    parser.add_argument(
        "--allow-other-weights",
        action="store_true",
        help="apply the editor to weights other than those of the base it was trained on (same architecture)",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="a JSON file of edit records (E-VQA / E-IC / VLKEB layout, or text-only: zsRE / CounterFact layout)",
    )
    parser.add_argument(
        "--images", default=None, help="the folder the records' image paths are relative to (not for text records)"
    )
    parser.add_argument(
        "--kind",
        choices=(*KINDS, TEXT_KIND),
        default=None,
        help="vqa: prompts go through the VQA template; caption: used as they are; text: text-only records "
        "(default: text when the file's records name no image, else vqa)",
    )
    parser.add_argument("--vqa-template", default=VQA_TEMPLATE, help="the question template ('{}' is the question)")


def resolve_kind(args: argparse.Namespace) -> str:
    """`args.kind`, detected from the data file when not given; `--images` checked against it."""
    if args.kind is None:
        args.kind = TEXT_KIND if file_is_text(args.data) else "vqa"
    if args.kind != TEXT_KIND and args.images is None:
        raise ValueError(f"--images: required for {args.kind} records (text-only records: --kind text)")
    return args.kind


def check_family(editor: Editor, kind: str, data: str) -> None:
    """Refuse image records for an editor of a text backbone, from its fingerprint, before any weights load."""
    family = editor.fingerprint.get("family")
    if family == TEXT_KIND and kind != TEXT_KIND:
        raise ValueError(
            f"{data}: {kind} records carry images, but the editor in {editor.path} edits a text backbone "
            "(family 'text'): give text records (zsRE / CounterFact layout)"
        )


def check_device_and_dtype(device: str, dtype: str | None) -> None:
    """Refuse a device this machine lacks or a dtype torch does not have, before loading anything."""
    try:
        where = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device}: not a device ({err})") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device on this machine; use --device cpu")
    if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"--dtype {dtype}: not a torch dtype (e.g. float32, bfloat16, float16)")


def load_editor_and_backbone(args: argparse.Namespace) -> tuple[Editor, Backbone]:
    check_device_and_dtype(args.device, args.dtype)
    # transformers' per-load progress bar would put lines on stderr around an error's one line.
    transformers.utils.logging.disable_progress_bar()
    kind = resolve_kind(args)
    try:
        editor = Editor.from_pretrained(args.editor)
    except KeyError as err:
        raise ValueError(f"{args.editor}/editor.json: missing field {err}") from None
    check_family(editor, kind, args.data)
    if args.max_edit_ratio is not None:
        if not isinstance(editor.editor, MEND):
            raise ValueError(
                f"--max-edit-ratio: only MEND edits are limited, and {args.editor} holds a {editor.method} editor"
            )
        try:
            editor.editor.limit_edits(args.max_edit_ratio)
        except ValueError as err:
            raise ValueError(f"--max-edit-ratio: {err}") from None
    return editor, editor.load_backbone(
        args.backbone, dtype=args.dtype, device=args.device, allow_other_weights=args.allow_other_weights
    )
