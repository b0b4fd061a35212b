"""`kedit eval`: score an exported editor on a data file and print / write the metrics.

Each record is edited from the unedited weights (as in validation), or with `--sequential N` the
first N records are edited one after another and scored with the final weights, with a curve of
how the earliest edits' Reliability and Locality change as edits accumulate (`--curve DIR`: as
TensorBoard scalars against the number of edits, one run per editor, so editors share one plot).
Every table has the unedited model's column; `--protocol` chooses whose metric definitions score.

ADS-Edit files (records with an `image_type`) are read as such, and every metric is also reported per
`data_type` and per `image_type`. VQA-layout files are read as VLKEB reads them (a superset of E-VQA):
portability questions are scored per hop (`--hops` chooses), and the one-hop-edit variant applies its second edit before
scoring the question that depends on it.

`--baseline NAME` (repeatable) adds a baseline editor's scores on the same backbone and records
(`baselines.py`: ft-l, lora, ike, unedited, ft, or a YAML file with class_path / init_args); with a
backbone YAML as `--backbone`, baselines run without an exported editor.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from data_modules.ads import ADSEditDataModule
from data_modules.ads_records import file_is_ads
from data_modules.datamodules import EditDataModule, TextEditDataModule
from data_modules.encoding import SubBatchEncoder
from data_modules.records import DataError, read_records
from data_modules.text_records import read_text_records
from data_modules.validate import add_image_arguments
from data_modules.vlkeb import VLKEBDataModule
from kedit_lightning.backbones import Backbone, build_backbone, load_backbone_spec
from kedit_lightning.baselines import load_baseline
from kedit_lightning.callbacks import metrics_table
from kedit_lightning.commands.shared import (
    TEXT_KIND,
    add_data_arguments,
    add_editor_arguments,
    check_device_and_dtype,
    load_editor_and_backbone,
    resolve_kind,
)
from kedit_lightning.editor import evaluate, evaluate_sequential
from kedit_lightning.editors.edited_model import WeightEditor
from kedit_lightning.editors.ike import IKE
from kedit_lightning.editors.mend import MEND
from kedit_lightning.editors.serac import EVERY_POSITION_REFUSED, SERAC
from kedit_lightning.editors.unedited import Unedited
from kedit_lightning.evaluation import EVERY_POSITION_PROTOCOLS, HOPS, PROTOCOLS, report_column


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_editor_arguments(parser, editor_required=False)
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="NAME",
        help="also score a baseline on the same backbone and records: ft-l, lora, ike, unedited, ft "
        "(the package's configs/editors/NAME.yaml) or a YAML file with class_path / init_args; repeatable. "
        "Without --editor, "
        "--backbone is a backbone YAML (configs/backbones/*.yaml)",
    )
    parser.add_argument(
        "--demonstrations",
        default=None,
        metavar="FILE",
        help="--baseline ike: the training edits its demonstrations come from (same layout as --data)",
    )
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
        "--generate",
        action="store_true",
        help="also answer by greedy decoding and report exact match as gen_* keys (not with --sequential)",
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
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="P",
        help="SERAC: route an input to an edit when the scope probability is >= P (default: the artifact's)",
    )
    parser.add_argument(
        "--recency-margin",
        type=float,
        default=None,
        metavar="M",
        help="SERAC: the newest of the entries within M (log-probability) of an input's best wins "
        "(default: the artifact's)",
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


def chosen_protocols(args: argparse.Namespace, answer_only: Sequence[str]) -> tuple[str, ...]:
    """The protocols `--protocol` names. `answer_only`: the scored editors that answer only at the answer
    positions (SERAC, IKE, GRACE, WISE: not weight editors); with any, asking for a protocol that reads every
    position alone is refused, and `all` keeps it for the other columns only (`column_protocols`)."""
    if not answer_only:
        return PROTOCOLS if args.protocol == "all" else (args.protocol,)
    if args.protocol == "all":
        print(
            f"--protocol all: {', '.join(EVERY_POSITION_PROTOCOLS)} left out for {', '.join(answer_only)}: they "
            "answer only at the answer positions, and that protocol reads every position"
        )
        return PROTOCOLS
    if args.protocol in EVERY_POSITION_PROTOCOLS:
        why = (
            EVERY_POSITION_REFUSED
            if list(answer_only) == ["serac"]
            else f"{', '.join(answer_only)} answer only at the answer positions, and that protocol reads every "
            "position: use protocol kedit or vlkeb, or score them in a run of their own"
        )
        raise ValueError(f"--protocol {args.protocol}: {why}")
    return (args.protocol,)


def column_protocols(protocols: tuple[str, ...], module: Any) -> tuple[str, ...]:
    """The protocols one editor's column is scored under: those that read every position need a weight editor."""
    if isinstance(module, WeightEditor):
        return protocols
    return tuple(protocol for protocol in protocols if protocol not in EVERY_POSITION_PROTOCOLS)


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


def compared_table(columns: Mapping[str, Mapping[str, Any]]) -> str:
    """Several editors' reports (the same records) beside the unedited model: token accuracy, then exact match."""
    unedited = next(iter(columns.values()))
    tables = []
    for title, exact in (("Token accuracy", False), ("Exact match", True)):
        table = {"unedited": report_column(unedited, unedited=True, exact=exact)}
        table |= {name: report_column(report, exact=exact) for name, report in columns.items()}
        tables.append(f"{title}:\n" + metrics_table(table))
    return "\n\n".join(tables)


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


def load_baselines(args: argparse.Namespace) -> dict[str, Any]:
    """The `--baseline` editors by name, IKE given its demonstrations; checked before any model loads."""
    baselines = dict(load_baseline(spec) for spec in args.baseline)
    for name, editor in baselines.items():
        if isinstance(editor, IKE):
            if args.demonstrations is None:
                raise ValueError(f"--baseline {name}: IKE needs --demonstrations FILE (training edits)")
            read = read_text_records if resolve_kind(args) == TEXT_KIND else read_records
            editor.demonstrate(read(args.demonstrations))
    return baselines


def load_backbone(args: argparse.Namespace) -> tuple[Any, Backbone]:
    """(the exported editor or None, the backbone): without --editor, --backbone is a backbone YAML."""
    if args.editor is not None:
        return load_editor_and_backbone(args)
    if not args.baseline:
        raise ValueError("--editor: required (or --baseline NAME with a backbone YAML as --backbone)")
    for flag, value in (
        ("--max-edit-ratio", args.max_edit_ratio),
        ("--threshold", args.threshold),
        ("--recency-margin", args.recency_margin),
    ):
        if value is not None:
            raise ValueError(f"{flag}: applies to an exported editor (MEND's limit, SERAC's routing); give --editor")
    if not args.backbone.endswith((".yaml", ".yml")):
        raise ValueError(f"--backbone {args.backbone}: without --editor, give a backbone YAML (configs/backbones/)")
    check_device_and_dtype(args.device, args.dtype)
    resolve_kind(args)
    spec = load_backbone_spec(args.backbone)
    if args.dtype is not None:
        spec.dtype = args.dtype
    return None, build_backbone(spec).to(args.device).eval()


def set_routing(args: argparse.Namespace, editor: Any) -> dict[str, float] | None:
    """Apply `--threshold` / `--recency-margin` to an exported SERAC editor; the routing it then uses (None: none
    given to another editor)."""
    flags = [
        flag
        for flag, value in (("--threshold", args.threshold), ("--recency-margin", args.recency_margin))
        if value is not None
    ]
    serac = editor.editor if editor is not None and isinstance(editor.editor, SERAC) else None
    if serac is None:
        if flags:
            held = f"{args.editor} is a {editor.method} editor"
            raise ValueError(f"{' and '.join(flags)}: only a SERAC editor routes inputs, and {held}")
        return None
    try:
        serac.set_routing(args.threshold, args.recency_margin)
    except ValueError as err:
        raise ValueError(f"{' and '.join(flags)}: {err}") from None
    return {"threshold": serac.threshold, "recency_margin": serac.recency_margin}


def run(args: argparse.Namespace) -> int:
    if args.curve and args.sequential is None:
        raise ValueError("--curve: the curve comes from a sequential run; add --sequential N")
    baselines = load_baselines(args)
    editor, backbone = load_backbone(args)
    routing = set_routing(args, editor)
    processor = backbone.processor if editor is None else editor.processor(backbone)
    data = Path(args.data)
    datamodule = (
        TextEditDataModule(str(data.parent), data.name, data.name, batch_size=args.batch_size, processor=processor)
        if args.kind == TEXT_KIND
        else image_datamodule(args, data, processor)
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
    # The every-position protocols need every editor scored to answer at every position: weight editors do.
    modules = {**({editor.method: editor.editor} if editor is not None else {}), **baselines}
    chosen = chosen_protocols(args, [name for name, module in modules.items() if not isinstance(module, WeightEditor)])
    if args.sequential is not None:
        available = len(datamodule.split_records("val"))
        if not 0 < args.sequential <= available:
            raise ValueError(f"--sequential {args.sequential}: {data} has {available} records")

    def score(scored_editor: Any, protocols: tuple[str, ...], unedited: bool) -> dict[str, Any]:
        if args.sequential is not None:
            return evaluate_sequential(
                scored_editor, backbone, loader, args.sequential, HOPS, args.probe, progress, groups, protocols
            )
        return evaluate(scored_editor, backbone, loader, HOPS, progress, groups, args.generate, protocols, unedited)

    # The unedited model is the same for every column: scored once, beside the first editor.
    report = score(editor, column_protocols(chosen, editor.editor), unedited=True) if editor is not None else {}
    scored = {
        name: score(baseline, column_protocols(chosen, baseline), unedited=not i and editor is None)
        for i, (name, baseline) in enumerate(baselines.items())
    }
    columns = ({editor.method: report} if editor is not None else {}) | scored
    first, *others = modules
    first_protocols = column_protocols(chosen, modules[first])
    missing = tuple(p for p in chosen if p not in first_protocols)
    if missing and any(set(missing) & set(column_protocols(chosen, modules[name])) for name in others):
        # The first column answers at the answer positions only; the unedited model under the protocols that read
        # every position comes from a pass of its own (a no-op weight editor), for the columns scored under them.
        before = score(Unedited(), (first_protocols[0], *missing), unedited=True)
        columns[first].update({key: value for key, value in before.items() if key.split("/pre_")[0] in missing})
    print(
        printed_table(report, column_protocols(chosen, modules[editor.method]))
        if not scored
        else compared_table(columns)
    )
    for name, scored_report in columns.items():
        if "sequential" in scored_report:
            curve = scored_report["sequential"]["curve"]
            tracked = (
                "every edit so far"
                if args.probe is None
                else f"the first {scored_report['sequential']['probe_edits']} edits"
            )
            print(f"\n{name}: {tracked} as more edits accumulate:\n" + sequential_table(curve))
            in_force, all_edits = (
                scored_report["sequential"]["edits_in_force"],
                scored_report["sequential"]["all_edits"],
            )
            if in_force < args.sequential:
                print(
                    f"\n{name}: the table scores the {in_force} edits in force ({args.sequential - in_force} "
                    f"superseded by a later edit of the same fact); all {args.sequential} edits, each against its own "
                    "target:\n" + printed_table(all_edits, column_protocols(chosen, modules[name]))
                )
            left_out = {key: n for key, n in scored_report["sequential"]["locality_edited"].items() if n}
            if left_out:
                print(
                    f"\n{name}: locality leaves out the inputs that the sequence itself edits (their answers are meant "
                    "to change): " + ", ".join(f"{key} {n}" for key, n in left_out.items())
                )
            if args.curve:
                print(f"curve written to {write_curve(Path(args.curve), name, curve)}")
    if scored:
        report["baselines"] = scored
    if routing is not None:
        report["routing"] = routing
    if editor is not None and isinstance(editor.editor, MEND) and editor.editor.max_edit_ratio is not None:
        report["max_edit_ratio"] = editor.editor.max_edit_ratio  # from --max-edit-ratio or the artifact
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
