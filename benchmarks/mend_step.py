"""MEND meta-training step: step time, edits per second and peak memory for a backbone config.

    python benchmarks/mend_step.py --backbone configs/backbones/blip2-tiny.yaml
    python benchmarks/mend_step.py --backbone configs/backbones/llava-1.5-7b.yaml --accelerator gpu \
        --dtype bfloat16 --precision bf16-mixed --rank 1920

Random weights at the config's real size; the tokenizer is the synthetic world's word tokenizer
(written to --data-dir when missing), so nothing is downloaded: the architecture, not the
vocabulary, sets the cost (the embedding keeps the config's `vocab_size`). Steps run through a
Lightning Trainer, so the figures include the editor's optimizer step and gradient clipping.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time
from pathlib import Path

import torch
from lightning import Callback, Trainer

from data_modules.datamodules import VQADataModule
from kedit_lightning.backbones import load_backbone_spec
from kedit_lightning.modules import MENDModule


class StepTimer(Callback):
    """Wall time of every training step (optimizer step included), synchronised on GPUs."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def _sync(self, trainer: Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)
        self.seconds.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", required=True, help="a configs/backbones/*.yaml BackboneSpec")
    parser.add_argument("--data-dir", default="data/synthetic", help="the synthetic world (written if missing)")
    parser.add_argument("--edits", type=int, default=4, help="edits (records) per meta-training step")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after --warmup untimed ones")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the frozen backbone's dtype")
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()

    data = VQADataModule(
        args.data_dir,
        train_file="vqa/vqa_train.json",
        val_file="vqa/vqa_eval.json",
        batch_size=args.edits,
        synthesize=True,
    )
    data.prepare_data()
    spec = load_backbone_spec(args.backbone)
    config = {
        k: v for k, v in spec.config.items() if k != "image_token_index"
    }  # the word tokenizer's <image> id replaces it
    spec = dataclasses.replace(
        spec, processor=str(Path(args.data_dir) / "tokenizer"), config=config, dtype=args.dtype, pretrained=None
    )
    module = MENDModule(spec, rank=args.rank, lr=1e-4, edit_lr=1e-4)
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
        gradient_clip_val=100,
        callbacks=[timer],
    )
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)

    timed = timer.seconds[args.warmup :]
    step = statistics.median(timed)
    backbone_params = sum(p.numel() for p in module.backbone.parameters())
    editor_params = sum(p.numel() for p in module.editor.parameters())
    print(
        f"backbone       {args.backbone} ({backbone_params / 1e6:.1f} M parameters, {args.dtype}), device "
        f"{trainer.strategy.root_device}"
    )
    print(
        f"editor         {editor_params / 1e6:.2f} M parameters, rank {args.rank}, {len(module.editor.param_names)} "
        "edited weights"
    )
    print(
        f"step time      {step * 1e3:.1f} ms (median of {len(timed)}; min {min(timed) * 1e3:.1f}, max "
        f"{max(timed) * 1e3:.1f})"
    )
    print(f"edits/s        {args.edits / step:.2f} ({args.edits} edits a step)")
    if trainer.strategy.root_device.type == "cuda":
        print(f"peak memory    {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated on the GPU")
    else:
        print(f"peak memory    {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (process)")


if __name__ == "__main__":
    main()
