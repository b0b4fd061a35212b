"""Which `recency_margin` a SERAC artifact needs on a data file: how far its scope classifier puts another wording
of a fact below the fact's own entry, and how far the other facts' entries.

    PYTHONPATH=. python benchmarks/serac_routing_margin.py --editor runs/<run>/version_N/editor \
        --backbone smollm2.gguf --data data/real_facts/facts_eval.json --text [--json out.json]
    PYTHONPATH=. python benchmarks/serac_routing_margin.py --editor runs/<run>/version_N/editor \
        --backbone checkpoints/base/blip2-tiny-synthetic --data data/synthetic/vqa/vqa_eval.json \
        --images data/synthetic/images

The memory holds an entry for every record of `--data`, and for the first record of each fact
(`editor.facts`) also entries of the same edit worded otherwise: through its rephrase, and for image records
through its other picture (a later edit of a fact may come in either form). Each fact's first edit prompt is
then scored against every entry (log-probabilities, as routing reads them). Routing sends an input to the
newest entry within the margin of its best, so a margin that lets a later, otherwise worded edit of a fact win
must exceed the fact's `within` gap (its first edit's entry's score minus the lowest of that edit's other
wordings), and one that keeps other facts out must stay below the `other` gap (the same score minus the best
entry of another fact). The script prints both
gaps' quantiles, how many facts each candidate margin lets through, and the range of margins that separates
every fact, when there is one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from fact_interference import add_editor_and_data_arguments, first_positions, records_of_facts

from kedit_lightning.editor import Editor, EditSession, editor_module
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.serac import SERAC

CANDIDATES = (0.05, 0.1, 0.15, 0.25, 0.5, 1.0)
WORDINGS = ("edit_outer", "edit_outer_image")  # the other forms of one edit, as far as the records give them


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_editor_and_data_arguments(parser, "an exported SERAC editor directory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    editor = Editor.from_pretrained(args.editor)
    if not isinstance(editor.editor, SERAC):
        parser.error(f"{args.editor} is a {editor.method} editor: the recency margin is SERAC's")
    backbone = editor.load_backbone(args.backbone).eval()
    records, keys = records_of_facts(editor, backbone, args.data, args.images, args.text)
    fact_of = {key: fact for fact, key in enumerate(dict.fromkeys(keys))}
    firsts_at = first_positions(keys)
    firsts = [records[position] for position in firsts_at]
    start = time.perf_counter()
    session = EditSession(editor_module(editor, backbone), backbone)
    owner = []  # the fact of each memory entry, in the order added: the firsts' edits come first
    later = [(fact_of[keys[i]], records[i]) for i in range(len(records)) if i not in firsts_at]
    entries = [(fact, record, "edit_inner") for fact, record in enumerate(firsts)]
    entries += [(fact, record, "edit_inner") for fact, record in later]
    entries += [
        (fact, record, wording) for wording in WORDINGS for fact, record in enumerate(firsts) if wording in record
    ]
    for fact, record, wording in entries:
        session.add(record[wording], f"fact {fact} ({wording})", "stopped")
        owner.append(fact)
    model = session.model
    names = [f"fact{i}" for i in range(len(firsts))]
    inputs = StepInputs(backbone, {name: record["edit_inner"] for name, record in zip(names, firsts)})
    with torch.no_grad():
        query = model.serac.read(inputs, inputs.rows(*names)).query
        scores = model.serac.classifier.score_all(model.scope, query, model.keys).cpu()  # [facts, entries]
    session.restore()
    owner = torch.tensor(owner)
    same = owner.unsqueeze(0) == torch.arange(len(firsts)).unsqueeze(1)
    wordings = same & (torch.arange(len(owner)) >= len(records))  # the entries after one per record
    own = scores[:, : len(firsts)].diagonal()
    within = own - scores.masked_fill(~wordings, float("inf")).min(1).values
    other = own - scores.masked_fill(same, float("-inf")).max(1).values
    quantiles = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    low, high = float(within.max()), float(other.min())
    report = {
        "editor": args.editor,
        "data": args.data,
        "facts": len(firsts),
        "entries": len(owner),
        "within_gap_quantiles": dict(zip(quantiles.tolist(), torch.quantile(within, quantiles).tolist())),
        "other_gap_quantiles": dict(zip(quantiles.tolist(), torch.quantile(other, quantiles).tolist())),
        "margins": {
            m: {"wordings_reached": int((within <= m).sum()), "other_facts_in": int((other <= m).sum())}
            for m in CANDIDATES
        },
        "separating_range": [low, high] if low < high else None,
        "artifact_margin": model.serac.recency_margin,
        "seconds": time.perf_counter() - start,
    }
    print(
        f"{len(firsts)} facts, {len(owner)} entries; gaps below a fact's own entry (log p), quantiles 0 / 0.1 / 0.5 / "
        "0.9 / 1:\n  its other wordings: "
        + " / ".join(f"{v:.3f}" for v in report["within_gap_quantiles"].values())
        + "\n  the best other fact: "
        + " / ".join(f"{v:.3f}" for v in report["other_gap_quantiles"].values())
    )
    for m, counts in report["margins"].items():
        print(
            f"  margin {m}: a later wording reaches {counts['wordings_reached']} of {len(firsts)} facts; "
            f"another fact within it for {counts['other_facts_in']}"
        )
    print(
        f"margins in ({low:.3f}, {high:.3f}) separate every fact"
        if low < high
        else "no margin separates every fact: the classifier scores some fact's other fact above its own wordings"
    )
    print(f"the artifact's margin: {model.serac.recency_margin}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
