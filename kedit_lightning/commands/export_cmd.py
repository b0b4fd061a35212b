"""`kedit export CKPT --out DIR`: turn a Lightning checkpoint into an editor artifact."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

from kedit_lightning.artifact import read_card
from kedit_lightning.export import METHODS, export_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a Lightning checkpoint (.ckpt) of an editor's training module")
    parser.add_argument("--out", required=True, help="the artifact folder, e.g. checkpoints/<method>-<backbone>-<data>")
    parser.add_argument(
        "--method", choices=sorted(METHODS), default=None, help="the editing method (default: read from the checkpoint)"
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="load the backbone from this hub id or directory instead of the training spec's",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an artifact already in --out")


def run(args: argparse.Namespace) -> int:
    # torch.save writes a zip archive; an empty, truncated or foreign file fails here with its name,
    # not deep inside torch.load.
    if Path(args.checkpoint).is_file() and not zipfile.is_zipfile(args.checkpoint):
        raise ValueError(f"{args.checkpoint}: not a PyTorch checkpoint (empty, truncated, or another kind of file)")
    out = export_checkpoint(
        args.checkpoint, args.out, method=args.method, backbone=args.backbone, overwrite=args.overwrite
    )
    card = read_card(out)
    print(
        f"exported {card['method']} editor for {card['backbone_fingerprint']['family']} "
        f"({len(card['backbone_fingerprint']['edit_params'])} edited weights) to {out}"
    )
    return 0
