"""`kedit edit`: apply the edits in a data file with an exported editor and save the edited model.

All the file's edits go in as one batched edit (what MEND and SERAC are trained for); `--sequential`
applies them one after another (`--batch-size` at a time), which a single-edit editor may not survive.
Each edited weight's norm change is reported, and a model whose norms moved past `--max-norm-ratio`
is not saved unless `--force` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_modules.records import read_records
from data_modules.text_records import read_text_records
from kedit_lightning.commands.shared import (
    TEXT_KIND,
    add_data_arguments,
    add_editor_arguments,
    load_editor_and_backbone,
    resolve_kind,
)
from kedit_lightning.editor import MAX_NORM_RATIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_editor_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument(
        "--out", required=True, help="where to write the edited model (an ordinary transformers directory)"
    )
    parser.add_argument(
        "--sequential", action="store_true", help="apply the edits one after another instead of as one batched edit"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="with --sequential: edits per update (default 1)"
    )
    parser.add_argument(
        "--max-norm-ratio",
        type=float,
        default=MAX_NORM_RATIO,
        help=f"refuse to save when an edited weight's norm grew or shrank more than this many times "
        f"(default {MAX_NORM_RATIO:g})",
    )
    parser.add_argument("--force", action="store_true", help="save the edited model whatever its weight norms")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and not args.sequential:
        raise ValueError("--batch-size: only with --sequential (by default all edits are one batched edit)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder for the edited model")
    records = read_text_records(args.data) if resolve_kind(args) == TEXT_KIND else read_records(args.data)
    editor, backbone = load_editor_and_backbone(args)
    if not editor.edits_weights:
        raise ValueError(
            f"{args.editor}: a {editor.method} editor keeps edits in a memory, not in the weights, "
            "so there is no edited model to save"
        )
    batch_size = (args.batch_size or 1) if args.sequential else None
    kind = "vqa" if args.kind == TEXT_KIND else args.kind  # text records are read as they are; no template
    edited = editor.edit(
        backbone, records, batch_size=batch_size, image_root=args.images, kind=kind, vqa_template=args.vqa_template
    )
    how = f"one after another, {batch_size} per update" if args.sequential else "as one batched edit"
    print(f"applied {edited.n_edits} edits from {args.data} {how}; edited weight norms:")
    for name, (before, after) in edited.norm_ratios().items():
        print(f"  {name}: {before:.4g} -> {after:.4g} (x{after / before:.3g})")
    edited.save_pretrained(out, max_norm_ratio=None if args.force else args.max_norm_ratio)
    print(f"saved the edited model to {out}")
    return 0
