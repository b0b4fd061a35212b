"""A word-level tokenizer over a small corpus, for tiny synthetic-world backbones.

A vocabulary of a few hundred whole words keeps tiny models fast on CPU and makes every
answer one or two tokens. The tokenizer is an ordinary `PreTrainedTokenizerFast`, so it saves
and loads with the model directory and reports the character offsets `SubBatchEncoder` needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from data_modules.datasets import VQA_TEMPLATE
from data_modules.records import IMAGE_FIELDS

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE_TOKEN = "<image>"
# MiniGPT-4 names its image slot <ImageHere>; a separate token keeps its layout the paper's.
IMAGE_HERE_TOKEN = "<ImageHere>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE_TOKEN, IMAGE_HERE_TOKEN)

# The fixed words of the backbone families' prompt layouts (LLaVA's and MiniGPT-4's; BLIP-2 and
# text LMs add none), written out so the data layer need not import the backbones.
# tests/test_backbones.py checks that they cover every family's `prompt_template`.
PROMPT_TEXTS = ("USER: ASSISTANT:", "###Human: <Img></Img> ###Assistant:")


def _splitter() -> Tokenizer:
    """Lowercase, split on whitespace, then isolate every punctuation mark."""
    tok = Tokenizer(models.WordLevel({UNK: 0}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    return tok


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose vocabulary is every word and punctuation mark in `texts`.

    Ids are deterministic: the special tokens first (<pad>=0, <s>=1, </s>=2, <unk>=3,
    <image>=4, <ImageHere>=5), then the words in sorted order. Encoding prepends <s>.
    """
    tok = _splitter()
    words = sorted(
        {word for text in texts for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))}
    )
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok.model = models.WordLevel(vocab, unk_token=UNK)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[IMAGE_TOKEN, IMAGE_HERE_TOKEN],
    )


def record_strings(value: Any) -> Iterable[str]:
    """Every text string in a record (or list / dict of them), image-path fields left out."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in IMAGE_FIELDS:
                yield from record_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from record_strings(item)


def _read_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def corpus_from_records(paths: Sequence[str | Path]) -> list[str]:
    """Every text string in the given record files, the data layer's VQA template and the families' prompt words.

    Image-path fields (`image`, `image_rephrase`, `m_loc`) are skipped; nested fields such as
    VLKEB's portability questions are read.
    """
    corpus = [VQA_TEMPLATE.format(""), *PROMPT_TEXTS]
    for path in map(Path, paths):
        for index, record in enumerate(_read_records(path)):
            if not isinstance(record, dict):
                raise ValueError(f"{path}: record {index} is a {type(record).__name__}, not an object")
            corpus.extend(record_strings(record))
    return corpus


def save_world_tokenizer(data_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Build the word tokenizer over every record file of a data directory and save it.

    Record files are the JSON lists one folder down (vqa/, caption/, vlkeb/ as `kedit synth`
    writes them). The default `out_dir` is `<data_dir>/tokenizer`, which the tiny backbone
    configs name as their `processor`.
    """
    data_dir = Path(data_dir)
    record_files = sorted(data_dir.glob("*/*.json"))
    if not record_files:
        raise FileNotFoundError(f"{data_dir}: no record files (*/*.json) to build a vocabulary from")
    out = Path(out_dir) if out_dir is not None else data_dir / "tokenizer"
    build_word_tokenizer(corpus_from_records(record_files)).save_pretrained(out)
    return out
