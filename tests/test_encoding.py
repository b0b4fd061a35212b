"""The tokenization contract: only target tokens are supervised, whatever the tokenizer."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from data_modules.encoding import IGNORE_INDEX, PromptFormat, SubBatchEncoder


@pytest.fixture()
def word_tokenizer():
    words = [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "<image>",
        "what",
        "colour",
        "is",
        "it",
        "?",
        "red",
        "deep",
        "blue",
        "question:",
        "answer:",
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def test_labels_cover_exactly_the_target_tokens(word_tokenizer):
    encoder = SubBatchEncoder(
        word_tokenizer, prompt_format=PromptFormat(with_image="{image} {prompt}", num_image_tokens=2)
    )
    batch = encoder(["what colour is it ?", "what is it ?"], ["red", "deep blue"])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert batch["pixel_values"] is None
    supervised = [
        [word_tokenizer.convert_ids_to_tokens(int(i)) for i, label in zip(row, lab) if label != IGNORE_INDEX]
        for row, lab in zip(ids, labels)
    ]
    assert supervised == [["red"], ["deep", "blue"]]
    # Padding is masked out of attention and labels alike.
    assert mask[0].sum() == 7 and mask[1].sum() == 7
    assert (labels[mask == 0] == IGNORE_INDEX).all()


def test_image_placeholders_are_never_supervised(word_tokenizer):
    class OnesProcessor:
        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.ones(len(images), 3, 4, 4)}

    from PIL import Image

    encoder = SubBatchEncoder(
        word_tokenizer, OnesProcessor(), PromptFormat(with_image="{image} {prompt}", num_image_tokens=3)
    )
    batch = encoder(["what is it ?"], ["red"], [Image.new("RGB", (4, 4))])
    image_id = word_tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum() == 3
    assert (batch["labels"][batch["input_ids"] == image_id] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (1, 3, 4, 4)


def test_sentencepiece_style_offsets_still_mark_the_target():
    from tokenizers import decoders

    vocab = {"<unk>": 0, "<s>": 1, "▁what": 2, "▁is": 3, "▁it": 4, "▁red": 5, "▁": 6, "1": 7}
    tok = Tokenizer(models.Unigram([(k, -1.0) for k in vocab], unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    batch = SubBatchEncoder(fast)(["what is it"], ["red"])
    supervised = [
        fast.convert_ids_to_tokens(int(i))
        for i, label in zip(batch["input_ids"][0], batch["labels"][0])
        if label != IGNORE_INDEX
    ]
    assert supervised == ["▁red"]
