"""Lifelong editors (GRACE, WISE) in sequence on the quick-start backbone: `evaluate_sequential`'s report.

    PYTHONPATH=. python benchmarks/lifelong_editors.py --editor grace --edits 100
    PYTHONPATH=. python benchmarks/lifelong_editors.py --editor wise --edits 100 --json wise.json
    PYTHONPATH=. python benchmarks/lifelong_editors.py --editor wise --set act_ratio=0.88

The editor comes from its config (class_path + init_args of a class in `artifact.EDITORS`), not from an
artifact: these editors are not meta-trained. The backbone is the quick start's (`configs/quickstart.yaml`,
its base model built first by `python train.py fit --config configs/quickstart.yaml` or the bootstrap
config); the first `--edits` records of `--data` are edited one after another, each on top of the
previous ones, and the edits in force (and, apart, all of them) are scored on the final model (the
curve scores those of the first 10 still in force as edits accumulate). Neither editor learns from data,
so the train split's records are as unseen as the eval split's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from data_modules.datamodules import VQADataModule
from kedit_lightning.artifact import EDITORS
from kedit_lightning.backbones import BackboneSpec, build_backbone
from kedit_lightning.baselines import baseline_path
from kedit_lightning.editor import Editor, evaluate_sequential
from kedit_lightning.evaluation import headline


def editor_from_config(path: str, overrides: list[str]) -> tuple[str, torch.nn.Module]:
    """(method name, editor) of a `class_path` + `init_args` YAML (a named baseline or a file) naming a class
    in `EDITORS`, with `key=value` overrides of its init_args (values read as YAML)."""
    config = yaml.safe_load(baseline_path(path).read_text())
    for override in overrides:
        key, _, value = override.partition("=")
        config.setdefault("init_args", {})[key] = yaml.safe_load(value)
    by_class = {f"{cls.__module__}.{cls.__name__}": name for name, cls in EDITORS.items()}
    if config.get("class_path") not in by_class:
        raise ValueError(f"{path}: class_path {config.get('class_path')!r} is not one of {sorted(by_class)}")
    name = by_class[config["class_path"]]
    return name, EDITORS[name].from_config(config.get("init_args", {}))


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--editor",
        required=True,
        help="a named baseline (grace, wise: kedit_lightning/configs/editors) or an editor config YAML",
    )
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE: override one of its init_args")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="fit config whose backbone is used")
    parser.add_argument("--data-dir", default="data/synthetic")
    parser.add_argument("--data", default="vqa/vqa_train.json", help="records file, relative to --data-dir")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # GRACE's cold-started values
    spec = yaml.safe_load(Path(args.config).read_text())["model"]["init_args"]["backbone"]
    backbone = build_backbone(BackboneSpec(**{**spec, "bootstrap": None})).eval()
    method, module = editor_from_config(args.editor, args.set)
    editor = Editor({"method": method, "backbone_fingerprint": backbone.fingerprint()}, args.editor, module)
    data = VQADataModule(args.data_dir, args.data, args.data, processor=backbone.processor, batch_size=8)
    data.setup("validate")
    start = time.perf_counter()
    report = evaluate_sequential(editor, backbone, data.val_dataloader(), args.edits, progress=False)
    seconds = time.perf_counter() - start
    report = {"editor": args.editor, "config": module.config, "data": args.data, "seconds": seconds, **report}
    keys, sequential = headline(report), report["sequential"]
    print(
        f"{method} after {args.edits} sequential edits ({seconds:.0f} s), the {sequential['edits_in_force']} in force: "
        + ", ".join(f"{k} {report[k]:.3f}" for k in keys)
    )
    print(
        "  all edits, each against its own target: " + ", ".join(f"{k} {sequential['all_edits'][k]:.3f}" for k in keys)
    )
    curve = sequential["curve"]
    for i, n in enumerate(curve["n_edits"]):
        print(f"  first 10, those in force, after {n:>4} edits: " + ", ".join(f"{k} {curve[k][i]:.3f}" for k in keys))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
