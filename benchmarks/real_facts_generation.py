"""Greedy generation after an edit, with an exported editor: the share of edited prompts answered anew.

    python benchmarks/real_facts_generation.py --editor checkpoints/mend-smollm2-135m-facts/version_0

Each eval record is edited alone (its edit folded into the weights), SmolLM2 generates greedily from the
edit prompt and from its paraphrase, and the weights are restored before the next record.
"""

import argparse
import time

import torch

from data_modules.text_records import read_text_records
from kedit_lightning.commands.facts_cmd import generation_success
from kedit_lightning.editor import Editor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", required=True, help="an exported editor directory")
    parser.add_argument("--backbone", default="smollm2.gguf", help="the model the editor was trained on")
    parser.add_argument("--data", default="data/real_facts/facts_eval.json", help="held-out text records")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    editor = Editor.from_pretrained(args.editor)
    backbone = editor.load_backbone(args.backbone)
    records = read_text_records(args.data)
    start = time.perf_counter()
    shares = generation_success(editor, backbone, records)
    print(
        f"{len(records)} edits: new answer generated for {shares['src']:.1%} of edit prompts and "
        f"{shares['rephrase']:.1%} of paraphrases ({time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
