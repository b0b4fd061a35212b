"""`kedit eval`: score an exported editor on a data file and print / write the metrics.

Each record is edited from the unedited weights (as in validation), or with `--sequential N` the
first N records are edited one after another and scored with the final weights, with a curve of
how the earliest edits' Reliability and Locality change as edits accumulate (`--curve DIR`: as
TensorBoard scalars against the number of edits, one run per editor, so editors share one plot).
Every table has the unedited model's column; `--protocol` chooses whose metric definitions score.

VQA-layout files are read as VLKEB reads them (a superset of E-VQA): portability questions are
scored per hop (`--hops` chooses), and the one-hop-edit variant applies its second edit before
scoring the question that depends on it.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from data_modules.datamodules import EditDataModule, TextEditDataModule
from data_modules.encoding import SubBatchEncoder
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
from kedit_lightning.editors.serac import EVERY_POSITION_REFUSED
from kedit_lightning.evaluation import EVERY_POSITION_PROTOCOLS, HOPS, PROTOCOLS, report_column


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
        "--probe",
        type=probe_count,
        default=10,
        help="with --sequential: how many of the earliest edits to track, or all (every edit so far)",
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
        "--protocol",
        choices=[*PROTOCOLS, "all"],
        default="kedit",
        help="whose metric definitions: kedit (default), easyedit, vlkeb, or all side by side (README)",
    )
    parser.add_argument(
        "--curve",
        default=None,
        metavar="DIR",
        help="with --sequential: the curve as TensorBoard scalars in DIR/<editor method> (tensorboard --logdir DIR)",
    )
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def probe_count(text: str) -> int | None:
    """`all` (None: every edit so far) or a positive count."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of edits or 'all', got {text!r}")
    return int(text)


def hop_list(text: str) -> list[int] | str:
    """`all` or comma-separated hop numbers (`1,3`)."""
    if text == "all":
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or hop numbers such as 1,3, got {text!r}") from None


def sequential_table(curve: Mapping[str, list]) -> str:
    keys = [key for key in curve if key != "n_edits"]
    lines = ["| edits so far | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for i, n in enumerate(curve["n_edits"]):
        lines.append(f"| {n} | " + " | ".join(f"{curve[key][i]:.3f}" for key in keys) + " |")
    return "\n".join(lines)


def write_curve(folder: Path, run: str, curve: Mapping[str, list]) -> Path:
    """The curve as TensorBoard scalars `sequential/<metric>` at step = edits so far, in `folder/run` (or
    `run_1`, ... when taken, so a second run is a line of its own): runs of several editors under one
    folder overlay in TensorBoard's plots."""
    names = itertools.chain([run], (f"{run}_{i}" for i in itertools.count(1)))
    out = next(folder / name for name in names if not (folder / name).exists())
    with SummaryWriter(str(out)) as writer:
        for key, values in curve.items():
            if key != "n_edits":
                for n, value in zip(curve["n_edits"], values):
                    writer.add_scalar(f"sequential/{key}", value, n)
    return out


def chosen_protocols(args: argparse.Namespace, edits_weights: bool) -> tuple[str, ...]:
    """The protocols `--protocol` names; for a memory editor (SERAC) `all` leaves out those it cannot score."""
    if args.protocol != "all":
        if args.protocol in EVERY_POSITION_PROTOCOLS and not edits_weights:
            raise ValueError(f"--protocol {args.protocol}: {EVERY_POSITION_REFUSED}")
        return (args.protocol,)
    if edits_weights:
        return PROTOCOLS
    print(f"--protocol all: {', '.join(EVERY_POSITION_PROTOCOLS)} left out: {EVERY_POSITION_REFUSED}")
    return tuple(p for p in PROTOCOLS if p not in EVERY_POSITION_PROTOCOLS)


def printed_table(report: Mapping[str, Any], protocols: tuple[str, ...]) -> str:
    """The unedited model beside the edited one: token accuracy and exact match, or with several protocols
    each protocol's token-level scores."""
    if len(protocols) > 1:
        edited = {protocol: report_column(report, protocol) for protocol in protocols}
        return metrics_table({"unedited": report_column(report, unedited=True), **edited})
    return metrics_table(
        {
            "unedited": report_column(report, unedited=True),
            "token accuracy": report_column(report),
            "unedited, exact": report_column(report, unedited=True, exact=True),
            "exact match": report_column(report, exact=True),
        }
    )


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
    )
    if args.kind == "vqa":
        return VLKEBDataModule(str(data.parent), hops=args.hops, require_port=args.require_port, **options)
    return EditDataModule(str(data.parent), kind=args.kind, **options)


def run(args: argparse.Namespace) -> int:
    if args.curve and args.sequential is None:
        raise ValueError("--curve: the curve comes from a sequential run; add --sequential N")
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
    loader = datamodule.val_dataloader()
    progress = not args.no_progress
    protocols = chosen_protocols(args, editor.edits_weights)
    if args.sequential is not None:
        available = len(datamodule.split_records("val"))
        if not 0 < args.sequential <= available:
            raise ValueError(f"--sequential {args.sequential}: {data} has {available} records")
        report = evaluate_sequential(editor, backbone, loader, args.sequential, HOPS, args.probe, progress, protocols)
    else:
        report = evaluate(editor, backbone, loader, HOPS, progress, protocols)
    print(printed_table(report, protocols))
    if "sequential" in report:
        curve = report["sequential"]["curve"]
        tracked = (
            "Every edit so far" if args.probe is None else f"The first {report['sequential']['probe_edits']} edits"
        )
        print(f"\n{tracked} as more edits accumulate:\n" + sequential_table(curve))
        if args.curve:
            print(f"\ncurve written to {write_curve(Path(args.curve), editor.method, curve)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
