"""What the `kedit export | edit | eval` subcommands share: error reporting, editor and data arguments, loading."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

import torch

from data_modules.datasets import KINDS, VQA_TEMPLATE
from kedit_lightning.backbones import Backbone
from kedit_lightning.editor import Editor, NonFiniteEdit

# Bad input (files, artifacts, data, arguments) is reported as one line, not a traceback.
USER_ERRORS = (OSError, ValueError, NonFiniteEdit)


def reports_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A subcommand's `run` that prints bad-input errors to stderr and returns 2."""

    @functools.wraps(run)
    def checked(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except USER_ERRORS as err:
            print(f"kedit {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
            return 2

    return checked


def add_editor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--editor", required=True, help="an exported editor directory (editor.json + editor.safetensors)"
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
        "--allow-other-weights",
        action="store_true",
        help="apply the editor to weights other than those of the base it was trained on (same architecture)",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a JSON file of edit records (E-VQA / E-IC / VLKEB layout)")
    parser.add_argument("--images", required=True, help="the folder the records' image paths are relative to")
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="vqa",
        help="vqa: prompts go through the VQA template; caption: used as they are",
    )
    parser.add_argument("--vqa-template", default=VQA_TEMPLATE, help="the question template ('{}' is the question)")


def load_editor_and_backbone(args: argparse.Namespace) -> tuple[Editor, Backbone]:
    editor = Editor.from_pretrained(args.editor)
    return editor, editor.load_backbone(
        args.backbone, dtype=args.dtype, device=args.device, allow_other_weights=args.allow_other_weights
    )
