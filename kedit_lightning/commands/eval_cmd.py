"""`kedit eval`: score an exported editor on a data file and print / write the metrics.

Each record is edited from the unedited weights (as in validation), or with `--sequential N` the
first N records are edited one after another and scored with the final weights, with a curve of
how the earliest edits' Reliability and Locality change as edits accumulate.

ADS-Edit files (records with an `image_type`) are read as such, and every metric is also reported per
`data_type` and per `image_type`. VQA-layout files are read as VLKEB reads them (a superset of E-VQA):
portability questions are scored per hop (`--hops` chooses), and the one-hop-edit variant applies its second edit before
scoring the question that depends on it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_modules.ads import ADSEditDataModule
from data_modules.ads_records import file_is_ads
from data_modules.datamodules import EditDataModule, TextEditDataModule
from data_modules.encoding import SubBatchEncoder
from data_modules.records import DataError
from data_modules.validate import add_image_arguments
from data_modules.vlkeb import VLKEBDataModule
from kedit_lightning.callbacks import metrics_table
from kedit_lightning.commands.shared import (
    TEXT_KIND,
    add_data_arguments,
    add_editor_arguments,
    load_editor_and_backbone,
)
from kedit_lightning.editor import evaluate, evaluate_sequential
from kedit_lightning.evaluation import HOPS, headline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_editor_arguments(parser)
    add_data_arguments(parser)
    add_image_arguments(parser)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="records per loaded batch (each record is still edited on its own)"
    )
    parser.add_argument(
        "--sequential", type=int, default=None, metavar="N", help="edit the first N records one after another"
    )
    parser.add_argument(
        "--probe", type=int, default=10, help="with --sequential: how many of the earliest edits to track"
    )
    parser.add_argument(
        "--hops", type=hop_list, default="all", help="portability hops to score: all (default) or e.g. 1,3 (VQA layout)"
    )
    parser.add_argument(
        "--require-port",
        action="store_true",
        help="score only records with a portability question at --hops (VLKEB's multi-hop runs)",
    )
    parser.add_argument(
        "--generate",
        action="store_true",
        help="also answer by greedy decoding and report exact match as gen_* keys (not with --sequential)",
    )
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def hop_list(text: str) -> list[int] | str:
    """`all` or comma-separated hop numbers (`1,3`)."""
    if text == "all":
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or hop numbers such as 1,3, got {text!r}") from None


def sequential_table(curve: list[dict]) -> str:
    keys = headline(curve[0])
    lines = ["| edits so far | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {point['n_edits']} | " + " | ".join(f"{point[key]:.3f}" for key in keys) + " |" for point in curve]
    return "\n".join(lines)


def image_datamodule(args: argparse.Namespace, data: Path, processor: SubBatchEncoder) -> EditDataModule:
    """The DataModule of a VQA (VLKEB superset) or caption file."""
    options = dict(
        train_file=data.name,
        val_file=data.name,
        image_root=str(Path(args.images).resolve()),
        batch_size=args.batch_size,
        vqa_template=args.vqa_template,
        processor=processor,
        extra_image_roots=tuple(str(Path(root).resolve()) for root in args.extra_image_root),
        max_image_pixels=args.max_image_pixels,
        max_frames=args.max_frames,
    )
    if file_is_ads(data):
        return ADSEditDataModule(str(data.parent), **options)
    if args.kind == "vqa":
        return VLKEBDataModule(str(data.parent), hops=args.hops, require_port=args.require_port, **options)
    return EditDataModule(str(data.parent), kind=args.kind, **options)


def run(args: argparse.Namespace) -> int:
    editor, backbone = load_editor_and_backbone(args)
    data = Path(args.data)
    datamodule = (
        TextEditDataModule(
            str(data.parent), data.name, data.name, batch_size=args.batch_size, processor=editor.processor(backbone)
        )
        if args.kind == TEXT_KIND
        else image_datamodule(args, data, editor.processor(backbone))
    )
    datamodule.setup("validate")
    problems = datamodule.visual_problems(type(backbone).visual_inputs, backbone.family)
    if problems:
        raise DataError(problems)
    groups = datamodule.metric_groups("val")
    loader = datamodule.val_dataloader()
    progress = not args.no_progress
    if args.sequential is not None and args.generate:
        raise ValueError("--generate scores records edited one at a time; it does not combine with --sequential")
    if args.sequential is not None:
        available = len(datamodule.split_records("val"))
        if not 0 < args.sequential <= available:
            raise ValueError(f"--sequential {args.sequential}: {data} has {available} records")
        report = evaluate_sequential(editor, backbone, loader, args.sequential, HOPS, args.probe, progress, groups)
    else:
        report = evaluate(editor, backbone, loader, HOPS, progress, groups, args.generate)
    token = {key: value for key, value in report.items() if key != "sequential"}
    exact = {**report["exact_match"], "n_edits": report["n_edits"]}
    print(metrics_table({"token accuracy": token, "exact match": exact}))
    if "sequential" in report:
        print(
            f"\nThe first {report['sequential']['probe_edits']} edits as more edits accumulate:\n"
            + sequential_table(report["sequential"]["curve"])
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
