"""`kedit facts`: the real-facts data set (zsRE layout) from the fact table kept in the repo.

Each fact of data_modules/facts/real_facts.json becomes one record: `src` (the relation's prompt about
the subject), `rephrase` (one of its paraphrases), `alt` (the counterfactual), `loc` an unrelated prompt
(zsRE's T-Locality: a question about nothing edited), and `neighbors` the near-neighbour prompt (same
relation, another subject) with its answer, scored apart as `n_locality` (CounterFact's neighbourhood
prompts). `pred`, `loc_ans` and the neighbour's answer are what the model itself answers (greedy
generation): locality is about keeping the model's answer, right or wrong. Facts are split into train /
eval by subject, and the unrelated prompts the same way, so no eval subject or eval locality prompt is seen
in training.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from data_modules.encoding import SubBatchEncoder
from data_modules.text_records import TextRecord
from kedit_lightning.backbones import Backbone, BackboneSpec, build_backbone
from kedit_lightning.editor import EditedBackbone, Editor, device_of, to_device
from kedit_lightning.editors.edited_model import WeightEditedModel
from kedit_lightning.generation import greedy_answers as decode

FACT_TABLE = Path(__file__).resolve().parents[2] / "data_modules" / "facts" / "real_facts.json"
FILES = {"train": "facts_train.json", "eval": "facts_eval.json"}
ANSWER_END = re.compile(r"[\n.,;:!?()\"]")
MAX_ANSWER_WORDS = 3
PROMPT_END = "x"  # a one-word target to encode prompts with: it only marks where each prompt ends


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/real_facts", help="folder for facts_train.json and facts_eval.json")
    parser.add_argument("--backbone", default="smollm2.gguf", help="the text model whose answers are pred / loc_ans")
    parser.add_argument("--table", default=str(FACT_TABLE), help="the fact table (default: the one in the repo)")
    parser.add_argument("--eval-fraction", type=float, default=0.25, help="share of subjects held out for eval")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N facts (quick runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subject split")


def read_fact_table(path: str | Path) -> dict[str, Any]:
    """The fact table, with every fact's relation checked to exist (one line naming the fact otherwise)."""
    table = json.loads(Path(path).read_text(encoding="utf-8"))
    for index, fact in enumerate(table["facts"]):
        if fact["relation"] not in table["relations"]:
            raise ValueError(f"{path}: facts[{index}].relation: unknown relation {fact['relation']!r}")
    return table


def first_answer(continuation: str) -> str:
    """The answer at the start of a generated continuation: up to the first punctuation or line end (none
    when the model starts a new line)."""
    return " ".join(ANSWER_END.split(continuation.lstrip(" \t"), maxsplit=1)[0].split()[:MAX_ANSWER_WORDS])


def greedy_answers(
    backbone: Backbone,
    prompts: Sequence[str],
    edited: EditedBackbone | None = None,
    encode: SubBatchEncoder | None = None,
    max_new_tokens: int = 6,
    batch: int = 32,
) -> list[str]:
    """The model's greedy answer to each prompt (`first_answer` of the continuation, generation.py's decoder),
    with the edits of `edited` in force; `encode` is what the editor reads its inputs with (default: the backbone's
    processor; SERAC's adds its own tokens)."""
    model = WeightEditedModel(backbone) if edited is None else edited.session.model
    encode = encode or backbone.processor
    answers = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        rows = to_device(encode(chunk, [PROMPT_END] * len(chunk)), device_of(backbone))
        groups = None if edited is None else torch.full((len(chunk),), edited.session.head)
        answers += [first_answer(text) for text in decode(model, backbone, {"prompts": rows}, groups, max_new_tokens)]
    return answers


def generation_success(editor: Editor, backbone: Backbone, records: Sequence[TextRecord]) -> dict[str, float]:
    """Edit each record alone, generate greedily from its `src` and `rephrase`, restore: the share of
    answers that are the new one (`first_answer` starts with `alt`), per prompt kind."""
    hits = {"src": 0, "rephrase": 0}
    for record in records:
        edited = editor.edit(backbone, [record])
        try:
            answers = greedy_answers(backbone, [record.src, record.rephrase], edited, editor.processor(backbone))
        finally:
            edited.restore()
        for kind, answer in zip(hits, answers):
            hits[kind] += answer.startswith(record.alt)
    return {kind: count / len(records) for kind, count in hits.items()}


def fact_prompts(table: dict[str, Any], index: int, unrelated: Sequence[str]) -> dict[str, str]:
    """A fact's src, rephrase, locality prompt (one of `unrelated`, its split's share) and near-neighbour
    prompt (`neighbor`)."""
    fact = table["facts"][index]
    relation = table["relations"][fact["relation"]]
    paraphrases = relation["paraphrases"]
    return {
        "src": relation["prompt"].format(fact["subject"]),
        "rephrase": paraphrases[index % len(paraphrases)].format(fact["subject"]),
        "loc": unrelated[index % len(unrelated)],
        "neighbor": relation["prompt"].format(fact["neighbour"]),
    }


def held_out_share(items: Sequence[str], eval_fraction: float, seed: int) -> set[str]:
    """A seeded share of the distinct `items` (at least one): the held-out subjects or locality prompts."""
    distinct = sorted(set(items))
    random.Random(seed).shuffle(distinct)
    return set(distinct[: max(1, round(eval_fraction * len(distinct)))])


def build_records(
    table: dict[str, Any], backbone: Backbone, eval_fraction: float, seed: int, limit: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """One zsRE record per fact, split by subject (`FILES`' keys), `pred` / `loc_ans` / the neighbour's answer
    from the model; facts the model gives no answer for (or already answers with the counterfactual) are
    dropped, and a neighbour it gives no answer for is left out."""
    facts = table["facts"][: limit or None]
    held_out = held_out_share([fact["subject"] for fact in facts], eval_fraction, seed)
    held_out_unrelated = held_out_share(table["unrelated"], eval_fraction, seed)
    unrelated = {
        "train": [prompt for prompt in table["unrelated"] if prompt not in held_out_unrelated],
        "eval": [prompt for prompt in table["unrelated"] if prompt in held_out_unrelated],
    }
    splits = ["eval" if fact["subject"] in held_out else "train" for fact in facts]
    prompts = [fact_prompts(table, index, unrelated[split]) for index, split in enumerate(splits)]
    count = len(prompts)
    answers = greedy_answers(backbone, [p[key] for key in ("src", "loc", "neighbor") for p in prompts])
    records: dict[str, list[dict[str, Any]]] = {split: [] for split in FILES}
    for index, prompt in enumerate(prompts):
        pred, loc_ans, neighbor = answers[index], answers[count + index], answers[2 * count + index]
        alt = facts[index]["counterfactual"]
        if pred and loc_ans and pred != alt:
            neighbors = [{"prompt": prompt["neighbor"], "answer": neighbor}] if neighbor else []
            fields = {key: value for key, value in prompt.items() if key != "neighbor"}
            records[splits[index]].append(
                {**fields, "pred": pred, "alt": alt, "loc_ans": loc_ans, "neighbors": neighbors}
            )
    return records


def write_real_facts(
    out: str | Path,
    backbone: Backbone,
    table_path: str | Path = FACT_TABLE,
    eval_fraction: float = 0.25,
    limit: int | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Write facts_train.json and facts_eval.json under `out`; the number of records in each."""
    splits = build_records(read_fact_table(table_path), backbone, eval_fraction, seed, limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, name in FILES.items():
        text = json.dumps(splits[split], indent=1, ensure_ascii=False) + "\n"
        (out / name).write_text(text, encoding="utf-8", newline="\n")
    return {split: len(items) for split, items in splits.items()}


def run(args: argparse.Namespace) -> int:
    total = len(read_fact_table(args.table)["facts"])  # a bad table is named before the model loads
    backbone = build_backbone(BackboneSpec(family="text", pretrained=args.backbone)).eval()
    counts = write_real_facts(args.out, backbone, args.table, args.eval_fraction, args.limit, args.seed)
    dropped = min(args.limit or total, total) - sum(counts.values())
    print(
        f"wrote {counts['train']} train and {counts['eval']} eval records to {args.out} "
        f"({dropped} facts dropped: no answer from the model, or it already gives the counterfactual)"
    )
    return 0
