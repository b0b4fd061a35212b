"""How often one edit changes the answer to another fact's edit prompt, and what that leaves of a sequence.

    PYTHONPATH=. python benchmarks/fact_interference.py --editor runs/<run>/version_N/editor \
        --backbone checkpoints/base/blip2-tiny-synthetic --data data/synthetic/vqa/vqa_eval.json \
        --images data/synthetic/images [--json out.json]

The first edit of each fact in `--data` (facts as `kedit eval --sequential` links them: `editor.facts`) is
made alone on the unedited model; then every other fact's edit prompt is read under it, teacher-forced on
its own answer tokens, as `kedit` locality reads its prompts (argmax agreement with the unedited model at
the answer positions). A flip is a pair (edit, other fact) where some answer position changed; `p` is the
flips over the pairs, and `to_target` the flips whose first answer token became the edit's own target.

Why: in a sequence of weight edits, each edit must survive the edits made after it. If each later edit
flipped an earlier fact independently with probability p, the edit made k edits before the end would survive
with (1 - p)^k, and the mean reliability after N edits of distinct facts would be (1 - (1 - p)^N) / (N p):
printed for the facts of `--data` (their first edits made one after another, and their mean reliability
measured beside the estimate) and for N = 100. It is an estimate, not a bound: measured sequences fall
below it where margins wear down edit after edit, and above it where a later edit flips an answer back. A
memory editor (SERAC, GRACE) keeps each fact's own entry, which competes with the flipping one in a sequence:
the estimate does not apply to it. On the synthetic E-VQA data every edit prompt asks a landmark's city: the
other facts' prompts are the same question about other landmarks, CounterFact's neighbourhood for this world.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from data_modules.datamodules import TextEditDataModule, VQADataModule
from data_modules.encoding import IGNORE_INDEX
from kedit_lightning.editor import (
    Editor,
    EditSession,
    device_of,
    editor_module,
    evaluate_sequential,
    facts,
    to_device,
)
from kedit_lightning.editors.edited_model import StepInputs


def answer_argmaxes(session: EditSession, backbone: Any, sub_batches: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Per one-row sub-batch, the argmax at each of its answer positions with the session's edits in force: one
    batched read of them all."""
    names = [f"fact{i}" for i in range(len(sub_batches))]
    inputs = StepInputs(backbone, dict(zip(names, sub_batches)))
    rows = inputs.rows(*names)
    groups = None if session.head < 0 else torch.full((len(rows),), session.head)
    with torch.no_grad():
        argmax = session.model.answer_logits(inputs, rows, groups).argmax(-1)
    return list(argmax.split(inputs.answer_counts(rows).tolist()))


def add_editor_and_data_arguments(parser: argparse.ArgumentParser, editor_help: str) -> None:
    """--editor, --backbone, and the records file (--data, --images, --text), as `records_of_facts` reads them."""
    parser.add_argument("--editor", required=True, help=editor_help)
    parser.add_argument("--backbone", required=True, help="the base model it edits (directory or config)")
    parser.add_argument("--data", required=True, help="records file (E-VQA layout, or text with --text)")
    parser.add_argument("--images", help="image folder of image records")
    parser.add_argument("--text", action="store_true", help="text records (zsRE / CounterFact layouts)")


def records_of_facts(
    editor: Editor, backbone: Any, data: str, images: str | None, text: bool
) -> tuple[list[dict[str, Any]], list[Any]]:
    """The records of the file `data`, each a one-record EditBatch on the backbone's device encoded for `editor`,
    and the fact each edits (as `kedit eval --sequential` links them: `editor.facts`)."""
    data_file = Path(data)
    kind = TextEditDataModule if text else VQADataModule
    extra = {} if text else {"image_root": str(Path(images).resolve())}
    processor = editor.processor(backbone)
    loaded = kind(str(data_file.parent), data_file.name, data_file.name, batch_size=1, processor=processor, **extra)
    loaded.setup("validate")
    records = [to_device(batch, device_of(backbone)) for batch in loaded.val_dataloader()]
    return records, facts([record["meta"][0] for record in records])


def first_positions(keys: list[Any]) -> list[int]:
    """The position of each fact's first record, facts in order of first appearance."""
    return [keys.index(key) for key in dict.fromkeys(keys)]


def retention_estimate(p: float, n: int) -> float:
    """Mean over N edits of (1 - p)^k, k = 0 .. N - 1 edits made after each: 1 when p is 0."""
    return 1.0 if p == 0 else (1 - (1 - p) ** n) / (n * p)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_editor_and_data_arguments(parser, "an exported editor directory")
    parser.add_argument("--max-edit-ratio", type=float, help="MEND: apply this edit limit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    editor = Editor.from_pretrained(args.editor)
    backbone = editor.load_backbone(args.backbone).eval()
    if args.max_edit_ratio is not None:
        if not hasattr(editor.editor, "limit_edits"):
            parser.error(f"--max-edit-ratio: {args.editor} is a {editor.method} editor, not MEND")
        editor.editor.limit_edits(args.max_edit_ratio)
    records, keys = records_of_facts(editor, backbone, args.data, args.images, args.text)
    firsts = [records[position] for position in first_positions(keys)]
    start = time.perf_counter()
    session = EditSession(editor_module(editor, backbone), backbone)
    prompts = [record["edit_inner"] for record in firsts]
    unedited = answer_argmaxes(session, backbone, prompts)
    flips = to_target = pairs = 0
    for i, record in enumerate(firsts):
        session.add(record["edit_inner"], f"edit {i + 1}", "stopped")
        labels = record["edit_inner"]["labels"]
        target = int(labels[labels != IGNORE_INDEX][0])
        for j, post in enumerate(answer_argmaxes(session, backbone, prompts)):
            if j == i:
                continue
            flipped = not torch.equal(post, unedited[j])
            flips += flipped
            to_target += flipped and int(post[0]) == target
            pairs += 1
        session.restore()
    p = flips / max(pairs, 1)
    sequence = evaluate_sequential(editor, backbone, firsts, len(firsts), probe=None, progress=False)
    report = {
        "editor": args.editor,
        "data": args.data,
        "facts": len(firsts),
        "pairs": pairs,
        "p": p,
        "to_target": to_target / max(pairs, 1),
        "estimate": {n: retention_estimate(p, n) for n in (len(firsts), 100)},
        "sequence": {"n_edits": len(firsts), "reliability": sequence["reliability"]},
        "seconds": time.perf_counter() - start,
    }
    print(
        f"{len(firsts)} facts, {pairs} pairs: an edit changes another fact's answer with p = {p:.3f} "
        f"(to its own target {report['to_target']:.3f}); for weight edits, independent flips would leave a mean "
        "reliability of about "
        + ", ".join(f"{b:.2f} after {n}" for n, b in report["estimate"].items())
        + f" distinct edits in sequence; measured after {len(firsts)}: {sequence['reliability']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
