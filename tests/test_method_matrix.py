"""Every editing method on every backbone family at tiny size: one edit of one record through the one evaluation
loop (`evaluate_batch`), checked against the backbone's own full forward. The README's method x backbone table
marks these cells "tested"; a new family is one entry in `TINY_CONFIGS`, a new method one in `METHODS`."""

import pytest
import torch
from conftest import TINY_BERT
from test_backbones import TINY, draw_images, make_tokenizer, tiny_backbone
from test_llava_onevision import onevision
from test_qwen2_vl import TINY_QWEN, qwen

from data_modules.encoding import IGNORE_INDEX, SUB_BATCH_KEYS
from data_modules.text_records import TextRecord
from kedit_lightning.baselines import load_baseline
from kedit_lightning.editors.mend import MEND
from kedit_lightning.editors.serac import SERAC, SERACEncoder
from kedit_lightning.evaluation import HEADLINE, EditMetrics, evaluate_batch
from kedit_lightning.modules.serac import ScopeEncoderSpec

# Each family's tiny backbone: the builder its own tests use, and the name that builder takes.
TINY_CONFIGS = {
    **{family: (tiny_backbone, family) for family in TINY},
    **{family: (qwen, family) for family in TINY_QWEN},
    "llava_onevision": (lambda family, tokenizer: onevision(tokenizer), "llava_onevision"),
}
METHODS = ["mend", "serac", "ft", "ft-l", "lora", "ike", "grace", "wise"]
# The configured baselines with a few optimisation steps: a cell checks that the method runs and moves the answer.
FEW_STEPS = {"ft-l": {"steps": 3}, "lora": {"steps": 3}, "grace": {"n_iter": 3}, "wise": {"n_iter": 3}}
# One record; "image" sub-batches see the edit image (or another one) on image families only.
RECORD = {
    "edit_inner": ("Where is this object located?", "Velor", "edit"),
    "edit_outer": ("Question: where is the object located?", "Velor", "edit"),
    "edit_outer_image": ("Where is this object located?", "Velor", "other"),
    "loc": ("The capital of Zandia is", "Marun", None),
    "loc_image": ("What colour is the object?", "blue", "other"),
}
IMAGE_ONLY = ("edit_outer_image", "loc_image")
DEMONSTRATIONS = [
    TextRecord(
        src="What colour is the object?", rephrase="colour?", alt="green", loc="Where is Velor?", loc_ans="Marun"
    ),
    TextRecord(src="The capital of Zandia is", rephrase="Where is Zandia?", alt="Velor", loc="colour?", loc_ans="red"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def backbone(request, tokenizer):
    build, name = TINY_CONFIGS[request.param]
    torch.manual_seed(0)
    return build(name, tokenizer).eval()


def image_family(backbone) -> bool:
    return backbone.family != "text"


def one_record(encoder, with_images: bool) -> dict:
    """The record's sub-batches as the data pipeline encodes them (text families: no image sub-batches)."""
    images = dict(zip(("edit", "other"), draw_images()))
    batch = {}
    for key in SUB_BATCH_KEYS:
        prompt, target, image = RECORD[key]
        if key in IMAGE_ONLY and not with_images:
            continue
        batch[key] = encoder([prompt], [target], [images[image]] if with_images and image else None)
    return batch


def serac_for(backbone, tokenizer, tokenizer_dir: str) -> tuple[SERAC, SERACEncoder]:
    """An untrained SERAC beside `backbone`: a tiny BERT scope encoder and a tiny text LM as counterfactual model."""
    scope_encoder, scope_tokenizer = ScopeEncoderSpec(config=TINY_BERT, tokenizer=tokenizer_dir).build()
    counterfactual = tiny_backbone("text", tokenizer)
    image_dim = backbone.model.get_input_embeddings().embedding_dim
    editor = SERAC.build(scope_encoder, counterfactual.model, image_dim)
    return editor, SERACEncoder(backbone.processor, scope_tokenizer, counterfactual.processor)


def editor_for(method: str, backbone, tokenizer, tokenizer_dir: str):
    """(editor, the encoder its inputs are encoded with)."""
    torch.manual_seed(0)
    if method == "mend":  # identity-initialised: its edit is the normalised gradient, scaled by edit_lr
        return MEND.for_backbone(backbone, rank=8, edit_lr=1e-2), backbone.processor
    if method == "serac":
        return serac_for(backbone, tokenizer, tokenizer_dir)
    _, editor = load_baseline(method)
    if method in FEW_STEPS:
        editor = type(editor).from_config({**editor.config, **FEW_STEPS[method]})
    if method == "ike":
        editor.demonstrate(DEMONSTRATIONS)
    return editor, backbone.processor


class RecordedMetrics(EditMetrics):
    """EditMetrics that keep what the evaluation loop scored: the pre-edit locality logits among it."""

    def update(self, labels, post, pre, *args, **kwargs) -> None:
        self.pre = dict(pre)
        super().update(labels, post, pre, *args, **kwargs)


@torch.no_grad()
def full_forward(backbone, sub_batch: dict) -> torch.Tensor:
    """The backbone's own transformers forward, read at the answer positions (position t - 1 predicts token t)."""
    logits = backbone.model_logits(sub_batch["input_ids"], sub_batch["attention_mask"], sub_batch.get("pixel_values"))
    labels = sub_batch["labels"]
    return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]


@pytest.mark.parametrize("method", METHODS)
def test_one_edit_moves_the_answer_and_keeps_the_unedited_model(backbone, method, tokenizer, tokenizer_dir):
    editor, encoder = editor_for(method, backbone, tokenizer, tokenizer_dir)
    batch = one_record(encoder, image_family(backbone))
    weights = {name: w.clone() for name, w in backbone.editable_parameters().items()}
    metrics = RecordedMetrics()
    post = evaluate_batch(editor, backbone, batch, metrics)

    edit = full_forward(backbone, batch["edit_inner"])
    assert post["edit_inner"].shape == edit.shape
    moved = float((post["edit_inner"].detach() - edit).abs().max())
    assert moved > 1e-3, f"{backbone.family} / {method}: the edit moved the answer logits by only {moved}"
    for key in ("loc", "loc_image"):
        if key in batch:
            torch.testing.assert_close(metrics.pre[key], full_forward(backbone, batch[key]), rtol=1e-4, atol=1e-5)
    for name, w in backbone.editable_parameters().items():  # evaluation leaves the backbone as it was
        assert torch.equal(w, weights[name]), name

    report = metrics.compute()
    expected = set(HEADLINE) if image_family(backbone) else {"reliability", "t_generality", "t_locality"}
    assert {key for key in report if key in HEADLINE} == expected
    assert set(report["exact_match"]) == expected and report["n_edits"] == 1
    for value in [*(report[key] for key in expected), *report["exact_match"].values()]:
        assert 0.0 <= value <= 1.0
