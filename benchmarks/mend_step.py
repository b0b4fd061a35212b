"""MEND meta-training step: step time for a backbone config, and the fast path against the per-record oracle.

    python benchmarks/mend_step.py --backbone configs/backbones/blip2-tiny.yaml
    python benchmarks/mend_step.py --backbone configs/backbones/opt-125m-shaped.yaml --rank 1920 --edits 8 \
        --compare-oracle --json mend_step.json
    python benchmarks/mend_step.py --backbone configs/backbones/llava-1.5-7b.yaml --accelerator gpu \
        --dtype bfloat16 --precision bf16-mixed --rank 1920

Random weights at the config's real size; the tokenizer is the synthetic world's word tokenizer
(written to --data-dir when missing), so nothing is downloaded: the architecture, not the
vocabulary, sets the cost (the embedding keeps the config's `vocab_size`).

Without --compare-oracle, steps run through a Lightning Trainer (the editor's optimizer step and
gradient clipping included). With --compare-oracle, each batch is timed, interleaved in one process,
three ways: the fast step (`outer_losses`), the oracle step (tests/oracle.py's `mend_step_losses`,
seven full-depth forwards per record), both with backward, clipping and the Adam step; and one
no-grad full-depth forward over the step's five sub-batches, the floor a step is measured against.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, Trainer
from lightning.fabric.utilities.apply_func import move_data_to_device

from data_modules.datamodules import VQADataModule
from data_modules.datasets import EditCollator
from data_modules.encoding import SUB_BATCH_KEYS, SubBatchEncoder
from kedit_lightning.backbones import Backbone, build_backbone, load_backbone_spec
from kedit_lightning.editors.mend import MEND
from kedit_lightning.modules import MENDModule
from kedit_lightning.modules.mend import editor_optimizer, outer_losses

# The oracle is test code (tests/oracle.py), not part of the package: put the repository's tests/
# folder on the path to import it rather than ship a second copy of the slow path in the library.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracle import mend_step_losses  # noqa: E402

LOSS_WEIGHTS = {"edit": 0.1, "image_edit": 0.1, "loc": 1.0}  # MENDModule's cedit, iedit, cloc defaults
CLIP = 100.0


class StepTimer(Callback):
    """Wall time of every training step (optimizer step included), synchronised on GPUs."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(trainer.strategy.root_device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(trainer.strategy.root_device)
        self.seconds.append(time.perf_counter() - self._start)


class TextOnly:
    """A text backbone's encoder behind the collator's interface: the same prompts and targets, images dropped."""

    def __init__(self, encode: SubBatchEncoder) -> None:
        self.encode = encode

    def __call__(self, prompts: Sequence[str], targets: Sequence[str], images: Any = None) -> dict[str, Any]:
        return self.encode(prompts, targets, None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def encoder(backbone: Backbone) -> Callable[..., dict[str, Any]]:
    return TextOnly(backbone.processor) if backbone.family == "text" else backbone.processor


def train_step(losses: Callable, editor: MEND, backbone: Backbone, optimizer: torch.optim.Optimizer, batch, autocast):
    """One MEND training step as MENDModule takes it: weighted outer loss, backward, statistics, clip, Adam."""
    with autocast:
        parts = losses(editor, backbone, batch)
        loss = sum(LOSS_WEIGHTS[k] * v for k, v in parts.items())
    loss.backward()
    editor.commit_statistics(editor.take_pending_statistics())
    torch.nn.utils.clip_grad_norm_(editor.parameters(), CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in parts.items()}


def timed(device: torch.device, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(milliseconds, result) of fn(*args)."""
    sync(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return (time.perf_counter() - start) * 1e3, out


def compare_oracle(args, data: VQADataModule, backbone: Backbone, device: torch.device) -> dict[str, Any]:
    """Fast step, oracle step and one full forward, interleaved on the same batches; medians in ms."""
    data.setup("fit")
    dataset = data.build_dataset("train")
    collate = EditCollator(encoder(backbone))
    n = args.warmup + args.steps
    batches = [
        move_data_to_device(collate([dataset[(i * args.edits + j) % len(dataset)] for j in range(args.edits)]), device)
        for i in range(n)
    ]
    fast = MEND.for_backbone(backbone, rank=args.rank).to(device).train()
    oracle = copy.deepcopy(fast)
    optimizers = {e: editor_optimizer(e, lr=1e-4, lr_lr=1e-4) for e in (fast, oracle)}
    mixed = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=mixed) if mixed else nullcontext()

    def forward(batch: Mapping[str, Any]) -> None:
        with torch.no_grad(), autocast:
            for key in SUB_BATCH_KEYS:
                backbone(batch[key])

    samples: dict[str, list[float]] = {"fast_step_ms": [], "oracle_step_ms": [], "forward_ms": []}
    for i, batch in enumerate(batches):
        fast_ms, fast_parts = timed(device, train_step, outer_losses, fast, backbone, optimizers[fast], batch, autocast)
        oracle_ms, oracle_parts = timed(
            device, train_step, mend_step_losses, oracle, backbone, optimizers[oracle], batch, autocast
        )
        forward_ms, _ = timed(device, forward, batch)
        if i == 0:  # same editor, same batch: the two paths must give the same losses
            for key in oracle_parts:
                # A fresh editor barely changes the model, so its KL term is ~0 and only rounding differs
                # (~1e-6 seen): atol 1e-5, a millionth of an NLL term (~ln V).
                torch.testing.assert_close(fast_parts[key], oracle_parts[key], rtol=1e-4, atol=1e-5)
        if i >= args.warmup:
            for key, ms in zip(samples, (fast_ms, oracle_ms, forward_ms)):
                samples[key].append(ms)
        label = "warmup" if i < args.warmup else "timed"
        print(f"batch {i} ({label}): fast {fast_ms:.0f} ms, oracle {oracle_ms:.0f} ms, forward {forward_ms:.0f} ms")
    result = {key: statistics.median(values) for key, values in samples.items()}
    result["speedup"] = result["oracle_step_ms"] / result["fast_step_ms"]
    result["ratio_to_forward"] = result["fast_step_ms"] / result["forward_ms"]
    # Per-batch ratios (the three timings of a batch run back to back): steadier on a shared machine.
    fast_ms, oracle_ms, forward_ms = samples.values()
    result["paired_speedup"] = statistics.median(o / f for o, f in zip(oracle_ms, fast_ms))
    result["paired_ratio_to_forward"] = statistics.median(f / w for f, w in zip(fast_ms, forward_ms))
    result["samples"] = samples
    result["editor_params"] = sum(p.numel() for p in fast.parameters())
    result["tokens_per_step"] = {key: list(batches[0][key]["input_ids"].shape) for key in SUB_BATCH_KEYS}
    return result


def train_with_trainer(args, data: VQADataModule, backbone: Backbone, spec) -> dict[str, Any]:
    """Steps of MENDModule through a Lightning Trainer; median step time and edits per second."""
    module = MENDModule(spec, rank=args.rank, lr=1e-4, edit_lr=1e-4)
    module.backbone = backbone  # built already; configure_model keeps it
    module.build_editor(backbone)
    timer = StepTimer()
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=CLIP,
        callbacks=[timer],
    )
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    samples = [s * 1e3 for s in timer.seconds[args.warmup :]]
    step = statistics.median(samples)
    result = {"step_ms": step, "edits_per_s": args.edits / (step / 1e3), "samples": samples}
    result["editor_params"] = sum(p.numel() for p in module.editor.parameters())
    if trainer.strategy.root_device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", required=True, help="a configs/backbones/*.yaml BackboneSpec")
    parser.add_argument("--data-dir", default="data/synthetic", help="the synthetic world (written if missing)")
    parser.add_argument("--edits", type=int, default=4, help="edits (records) per meta-training step")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after --warmup untimed ones")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compare-oracle", action="store_true", help="time the fast step against the oracle's")
    parser.add_argument("--json", help="write the results (medians in ms) to this file")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's, or OMP_NUM_THREADS)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the frozen backbone's dtype")
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = VQADataModule(
        args.data_dir,
        train_file="vqa/vqa_train.json",
        val_file="vqa/vqa_eval.json",
        batch_size=args.edits,
        synthesize=True,
    )
    data.prepare_data()
    spec = load_backbone_spec(args.backbone)
    config = {k: v for k, v in spec.config.items() if k != "image_token_index"}  # the word tokenizer's <image> id
    spec = dataclasses.replace(
        spec, processor=str(Path(args.data_dir) / "tokenizer"), config=config, dtype=args.dtype, pretrained=None
    )
    torch.manual_seed(0)
    backbone = build_backbone(spec).eval()
    data.processor = encoder(backbone)
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else args.accelerator)
    if args.compare_oracle:
        result = compare_oracle(args, data, backbone.to(device), device)
    else:
        result = train_with_trainer(args, data, backbone, spec)

    result = {
        "backbone": args.backbone,
        "backbone_params": sum(p.numel() for p in backbone.parameters()),
        "edited_weights": len(backbone.edit_param_names),
        "edits": args.edits,
        "rank": args.rank,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "device": str(device),
        "dtype": args.dtype,
        "precision": args.precision,
        **result,
    }
    print(f"backbone  {args.backbone} ({result['backbone_params'] / 1e6:.1f} M parameters, {args.dtype}), {device}")
    print(
        f"editor    {result['editor_params'] / 1e6:.2f} M parameters, rank {args.rank}, "
        f"{result['edited_weights']} edited weights"
    )
    print(
        f"timing    median of {args.steps} steps after {args.warmup} warmup, {result['threads']} thread(s), "
        f"{args.edits} edits a step"
    )
    if args.compare_oracle:
        print("| fast step | oracle step | speedup | full forward | fast / forward |")
        print("|---|---|---|---|---|")
        print(
            f"| {result['fast_step_ms']:.0f} ms | {result['oracle_step_ms']:.0f} ms | {result['speedup']:.2f}x "
            f"| {result['forward_ms']:.0f} ms | {result['ratio_to_forward']:.2f} |"
        )
        print(
            f"per-batch ratios (median): speedup {result['paired_speedup']:.2f}x, "
            f"fast / forward {result['paired_ratio_to_forward']:.2f}"
        )
    else:
        print(
            f"step time {result['step_ms']:.1f} ms (min {min(result['samples']):.1f}, max {max(result['samples']):.1f})"
        )
        print(f"edits/s   {result['edits_per_s']:.2f}")
        if "peak_memory_gib" in result:
            print(f"peak mem  {result['peak_memory_gib']:.2f} GiB allocated on the GPU")
    if device.type != "cuda":
        print(f"peak mem  {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (process)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
