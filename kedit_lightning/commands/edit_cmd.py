"""`kedit edit`: apply the edits in a data file with an exported editor and save the edited model."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_modules.records import read_records
from kedit_lightning.commands.shared import (
    add_data_arguments,
    add_editor_arguments,
    load_editor_and_backbone,
    reports_errors,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_editor_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument(
        "--out", required=True, help="where to write the edited model (an ordinary transformers directory)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="edits per update; groups are applied one after another (default 1: fully sequential)",
    )


@reports_errors
def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder for the edited model")
    records = read_records(args.data)
    editor, backbone = load_editor_and_backbone(args)
    if not editor.edits_weights:
        raise ValueError(
            f"{args.editor}: a {editor.method} editor keeps edits in a memory, not in the weights, "
            "so there is no edited model to save"
        )
    edited = editor.edit(
        backbone,
        records,
        batch_size=args.batch_size,
        image_root=args.images,
        kind=args.kind,
        vqa_template=args.vqa_template,
    )
    edited.save_pretrained(out)
    print(
        f"applied {edited.n_edits} edits from {args.data} ({args.batch_size} per update) "
        f"and saved the edited model to {out}"
    )
    return 0
