"""SERAC's memory at scale: per-edit and per-query time with 10, 1,000 and 10,000 stored edits, in one run.

    python benchmarks/serac_memory.py --sizes 10,1000,10000 --json serac_memory.json
    python benchmarks/serac_memory.py --accelerator gpu --sizes 10,1000,10000

The quick start's architecture with random weights (configs/backbones/blip2-tiny.yaml base, the
text-tiny counterfactual model, its tiny BERT scope encoder over the synthetic world's word
tokenizer; nothing downloaded). The memory is filled with distinct edits (three-word questions
about one of eight images of the world), chunk by chunk, each chunk a batched edit on top of the
last, as `kedit eval --sequential` stacks them; at each size, `--edits` single edits go on top, one
at a time (per-edit time: reading the edit, embedding it, storing it), then `--queries` inputs are
answered under the newest edit (per-query time: the classifier's lookup over the whole memory, the
routed rows' counterfactual forward and the others' backbone forward; `route` alone separately).
Ratios are against the smallest size.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from kedit_lightning.backbones import load_backbone_spec
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.modules.serac import ScopeEncoderSpec, SERACModule

SCOPE_ENCODER = {
    "model_type": "bert",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
CHUNK = 500


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(device: torch.device, repeats: int, fn: Any) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def questions(vocabulary: list[str], n: int) -> list[str]:
    """`n` distinct three-word questions."""
    return [f"{a} {b} {c} ?" for a, b, c in itertools.islice(itertools.permutations(vocabulary, 3), n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,1000,10000", help="stored edits to measure at, comma-separated")
    parser.add_argument("--edits", type=int, default=20, help="single edits timed at each size")
    parser.add_argument("--queries", type=int, default=16, help="inputs answered per timed lookup")
    parser.add_argument("--repeats", type=int, default=5, help="timed lookups at each size (median)")
    parser.add_argument("--classifier", default="distance", choices=["distance", "cosine"])
    parser.add_argument("--data-dir", default="data/synthetic", help="the synthetic world (`kedit synth --out`)")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the figures as JSON here")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    data = Path(args.data_dir)
    if not (data / "tokenizer").is_dir():
        raise SystemExit(f"{data}: no synthetic world here; write it with `kedit synth --out {data}`")
    tokenizer = str(data / "tokenizer")
    torch.manual_seed(0)
    configs = Path(__file__).resolve().parent.parent / "configs" / "backbones"
    module = SERACModule(
        dataclasses.replace(load_backbone_spec(configs / "blip2-tiny.yaml"), processor=tokenizer),
        dataclasses.replace(load_backbone_spec(configs / "text-tiny.yaml"), processor=tokenizer),
        ScopeEncoderSpec(config=SCOPE_ENCODER, tokenizer=tokenizer),
        classifier=args.classifier,
    )
    module.configure_model()
    module.to(device).eval()
    serac, backbone, encode = module.editor, module.backbone, module.input_processor()
    images = [Image.open(path).convert("RGB") for path in sorted((data / "images").rglob("*.png"))[:8]]
    vocabulary = [word for word in encode.tokenizer.get_vocab() if word.isalpha()][:40]
    total = sizes[-1] + args.edits * len(sizes)
    prompts = questions(vocabulary, total + args.queries)
    if len(prompts) < total + args.queries:
        raise ValueError(f"the word tokenizer gives only {len(prompts)} distinct questions")

    def inputs_of(start: int, stop: int) -> StepInputs:
        rows = range(start, stop)
        sub_batch = encode([prompts[i] for i in rows], ["Velor"] * len(rows), [images[i % 8] for i in rows])
        sub_batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sub_batch.items()}
        return StepInputs(backbone, {"rows": sub_batch}, prefix=False)

    model = serac.edited_model(backbone)
    head, stored, results = torch.tensor([-1]), 0, []
    queries = inputs_of(total, total + args.queries)
    query_rows = queries.rows("rows")
    with torch.no_grad():
        for size in sizes:
            while stored < size:  # fill: a batched edit per chunk, on top of the last
                step = min(CHUNK, size - stored)
                head = serac(model, inputs_of(stored, stored + step), torch.arange(step), head.expand(step), True)[:1]
                stored += step
            edit_times = []
            for _ in range(args.edits):  # single edits on top, each timed from tokens to stored entry
                synchronize(device)
                start = time.perf_counter()
                head = serac(model, inputs_of(stored, stored + 1), torch.arange(1), head, True)[:1]
                synchronize(device)
                edit_times.append(time.perf_counter() - start)
                stored += 1
            groups, read = head.expand(args.queries), serac.read(queries, query_rows).query
            answer = median_seconds(
                device, args.repeats, lambda groups=groups: model.answer_logits(queries, query_rows, groups)
            )
            route = median_seconds(device, args.repeats, lambda read=read, groups=groups: model.route(read, groups))
            results.append(
                {
                    "stored_edits": len(model),
                    "per_edit_ms": 1e3 * statistics.median(edit_times),
                    "per_query_ms": 1e3 * answer / args.queries,
                    "route_per_query_ms": 1e3 * route / args.queries,
                    "routed": float(model.routed.float().mean()),
                }
            )
    first = results[0]
    for row in results:
        for key in ("per_edit_ms", "per_query_ms", "route_per_query_ms"):
            row[key.replace("_ms", "_ratio")] = row[key] / first[key]
    print("| stored edits | per edit | ratio | per query | ratio | lookup per query | ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['stored_edits']} | {row['per_edit_ms']:.2f} ms | {row['per_edit_ratio']:.2f} | "
            f"{row['per_query_ms']:.2f} ms | {row['per_query_ratio']:.2f} | {row['route_per_query_ms']:.3f} ms | "
            f"{row['route_per_query_ratio']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(device), "rows": results}, indent=2))


if __name__ == "__main__":
    main()
