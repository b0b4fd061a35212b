"""Greedy generation on the edited model (kedit_lightning/generation.py) against the plain token-by-token
oracle (full forward per token, dense edited weights), and the answer matching of `gen_*` metrics."""

import pytest
import torch
from oracle import dense_edit
from oracle import greedy_tokens as oracle_greedy_tokens
from test_backbones import TINY, draw_images, make_tokenizer, tiny_backbone
from test_edited_model import trained_like

from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.mend import MEND
from kedit_lightning.generation import answer_matches, answer_token_counts, greedy_tokens, same_answer

PROMPTS = ["Where is this object located?", "What colour is the object?", "Question: Short answer:"]
TARGETS = ["Velor", "green yellow", "red"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _row(sub_batch, i):
    return {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in sub_batch.items()}


@pytest.mark.parametrize("family", TINY)
def test_greedy_decoding_under_each_rows_edit_matches_the_token_by_token_oracle(tokenizer, family):
    torch.manual_seed(3)
    backbone = tiny_backbone(family, tokenizer).eval()
    images = None if family == "text" else [draw_images()[r % 2] for r in range(3)]
    edits = backbone.processor(PROMPTS, TARGETS, images)
    editor = trained_like(MEND.for_backbone(backbone, rank=8, edit_lr=1.0)).eval()
    model = editor.edited_model(backbone)
    inputs = StepInputs(backbone, {"edit": edits})
    groups = editor(model, inputs, inputs.rows("edit"))
    limits = answer_token_counts(edits) + 2
    fast = greedy_tokens(model, backbone, {"edit": edits}, groups, limits)
    unedited = greedy_tokens(model, backbone, {"edit": edits}, None, limits)
    for i in range(3):
        row = _row(edits, i)
        assert fast[i] == oracle_greedy_tokens(backbone, row, int(limits[i]), dense_edit(editor, backbone, row))
        assert unedited[i] == oracle_greedy_tokens(backbone, row, int(limits[i]))
    assert fast != unedited  # the edits change what is generated: not a trivial comparison


def test_answers_match_on_normalised_leading_words():
    assert answer_matches("la  Paz, the capital", "La Paz")
    assert answer_matches("VELOR.", "Velor")
    assert not answer_matches("Velorian", "Velor")
    assert not answer_matches("Paris", "La Paz")
    assert not answer_matches("", "")
    assert same_answer("Marun is", "marun!", "Marun") and not same_answer("Velor", "Marun", "Marun")
    assert same_answer("", "", "Marun")  # both say nothing: the edit changed nothing
