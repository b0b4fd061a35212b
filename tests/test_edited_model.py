"""The fast edit path (one prefix, batched capture, per-row low-rank edits, answer-only logits) against
the per-record, full-depth oracle (tests/oracle.py): losses, editor gradients, metrics, sequences."""

import copy

import pytest
import torch
from oracle import dense_edit, mend_step_losses, mend_weights
from oracle import evaluate_batch as oracle_evaluate_batch
from test_backbones import TINY, draw_images, make_tokenizer, tiny_backbone

from data_modules.encoding import SUB_BATCH_KEYS
from kedit_lightning.editors.edited_model import StepInputs, WeightEditedModel
from kedit_lightning.editors.ft import FineTune
from kedit_lightning.editors.mend import MEND
from kedit_lightning.evaluation import EditMetrics, evaluate_batch, flatten_report
from kedit_lightning.modules.mend import outer_losses

PROMPTS = {
    "edit_inner": ["Where is this object located?", "What colour is the object?", "Question: Short answer:"],
    "edit_outer": ["Question: where is the object located?", "Question: colour of object?", "Where is Zandia?"],
    "edit_outer_image": ["Where is this object located?", "What colour is the object?", "Question: Short answer:"],
    "loc": ["The capital of Zandia is", "Question: what colour is blue?", "Where is Velor?"],
    "loc_image": ["What colour is the object?", "Where is this object located?", "Question: colour?"],
}
TARGETS = {
    "edit_inner": ["Velor", "green yellow", "red"],
    "edit_outer": ["Velor", "green yellow", "red"],
    "edit_outer_image": ["Velor", "green yellow", "red"],
    "loc": ["Velor", "blue", "Marun"],
    "loc_image": ["red", "Marun", "yellow"],
}
WITH_IMAGE = {"edit_inner": 0, "edit_outer": 0, "edit_outer_image": 1, "loc_image": 2}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def make_batch(backbone) -> dict:
    """Three records; images as the data pipeline gives them (edit and rephrase share an image)."""
    images = draw_images() + [draw_images()[0].rotate(90)]
    batch = {}
    for key in SUB_BATCH_KEYS:
        picture = None
        if backbone.family != "text" and key in WITH_IMAGE:
            picture = [images[(WITH_IMAGE[key] + r) % 3] for r in range(3)]
        batch[key] = backbone.processor(PROMPTS[key], TARGETS[key], picture)
    return batch


def trained_like(editor: MEND, seed: int = 0) -> MEND:
    """An editor that is not the identity and normalises with statistics, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in editor.named_parameters():
            if "up" in name or "mode" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    for moments in editor._moments():
        moments.commit(torch.cat([torch.tensor([50.0]), torch.randn(moments.dim), 60 * torch.rand(moments.dim)])[None])
    return editor


@pytest.mark.parametrize("family", TINY)
def test_step_losses_and_editor_gradients_match_the_oracle(tokenizer, family):
    torch.manual_seed(0)
    backbone = tiny_backbone(family, tokenizer).eval()
    batch = make_batch(backbone)
    editor = trained_like(MEND.for_backbone(backbone, rank=8, edit_lr=1e-2)).train()
    twin = copy.deepcopy(editor)

    if family != "text":  # text-only locality rows run from a prefix of their own, unpadded to image width
        assert len(StepInputs(backbone, batch).buckets) == 2
    fast = outer_losses(editor, backbone, batch)
    slow = mend_step_losses(twin, backbone, batch)
    for key in slow:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-4, atol=1e-6)
    assert slow["loc"] > 0 and slow["edit"] > 0  # the comparison is not of zeros

    sum(fast.values()).backward()
    sum(slow.values()).backward()
    compared = 0
    for p, q in zip(editor.parameters(), twin.parameters()):
        if q.grad is not None and q.grad.abs().max() > 0:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3 * float(q.grad.abs().max()))
            compared += 1
    assert compared >= 5
    # The pending statistics (every row of every record) agree as well.
    torch.testing.assert_close(editor.take_pending_statistics(), twin.take_pending_statistics(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", TINY)
@pytest.mark.parametrize("method", ["mend", "ft"])
def test_validation_metrics_match_the_oracle(tokenizer, family, method):
    torch.manual_seed(1)
    backbone = tiny_backbone(family, tokenizer).eval()
    batch = make_batch(backbone)
    editor = (
        trained_like(MEND.for_backbone(backbone, rank=8, edit_lr=1.0)).eval() if method == "mend" else FineTune(lr=3.0)
    )
    fast, slow = EditMetrics(), EditMetrics()
    evaluate_batch(editor, backbone, batch, fast)
    oracle_evaluate_batch(editor, backbone, batch, slow)
    fast, slow = flatten_report(fast.compute()), flatten_report(slow.compute())
    assert fast == pytest.approx(slow)
    assert slow["t_locality"] < 1 or slow["i_locality"] < 1  # the edits changed the model: not a trivial comparison


@pytest.mark.parametrize("family", ["blip2", "text"])
def test_batched_and_sequential_edits_fold_into_the_oracle_weights(tokenizer, family):
    """A batched edit (rows summed) and an edit on top of it give the dense weights the oracle computes."""
    torch.manual_seed(2)
    backbone = tiny_backbone(family, tokenizer).eval()
    batch = make_batch(backbone)
    editor = trained_like(MEND.for_backbone(backbone, rank=8, edit_lr=1e-3)).eval()
    inputs = StepInputs(backbone, {"first": batch["edit_inner"], "second": batch["edit_outer"]})
    model = WeightEditedModel(backbone)
    with torch.no_grad():
        first = editor(model, inputs, inputs.rows("first"), batched=True)
        editor(model, inputs, inputs.rows("second")[:1], on_top_of=first[:1])
        expected = mend_weights(editor, backbone, batch["edit_inner"])
        second = {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in batch["edit_outer"].items()}
        expected = dense_edit(editor, backbone, second, expected)
    got = model.weights()
    for name, w in backbone.editable_parameters().items():
        update, expected_update = got[name] - w, expected[name] - w
        assert expected_update.abs().max() > 0
        torch.testing.assert_close(update, expected_update, rtol=1e-3, atol=1e-3 * float(expected_update.abs().max()))
