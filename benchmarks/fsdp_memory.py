"""GPU memory of sharded (FSDP2) MEND training per GPU, from a backbone config: a Markdown table.

    python benchmarks/fsdp_memory.py
    python benchmarks/fsdp_memory.py --backbone configs/backbones/llava-1.5-7b.yaml --no-activations

Parameter rows: the config's model on the meta device (instant) and the formula in
BENCHMARKS.md (FSDP section). Activations: the bytes one training record's outer loss (`outer_losses`,
bf16 autocast, CPU) leaves saved for the step's backward, on the synthetic world's first VQA record
(word tokenizer: prompts a little shorter than with real subword tokenizers). The model runs at full
width with its depth cut (--lm-layers, --vision-layers), the edited layers renumbered to stay on top:
nothing below the first edited layer, nor the frozen vision side, saves anything for backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import re
import resource
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from data_modules.datamodules import VQADataModule
from kedit_lightning.backbones import FAMILIES, BackboneSpec, expand_braces, load_backbone_spec
from kedit_lightning.editors.mend import MEND
from kedit_lightning.evaluation import record_batches
from kedit_lightning.modules import MENDModule
from kedit_lightning.modules.mend import outer_losses
from kedit_lightning.sharding import shard_units

GB = 1e9


def parameter_counts(spec: BackboneSpec, rank: int) -> tuple[int, int, int, int, int]:
    """The memory formula's (P, P_e, P_r, largest unit, E) for `spec`'s model, built on the meta device:
    parameters, edited ones (kept whole), the root unit's (outside every block), the most sharded
    parameters one block gathers, and the MEND editor's at `rank`."""
    with torch.device("meta"):
        model = FAMILIES[spec.family].build_model(spec.config, spec.dtype)
        params = dict(model.named_parameters())
        edited = {id(params[n]) for pattern in spec.edit_params for n in expand_braces(pattern)}
        editor = MEND({n: tuple(p.shape) for n, p in params.items() if id(p) in edited}, rank=rank)
    units = [list(unit.parameters()) for unit in shard_units(model)]
    in_units = {id(p) for unit in units for p in unit}
    total, root = (
        sum(p.numel() for p in params.values()),
        sum(p.numel() for p in params.values() if id(p) not in in_units),
    )
    largest = max(sum(p.numel() for p in unit if id(p) not in edited) for unit in units)
    return (
        total,
        sum(p.numel() for p in params.values() if id(p) in edited),
        root,
        largest,
        sum(p.numel() for p in editor.parameters()),
    )


def cut_depth(spec: BackboneSpec, lm_layers: int, vision_layers: int) -> BackboneSpec:
    """`spec` with `lm_layers` language-model layers, the edited ones renumbered so the top one stays on top."""
    config = {
        k: ({**v, "num_hidden_layers": vision_layers} if isinstance(v, dict) and "num_hidden_layers" in v else v)
        for k, v in spec.config.items()
    }
    config["text_config"] = {**spec.config["text_config"], "num_hidden_layers": lm_layers}
    config.pop("image_token_index", None)  # the word tokenizer's <image> id replaces it
    shift = spec.config["text_config"]["num_hidden_layers"] - lm_layers
    edited = [
        re.sub(r"\.layers\.(\d+)\.", lambda m: f".layers.{int(m.group(1)) - shift}.", n)
        for p in spec.edit_params
        for n in expand_braces(p)
    ]
    if any(re.search(r"\.layers\.-", n) for n in edited):
        raise ValueError(f"--lm-layers {lm_layers} is too few to keep every edited layer of {spec.edit_params}")
    return dataclasses.replace(spec, config=config, edit_params=edited, pretrained=None)


class Held:
    """A saved tensor as an autograd graph holds it: alive exactly as long as that graph."""

    __slots__ = ("tensor", "__weakref__")


class SavedTensors:
    """saved_tensors_hooks that track what autograd graphs hold for backward, parameters aside."""

    def __init__(self, parameters: list[torch.Tensor]) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in parameters}
        self.held: weakref.WeakSet[Held] = weakref.WeakSet()  # drops what a freed graph held

    def pack(self, tensor: torch.Tensor) -> Held | torch.Tensor:
        if tensor.untyped_storage().data_ptr() in self.skip:
            return tensor
        held = Held()
        held.tensor = tensor
        self.held.add(held)
        return held

    @staticmethod
    def unpack(saved: Held | torch.Tensor) -> torch.Tensor:
        return saved.tensor if isinstance(saved, Held) else saved

    def nbytes(self) -> int:  # per storage: a tensor saved twice, or views of one, count once
        return sum(
            {h.tensor.untyped_storage().data_ptr(): h.tensor.untyped_storage().nbytes() for h in self.held}.values()
        )


def activation_bytes(spec: BackboneSpec, data_dir: str, rank: int) -> tuple[int, int]:
    """(bytes saved for the step's backward, longest sequence) of one training record."""
    data = VQADataModule(data_dir, train_file="vqa/vqa_train.json", val_file="vqa/vqa_eval.json", synthesize=True)
    data.prepare_data()
    module = MENDModule(dataclasses.replace(spec, processor=str(Path(data_dir) / "tokenizer")), rank=rank)
    module.configure_model()
    module.train()
    data.processor = module.backbone.processor
    data.setup("fit")
    record = next(record_batches(data.build_collator()([data.build_dataset("train")[0]])))
    saved = SavedTensors([*module.parameters(), *module.buffers()])
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack),
    ):
        losses = outer_losses(module.editor, module.backbone, record)
    # Counted while `losses` keeps the record's graph, as a step does until its backward; the
    # edit's own graph (the capture) is already freed, after the gradient it was built for.
    nbytes = saved.nbytes()
    del losses
    return nbytes, max(
        sub["input_ids"].shape[1] for sub in record.values() if isinstance(sub, dict) and "input_ids" in sub
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backbone",
        nargs="+",
        default=["configs/backbones/llava-1.5-7b.yaml", "configs/backbones/minigpt4-vicuna-7b.yaml"],
    )
    parser.add_argument(
        "--dtype", default="bfloat16", help="the frozen backbone's dtype (as configs/mend/*7b*.yaml set it)"
    )
    parser.add_argument("--rank", type=int, default=1920, help="MEND's rank (MENDModule's default)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--no-activations", action="store_true", help="parameter rows only (no model is built)")
    parser.add_argument("--lm-layers", type=int, default=4, help="language-model depth for the activation measurement")
    parser.add_argument("--vision-layers", type=int, default=2, help="depth of every other tower (vision, Q-Former)")
    parser.add_argument("--data-dir", default="data/synthetic", help="the synthetic world (written if missing)")
    args = parser.parse_args()

    start = time.perf_counter()
    labels = [
        "parameters (edited / outside blocks)",
        f"sharded backbone, {args.dtype}",
        "kept whole (edited weights + embeddings, head, projector)",
        "layers gathered at once",
        f"editor (weights, gradients, Adam; rank {args.rank})",
        "activations per record (sequence length)",
        "1 GPU, no FSDP",
        "N = " + " / ".join(map(str, args.gpus)),
    ]
    columns: dict[str, list[str]] = {}
    for path in args.backbone:
        spec = dataclasses.replace(load_backbone_spec(path), dtype=args.dtype)
        (P, P_e, P_r, unit, E), b = parameter_counts(spec, args.rank), getattr(torch, args.dtype).itemsize
        # BENCHMARKS.md's formula: two blocks gathered at once (the running one, the prefetched next);
        # the editor's float32 weight, gradient and two Adam moments are 16 bytes a parameter.
        sharded, whole, gathered, editor = b * (P - P_e - P_r), b * (P_e + P_r), 2 * b * unit, 16 * E
        act, act_cell = 0, "not measured"
        if not args.no_activations:
            # A fresh process per backbone: the allocator keeps what one model freed, which would add
            # to the next one's peak.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                act, length = pool.submit(
                    activation_bytes, cut_depth(spec, args.lm_layers, args.vision_layers), args.data_dir, args.rank
                ).result()
            act_cell = f"{act / GB:.1f} GB ({length})"
        columns[Path(path).stem] = [
            f"{P / 1e9:.3f}B ({P_e / 1e6:.1f}M / {P_r / 1e6:.1f}M)",
            f"{sharded / GB:.1f} / N GB",
            f"{whole / GB:.1f} GB",
            f"{gathered / GB:.1f} GB (2 x {unit / 1e6:.0f}M)",
            f"{editor / GB:.1f} GB ({E / 1e6:.1f}M)",
            act_cell,
            f"{(b * P + editor + act) / GB:.1f} GB",
            " / ".join(f"{(sharded / n + whole + gathered + editor + act) / GB:.1f}" for n in args.gpus) + " GB",
        ]

    print("| | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
    for i, label in enumerate(labels):
        print(f"| {label} | " + " | ".join(cells[i] for cells in columns.values()) + " |")
    if not args.no_activations:
        print(
            f"\nActivations: one synthetic VQA record, bf16 autocast on the CPU, {args.lm_layers} LM layers "
            f"(the edited ones on top) and {args.vision_layers} in each other tower, full width. "
            "One record per GPU; GB = 10^9 bytes."
        )
    peak_rss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"({time.perf_counter() - start:.0f} s, peak host memory {peak_rss / 2**20:.1f} GiB in one process)")


if __name__ == "__main__":
    main()
