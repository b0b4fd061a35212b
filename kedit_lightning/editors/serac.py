"""SERAC: an edit memory, a scope classifier and a counterfactual model; the base model is never changed.

Mitchell, Lin, Bosselut, Manning and Finn, "Memory-Based Model Editing at Scale", ICML 2022
(https://arxiv.org/abs/2206.06520).

1. Edit memory. An edit is kept as its descriptors, together with the base model's features of
   the edit image: for the scope classifier the edit prompt (with `scope_target`, followed by the
   new answer), for the counterfactual model the edit prompt followed by the new answer.
2. Scope classifier. Scores (memory entry, input) pairs as the log-probability that the input is in
   the entry's scope; an input goes with its best-scoring entry, and is in scope when that
   probability is >= threshold. The paper's two architectures: an embedding classifier embeds
   entries and inputs separately, so an entry is embedded once, when it is added, and a lookup is
   one encoder pass per input plus one distance matrix over the whole memory; a cross-encoder
   (`cross`) reads entry and input together in one encoder pass per pair. The embedding
   classifier's score is the published one, `distance`: log p = -scale * ||e - x||^2 on the
   encoder's first-token (CLS) state, scale 1 (the reference code's `rep` algorithm); `cosine`
   is ours: log p = log sigmoid(a * cos + b) on mean-pooled states, a and b learned. Going past
   the public multimodal SERAC, whose classifier reads text only: with `image_dim` set, every
   variant also reads the base model's features of the edit image and of the input image, so the
   same question about another picture is out of scope.
3. Counterfactual model. A small causal LM reads the retrieved edit's descriptor, the input
   image's base-model features mapped into its embedding space by a trained projection, and the
   input, and answers as if the edit were true.
4. Routing. In-scope inputs get the counterfactual model's logits, the rest the base model's,
   unchanged. Ours, for lifelong editing: among entries scoring within `recency_margin` (log-probability)
   of the best, the newest wins, so a later edit of the same fact supersedes an earlier one (a repeated
   edit ties exactly; another picture of the same subject scores close to every entry about it).
   `MemoryEditedModel` is SERAC's edited model: memory entries in edit groups (as `WeightEditedModel`'s),
   each input routed among the entries of its own group and their ancestors.

The classifier and the counterfactual model read their own tokens. `SERACEncoder` adds them to
every sub-batch in the data pipeline, next to the backbone's, so no forward re-tokenizes text;
`SERAC.read` takes them, and the images' base-model features, from a `StepInputs`.
Routed logits are placed on the base model's answer positions, which needs the counterfactual
model to split each answer into the same token ids as the base (checked when encoding).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from data_modules.encoding import IGNORE_INDEX, SubBatch, SubBatchEncoder
from kedit_lightning.backbones.base import Backbone
from kedit_lightning.editors.edited_model import EditGroups, StepInputs, new_edit_groups

ClassifierKind = Literal["distance", "cosine", "cross"]
CLASSIFIER_KINDS = get_args(ClassifierKind)
# Measured on sequences of 96 to 1,000 synthetic edits (BENCHMARKS.md): wider margins let image rephrases reach
# the newest entry of their subject, but in larger memories also let other subjects' newer entries win.
RECENCY_MARGIN = 0.25
# Artifacts written before `distance` existed call today's `cosine` classifier `embedding`.
RENAMED_KINDS = {"embedding": "cosine"}
# Sub-batch keys that SERACEncoder adds: classifier tokens of the prompt alone (an input) and of
# prompt + target (an edit's descriptor); counterfactual tokens of prompt + target, labels on the target.
SCOPE_QUERY, SCOPE_EDIT, COUNTERFACTUAL = "scope_query", "scope_edit", "cf"


@dataclass
class Tokens:
    """Right-padded token ids [B, L] and their attention mask."""

    ids: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, fields: SubBatch, name: str) -> Tokens:
        if f"{name}_ids" not in fields:
            raise KeyError(
                f"the inputs have no {name}_ids: SERAC reads data encoded by SERACEncoder "
                "(SERACModule makes it the DataModule's processor)"
            )
        return cls(fields[f"{name}_ids"], fields[f"{name}_mask"])

    def rows(self, index: torch.Tensor) -> Tokens:
        return Tokens(self.ids[index], self.mask[index])

    @staticmethod
    def cat(parts: Sequence[Tokens]) -> Tokens:
        """Stack the rows of several paddings (padding id 0: masked out anyway)."""
        width = max(part.ids.shape[1] for part in parts)
        ids = torch.cat([F.pad(part.ids, (0, width - part.ids.shape[1])) for part in parts])
        mask = torch.cat([F.pad(part.mask, (0, width - part.mask.shape[1])) for part in parts])
        return Tokens(ids, mask)


def with_answer_end(tokens: Tokens, labels: torch.Tensor, end_id: int) -> tuple[Tokens, torch.Tensor]:
    """Right-padded prompt + answer rows with `end_id` (the end-of-sequence token greedy decoding stops at) after
    each row's answer, labelled like the answer; rows whose last token is not an answer token stay as they are.
    The counterfactual model trained on these learns where its answer ends: on answer tokens alone, its greedy
    continuation runs on into the next words without a break ("HelsinkiThe"), as a seq2seq counterfactual
    model's target (the paper's T5) would not, since it ends with the end token."""
    length = tokens.mask.sum(1)
    rows = torch.arange(len(length), device=length.device)
    ends = (length > 0) & (labels[rows, (length - 1).clamp(min=0)] != IGNORE_INDEX)
    ids, mask = F.pad(tokens.ids, (0, 1)), F.pad(tokens.mask, (0, 1))
    labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)
    rows, length = rows[ends], length[ends]
    ids[rows, length], mask[rows, length], labels[rows, length] = end_id, 1, end_id
    return Tokens(ids, mask), labels


@dataclass
class ScopeInput:
    """What the scope classifier reads of an edit or an input: text, and pooled image features or None."""

    text: Tokens
    image: torch.Tensor | None  # [B, D]: mean of the base model's image features; zero where has_image is False
    has_image: torch.Tensor  # [B] bool

    def rows(self, index: torch.Tensor) -> ScopeInput:
        return ScopeInput(
            self.text.rows(index), None if self.image is None else self.image[index], self.has_image[index]
        )

    @staticmethod
    def cat(parts: Sequence[ScopeInput]) -> ScopeInput:
        image = None if parts[0].image is None else torch.cat([part.image for part in parts])
        return ScopeInput(
            Tokens.cat([part.text for part in parts]), image, torch.cat([part.has_image for part in parts])
        )


@dataclass
class SERACInputs:
    """Rows of a step as SERAC reads them."""

    query: ScopeInput  # the prompt, for the classifier
    descriptor: ScopeInput  # prompt + target, for the classifier, when the rows are edits
    counterfactual: Tokens  # prompt + target, counterfactual tokens
    counterfactual_labels: torch.Tensor  # [B, L]: the target's tokens, -100 elsewhere
    image_tokens: torch.Tensor | None  # [B, N, D]: the base model's image features (zero where has_image is
    # False), None when no row has an image or SERAC reads none
    has_image: torch.Tensor  # [B] bool
    labels: torch.Tensor  # the base model's labels

    def rows(self, index: torch.Tensor) -> SERACInputs:
        return SERACInputs(
            self.query.rows(index),
            self.descriptor.rows(index),
            self.counterfactual.rows(index),
            self.counterfactual_labels[index],
            None if self.image_tokens is None else self.image_tokens[index],
            self.has_image[index],
            self.labels[index],
        )


def pack(masks: Sequence[torch.Tensor], *values: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Concatenate padded pieces along dim 1 so that each row's unmasked entries come first, in order.

    `masks` are the pieces' [B, L_i] masks; each of `values` is a list of [B, L_i, ...] tensors
    laid out like them. Returns the packed mask, then each packed value, cut to the longest row.
    """
    mask = torch.cat(list(masks), dim=1)
    order = torch.argsort((mask == 0).to(torch.int32), dim=1, stable=True)
    order = order[:, : int(mask.sum(1).max())]
    packed = [mask.gather(1, order)]
    for pieces in values:
        joined = torch.cat(list(pieces), dim=1)
        index = order.view(*order.shape, *([1] * (joined.dim() - 2))).expand(-1, -1, *joined.shape[2:])
        packed.append(joined.gather(1, index))
    return tuple(packed)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] -> [B, H]: the mean over unmasked positions (sentence-transformers' pooling)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def image_projection(image_dim: int, hidden: int) -> nn.Module:
    # LayerNorm first: base-model image features live at the language model's input scale, whatever that is.
    return nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, hidden))


@dataclass
class ScopeKeys:
    """An embedding classifier's vectors of a ScopeInput (image None when it reads text only)."""

    text: torch.Tensor
    image: torch.Tensor | None


def log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from log p <= 0; p = 1 gives log(eps), not -inf (the reference code's guard)."""
    return (-torch.expm1(log_p)).clamp(min=torch.finfo(log_p.dtype).eps).log()


class ScopeClassifier(nn.Module):
    """Scores (edit, input) pairs: the log-probability that the input is in the edit's scope.

    `encoder` is any transformers encoder (AutoModel) that takes `input_ids` or `inputs_embeds`
    with an `attention_mask` and returns `last_hidden_state`. `image_dim` (the base model's image
    feature size) makes the classifier read images too; None reads text only. Image vectors are a
    two-layer MLP of the pooled image features, zero for a side without an image.

    distance (published): log p = -scale * (||t_e - t_x||^2 + ||i_e - i_x||^2), text vectors the
    encoder's first-token state, scale a fixed 1 (a buffer, as in the reference code).
    cosine (ours): log p = log sigmoid(a * cos(t_e, t_x) + b * cos(i_e, i_x) + c), text vectors the
    mean-pooled states; a, b, c learned.
    cross: the encoder reads [edit text, edit image, input text, input image] as one sequence
    (each image one token, left out when absent); log p = log sigmoid of a linear head on the
    mean-pooled states.
    """

    def __init__(self, encoder: nn.Module, kind: ClassifierKind = "distance", image_dim: int | None = None) -> None:
        super().__init__()
        if kind not in CLASSIFIER_KINDS:
            raise ValueError(f"scope classifier must be one of {', '.join(CLASSIFIER_KINDS)}, got {kind!r}")
        self.encoder = encoder
        self.kind = kind
        self.image_dim = image_dim
        hidden = encoder.config.hidden_size
        # Two layers: "same object, another photo" is not a linear function of the pooled features.
        self.image_projection = (
            nn.Sequential(image_projection(image_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            if image_dim
            else None
        )
        if kind == "distance":
            self.register_buffer("scale", torch.tensor(1.0))
        elif kind == "cosine":
            # At first an input is in scope when its text cosine passes 0.5 (10 * 0.5 - 5 = 0).
            self.text_scale = nn.Parameter(torch.tensor(10.0))
            self.bias = nn.Parameter(torch.tensor(-5.0))
            # Only when images are read: a parameter without gradients would stall DDP.
            self.image_scale = nn.Parameter(torch.tensor(10.0)) if image_dim else None
        else:
            self.head = nn.Linear(hidden, 1)

    @property
    def embeds(self) -> bool:
        """Entries and inputs are embedded separately (an entry's keys are kept in the memory)."""
        return self.kind != "cross"

    def _images(self, scope: ScopeInput) -> torch.Tensor:
        if scope.image is None:
            raise ValueError("this scope classifier reads images, but the inputs carry no image features")
        return self.image_projection(scope.image)

    def embed(self, scope: ScopeInput) -> ScopeKeys:
        """Keys of an embedding classifier: distance's raw vectors, cosine's unit vectors."""
        text = self.encoder(input_ids=scope.text.ids, attention_mask=scope.text.mask).last_hidden_state
        unit = self.kind == "cosine"
        keys = ScopeKeys(F.normalize(mean_pool(text, scope.text.mask), dim=-1) if unit else text[:, 0], None)
        if self.image_projection is not None:
            image = self._images(scope)
            keys.image = (F.normalize(image, dim=-1) if unit else image) * scope.has_image.unsqueeze(-1)
        return keys

    def similarity(self, edits: ScopeKeys, inputs: ScopeKeys, pairwise: bool) -> torch.Tensor:
        """Log-probabilities from keys: [E] for aligned pairs (`pairwise`), else [X, E] for every input
        against every edit (one matrix product over the whole memory)."""

        def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a * b).sum(-1) if pairwise else b @ a.T

        def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if pairwise:
                return (a - b).pow(2).sum(-1)
            # One matrix product (|b|^2 + |a|^2 - 2 b.a), around the inputs' mean: distances stay the same, and the
            # large component all encoder states share no longer cancels in float32.
            center = b.mean(0)
            a, b = a - center, b - center
            return (b.pow(2).sum(-1, keepdim=True) + a.pow(2).sum(-1) - 2 * b @ a.T).clamp(min=0.0)

        if self.kind == "distance":
            distance = squared_distance(edits.text, inputs.text)
            if edits.image is not None:
                distance = distance + squared_distance(edits.image, inputs.image)
            return -self.scale * distance
        score = self.text_scale * dot(edits.text, inputs.text) + self.bias
        if edits.image is not None:
            score = score + self.image_scale * dot(edits.image, inputs.image)
        return F.logsigmoid(score)

    def _cross(self, edits: ScopeInput, inputs: ScopeInput) -> torch.Tensor:
        embed = self.encoder.get_input_embeddings()
        masks, pieces = [edits.text.mask], [embed(edits.text.ids)]
        if self.image_projection is not None:
            masks.append(edits.has_image.long().unsqueeze(1))
            pieces.append(self._images(edits).unsqueeze(1))
        masks.append(inputs.text.mask)
        pieces.append(embed(inputs.text.ids))
        if self.image_projection is not None:
            masks.append(inputs.has_image.long().unsqueeze(1))
            pieces.append(self._images(inputs).unsqueeze(1))
        mask, embeds = pack(masks, pieces)
        hidden = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return F.logsigmoid(self.head(mean_pool(hidden, mask)).squeeze(-1))

    def forward(self, edits: ScopeInput, inputs: ScopeInput, edit_keys: ScopeKeys | None = None) -> torch.Tensor:
        """[P] log-probabilities of aligned pairs, edit p against input p (`edit_keys`: the edits' keys, if known)."""
        if self.embeds:
            return self.similarity(
                edit_keys if edit_keys is not None else self.embed(edits), self.embed(inputs), pairwise=True
            )
        return self._cross(edits, inputs)

    def score_all(self, edits: ScopeInput, inputs: ScopeInput, edit_keys: ScopeKeys | None = None) -> torch.Tensor:
        """[X, E] log-probabilities of every input against every edit (`edit_keys`: the edits' keys, if known)."""
        if self.embeds:
            return self.similarity(
                edit_keys if edit_keys is not None else self.embed(edits), self.embed(inputs), pairwise=False
            )
        n_inputs, n_edits = inputs.has_image.shape[0], edits.has_image.shape[0]
        input_rows = torch.arange(n_inputs, device=inputs.has_image.device).repeat_interleave(n_edits)
        edit_rows = torch.arange(n_edits, device=edits.has_image.device).repeat(n_inputs)
        return self._cross(edits.rows(edit_rows), inputs.rows(input_rows)).view(n_inputs, n_edits)


class CounterfactualModel(nn.Module):
    """A causal LM answering as if an edit were true: reads [edit descriptor, image, input].

    The image is the base model's features of the input image, average-pooled to at most
    `image_tokens` tokens and mapped into the LM's embedding space by a trained projection
    (`image_dim` None: text only). Returns logits aligned with the returned labels (the causal
    shift is done here, as the Backbone contract has it).
    """

    def __init__(self, model: nn.Module, image_dim: int | None = None, image_tokens: int = 32) -> None:
        super().__init__()
        self.model = model
        self.image_dim = image_dim
        self.image_tokens = image_tokens
        hidden = model.get_input_embeddings().embedding_dim
        self.image_projection = image_projection(image_dim, hidden) if image_dim else None

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def project_images(self, image_tokens: torch.Tensor) -> torch.Tensor:
        if image_tokens.shape[1] > self.image_tokens:
            image_tokens = F.adaptive_avg_pool1d(image_tokens.transpose(1, 2), self.image_tokens).transpose(1, 2)
        return self.image_projection(image_tokens)

    def forward(
        self,
        edits: Tokens,
        inputs: Tokens,
        labels: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`has_image` [B] (None: every row) masks out the image tokens of rows without an image."""
        embed = self.model.get_input_embeddings()
        ignore = torch.full_like(edits.ids, IGNORE_INDEX)
        masks, pieces, label_pieces = [edits.mask], [embed(edits.ids)], [ignore]
        if self.image_projection is not None and image_tokens is not None:
            projected = self.project_images(image_tokens.to(pieces[0].dtype))
            image_mask = torch.ones(projected.shape[:2], dtype=edits.mask.dtype, device=projected.device)
            if has_image is not None:
                image_mask = image_mask * has_image.to(image_mask.dtype).unsqueeze(1)
            masks.append(image_mask)
            pieces.append(projected)
            label_pieces.append(torch.full(projected.shape[:2], IGNORE_INDEX, dtype=labels.dtype, device=labels.device))
        masks.append(inputs.mask)
        pieces.append(embed(inputs.ids))
        label_pieces.append(labels)
        mask, embeds, packed_labels = pack(masks, pieces, label_pieces)
        logits = self.model(inputs_embeds=embeds, attention_mask=mask).logits
        return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1), packed_labels


class SERACEncoder(SubBatchEncoder):
    """The backbone's SubBatchEncoder, plus the tokens SERAC's classifier and counterfactual model read.

    Adds `scope_query_ids/_mask` (the prompt), `scope_edit_ids/_mask` (prompt + target) with the
    classifier's tokenizer, and `cf_ids/_mask/_labels` (prompt + target, labels on the target)
    with the counterfactual model's encoder. Every answer must split into the same token ids for
    the counterfactual model as for the base, so that routed logits land on the base's answer
    positions; a clear error names the first answer that does not.
    """

    def __init__(self, base: SubBatchEncoder, scope_tokenizer: Any, counterfactual: SubBatchEncoder) -> None:
        super().__init__(
            base.tokenizer,
            base.image_processor,
            base.prompt_format,
            base.max_length,
            family=base.family,
            visual_inputs=base.visual_inputs,
        )
        self.base = base
        if scope_tokenizer.pad_token is None:
            raise ValueError(
                f"the scope classifier's tokenizer ({type(scope_tokenizer).__name__}) has no padding token"
            )
        self.scope_tokenizer = scope_tokenizer
        self.counterfactual = counterfactual

    # The base family's own layout of visual inputs (Qwen2-VL's per-row placeholders and patches).
    def placeholders(self, visual: Any) -> str | None:
        return self.base.placeholders(visual)

    def pixel_values(self, visuals: Sequence[Any]) -> torch.Tensor:
        return self.base.pixel_values(visuals)

    def _scope(self, texts: list[str], name: str) -> dict[str, torch.Tensor]:
        encoded = self.scope_tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return {f"{name}_ids": encoded["input_ids"], f"{name}_mask": encoded["attention_mask"]}

    def __call__(
        self, prompts: Sequence[str], targets: Sequence[str], images: Sequence[Image.Image] | None = None
    ) -> SubBatch:
        sub_batch = super().__call__(prompts, targets, images)
        cf = self.counterfactual(prompts, targets, None)
        for row, (base_labels, cf_labels) in enumerate(zip(sub_batch["labels"], cf["labels"])):
            base_answer, cf_answer = base_labels[base_labels != IGNORE_INDEX], cf_labels[cf_labels != IGNORE_INDEX]
            if not torch.equal(base_answer, cf_answer):
                raise ValueError(
                    f"answer {targets[row]!r}: the counterfactual model's tokenizer gives ids {cf_answer.tolist()}, "
                    f"the base's {base_answer.tolist()}; SERAC's routed logits need the same answer tokens (use a "
                    "counterfactual LM with the base's tokenizer)"
                )
        return {
            **sub_batch,
            **self._scope(list(prompts), SCOPE_QUERY),
            **self._scope([f"{p} {t}" for p, t in zip(prompts, targets)], SCOPE_EDIT),
            f"{COUNTERFACTUAL}_ids": cf["input_ids"],
            f"{COUNTERFACTUAL}_mask": cf["attention_mask"],
            f"{COUNTERFACTUAL}_labels": cf["labels"],
        }


class SERAC(nn.Module):
    """The trained parts of SERAC (classifier, counterfactual model) and how they read sub-batches."""

    def __init__(
        self,
        classifier: ScopeClassifier,
        counterfactual: CounterfactualModel,
        image_dim: int | None,
        threshold: float = 0.5,
        scope_target: bool = False,
        recency_margin: float = RECENCY_MARGIN,
    ) -> None:
        super().__init__()
        self.set_routing(threshold, recency_margin)
        self.scope_target = scope_target
        self.classifier = classifier
        self.counterfactual = counterfactual
        self.image_dim = image_dim

    def set_routing(self, threshold: float | None = None, recency_margin: float | None = None) -> None:
        """How inputs are routed: the scope threshold (a probability) and the recency margin (a log-probability);
        None keeps the current value. Neither is trained, so an artifact's can be changed when it is applied."""
        if threshold is not None:
            if not 0.0 < threshold < 1.0:
                raise ValueError(f"threshold must be a probability strictly between 0 and 1, got {threshold}")
            self.threshold = threshold
        if recency_margin is not None:
            if not recency_margin >= 0.0:
                raise ValueError(f"recency_margin must be a log-probability margin >= 0, got {recency_margin}")
            self.recency_margin = recency_margin

    @classmethod
    def build(
        cls,
        scope_encoder: nn.Module,
        language_model: nn.Module,
        image_dim: int,
        kind: ClassifierKind = "distance",
        image_scope: bool = True,
        counterfactual_image: bool = True,
        image_tokens: int = 32,
        threshold: float = 0.5,
        scope_target: bool = False,
        recency_margin: float = RECENCY_MARGIN,
    ) -> SERAC:
        """SERAC around a transformers encoder (the classifier's) and causal LM (the counterfactual model's).

        `image_dim` is the base model's input embedding width (its image features replace
        placeholder embeddings); `image_scope` / `counterfactual_image` say which part reads images.
        `scope_target`: the classifier reads an entry as its prompt and new answer (ours before), not
        its prompt alone (the reference code's entry for decoder LMs, which answer after the prompt).
        `recency_margin`: entries within this log-probability of an input's best go to the newest (artifacts
        from before the option get the default: it changes nothing for an edit alone).
        """
        return cls(
            ScopeClassifier(scope_encoder, kind, image_dim if image_scope else None),
            CounterfactualModel(language_model, image_dim if counterfactual_image else None, image_tokens),
            image_dim,
            threshold,
            scope_target,
            recency_margin,
        )

    @property
    def config(self) -> dict[str, Any]:
        """`build`'s arguments as plain data, the two models as their transformers configs (for artifacts)."""
        return {
            "scope_encoder": self.classifier.encoder.config.to_dict(),
            "language_model": self.counterfactual.model.config.to_dict(),
            "image_dim": self.image_dim,
            "kind": self.classifier.kind,
            "image_scope": self.classifier.image_dim is not None,
            "counterfactual_image": self.counterfactual.image_dim is not None,
            "image_tokens": self.counterfactual.image_tokens,
            "threshold": self.threshold,
            "scope_target": self.scope_target,
            "recency_margin": self.recency_margin,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SERAC:
        """The SERAC `config` (a `SERAC.config`) describes, with random weights of the right shapes."""
        options = dict(config)
        kind = options.get("kind", "embedding")
        options["kind"] = RENAMED_KINDS.get(kind, kind)
        options.setdefault("scope_target", True)  # what artifacts from before the option read
        scope_encoder = AutoModel.from_config(AutoConfig.for_model(**options.pop("scope_encoder")))
        language_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**options.pop("language_model")))
        return cls.build(scope_encoder, language_model, **options)

    @property
    def reads_images(self) -> bool:
        return self.classifier.image_projection is not None or self.counterfactual.image_projection is not None

    def read(self, inputs: StepInputs, rows: torch.Tensor) -> SERACInputs:
        """`rows` of `inputs` as SERAC reads them: their SERAC tokens, and the base model's features of
        their images (encoded once per distinct image by `StepInputs`)."""
        labels = inputs.labels[rows]
        image_rows = inputs.image_rows(rows)
        has_image = image_rows >= 0
        image_tokens, pooled = None, None
        if self.reads_images and inputs.image_features is not None and bool(has_image.any()):
            features = inputs.image_features.detach()[image_rows.clamp(min=0)]
            image_tokens = features * has_image.to(features.dtype).view(-1, 1, 1)
            pooled = image_tokens.mean(dim=1).float()
        if self.classifier.image_projection is not None and pooled is None:
            pooled = torch.zeros(len(rows), self.image_dim, device=labels.device)
        counterfactual, counterfactual_labels = _trimmed(
            Tokens.of(inputs.fields, COUNTERFACTUAL).rows(rows), inputs.fields[f"{COUNTERFACTUAL}_labels"][rows]
        )
        return SERACInputs(
            query=ScopeInput(_trimmed(Tokens.of(inputs.fields, SCOPE_QUERY).rows(rows))[0], pooled, has_image),
            descriptor=ScopeInput(
                _trimmed(Tokens.of(inputs.fields, SCOPE_EDIT if self.scope_target else SCOPE_QUERY).rows(rows))[0],
                pooled,
                has_image,
            ),
            counterfactual=counterfactual,
            counterfactual_labels=counterfactual_labels,
            image_tokens=image_tokens,
            has_image=has_image,
            labels=labels,
        )

    def edited_model(self, backbone: Backbone) -> MemoryEditedModel:
        """An empty memory beside `backbone`: the unedited model."""
        return MemoryEditedModel(self, backbone)

    @torch.no_grad()
    def forward(
        self,
        model: MemoryEditedModel,
        inputs: StepInputs,
        rows: torch.Tensor,
        on_top_of: torch.Tensor | None = None,
        batched: bool = False,
    ) -> torch.Tensor:
        """Add the edits of `rows` of `inputs` (prompt + new answer) to `model`'s memory: each row one entry
        in a new group on top of `on_top_of` (default: the unedited model), or with `batched` all rows in
        one group. Returns each row's group."""
        groups, _ = new_edit_groups(model, len(rows), on_top_of, batched)
        edits = self.read(inputs, rows)
        model.add(edits.descriptor, edits.counterfactual, groups)
        return groups


def _trimmed(tokens: Tokens, *aligned: torch.Tensor) -> tuple[Tokens, ...]:
    """Right-padded rows cut to their longest (stacked sub-batches are padded to the widest of them)."""
    width = int(tokens.mask.sum(1).max()) if tokens.mask.numel() else 0
    return (Tokens(tokens.ids[:, :width], tokens.mask[:, :width]), *(t[:, :width] for t in aligned))


EVERY_POSITION_REFUSED = (
    "SERAC answers only at the answer positions (its counterfactual model reads the query in its own tokens), so "
    "the easyedit protocol, which reads every position, does not apply: use protocol kedit or vlkeb"
)


class GrowingRows:
    """Named tensors of rows added over time, in storage that doubles when full, so adding n rows costs
    O(n) however many are stored. A 2-d tensor's rows are right-padded with zeros to the widest added
    (token ids and masks; fixed-width vectors never widen)."""

    def __init__(self) -> None:
        self.storage: dict[str, torch.Tensor] = {}
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.storage[name][: self.length]

    def __contains__(self, name: str) -> bool:
        return name in self.storage

    def add(self, rows: Mapping[str, torch.Tensor]) -> None:
        n = next(iter(rows.values())).shape[0]
        for name, value in rows.items():
            store = self.storage.get(name, value.new_zeros((0, *value.shape[1:])))
            if value.dim() == 2 and value.shape[1] != store.shape[1]:
                width = max(value.shape[1], store.shape[1])
                store, value = F.pad(store, (0, width - store.shape[1])), F.pad(value, (0, width - value.shape[1]))
            if self.length + n > store.shape[0]:
                grown = store.new_zeros((max(2 * store.shape[0], self.length + n, 16), *store.shape[1:]))
                grown[: self.length] = store[: self.length]
                store = grown
            store[self.length : self.length + n] = value
            self.storage[name] = store
        self.length += n

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows at `index`, in that order."""
        self.storage = {name: store[index.to(store.device)] for name, store in self.storage.items()}
        self.length = len(index)


class MemoryEditedModel(EditGroups):
    """SERAC's edited model: memory entries (an edit's classifier and counterfactual descriptors, and for an
    embedding classifier its keys, embedded once when added) in edit groups, beside the unchanged backbone.

    `answer_logits` routes each input among the entries of its group and their ancestors: in scope
    (the best entry's probability >= threshold), the counterfactual model answers given that entry;
    out of scope, in group -1, or with no entry in its chain, the backbone answers, unchanged. The
    entries live on the classifier's device in growing storage (`GrowingRows`); routing scores every
    input against every entry in one matrix operation and masks the entries outside each input's chain
    with an [inputs, entries] mask built from each distinct group's chain (kept until the group is dropped),
    so a lookup costs one product with the memory, not a pass per entry or per chain level.
    `routed` holds the last `answer_logits` call's scope decisions, row for row.
    """

    def __init__(self, serac: SERAC, backbone: Backbone) -> None:
        super().__init__()
        self.serac = serac
        self.backbone = backbone
        self.entries = GrowingRows()
        self._chains: dict[int, torch.Tensor] = {}
        self.routed: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def entry_groups(self) -> torch.Tensor:
        return self.entries["group"] if len(self) else torch.empty(0, dtype=torch.long)

    @property
    def scope(self) -> ScopeInput | None:
        """The entries' classifier descriptors."""
        if not len(self):
            return None
        image = self.entries["scope_image"] if "scope_image" in self.entries else None
        return ScopeInput(
            Tokens(self.entries["scope_ids"], self.entries["scope_mask"]), image, self.entries["has_image"]
        )

    @property
    def counterfactual(self) -> Tokens | None:
        """The entries' counterfactual descriptors."""
        return Tokens(self.entries["cf_ids"], self.entries["cf_mask"]) if len(self) else None

    @property
    def keys(self) -> ScopeKeys | None:
        """An embedding classifier's keys of the entries: one matrix each for text and images."""
        if not len(self) or "key_text" not in self.entries:
            return None
        return ScopeKeys(self.entries["key_text"], self.entries["key_image"] if "key_image" in self.entries else None)

    @torch.no_grad()
    def add(self, scope: ScopeInput, counterfactual: Tokens, groups: torch.Tensor) -> None:
        """Add entries: classifier and counterfactual descriptors row for row, each row in its group of `groups`."""
        if not scope.has_image.shape[0] == counterfactual.ids.shape[0] == groups.shape[0]:
            raise ValueError(
                f"{scope.has_image.shape[0]} scope descriptors, {counterfactual.ids.shape[0]} counterfactual "
                f"descriptors, {groups.shape[0]} groups: one of each per entry"
            )
        device = scope.has_image.device
        rows = {
            "group": groups.to(device),
            "scope_ids": scope.text.ids,
            "scope_mask": scope.text.mask,
            "has_image": scope.has_image,
            "cf_ids": counterfactual.ids.to(device),
            "cf_mask": counterfactual.mask.to(device),
        }
        if scope.image is not None:
            rows["scope_image"] = scope.image
        if self.serac.classifier.embeds:
            keys = self.serac.classifier.embed(scope)
            rows["key_text"] = keys.text
            if keys.image is not None:
                rows["key_image"] = keys.image
        self.entries.add(rows)

    def _chain(self, group: int) -> torch.Tensor:
        """`group` and its ancestors (kept per group asked for: a later group walks only to a known one)."""
        if group not in self._chains:
            walked, ancestor = [], group
            while ancestor >= 0 and ancestor not in self._chains:
                walked.append(ancestor)
                ancestor = self.parents[ancestor]
            device = self.entries["group"].device
            known = self._chains.get(ancestor, torch.empty(0, dtype=torch.long, device=device))
            self._chains[group] = torch.cat([torch.tensor(walked, dtype=torch.long, device=device), known])
        return self._chains[group]

    def in_chains(self, groups: torch.Tensor) -> torch.Tensor:
        """[X, E] bool: entry e is in the chain of row x's group."""
        distinct, row_of = torch.unique(groups.cpu(), return_inverse=True)
        entry_groups = self.entries["group"]
        member = torch.zeros(len(distinct), len(self.parents), dtype=torch.bool, device=entry_groups.device)
        for i, group in enumerate(distinct.tolist()):
            member[i, self._chain(group)] = True
        return member[:, entry_groups][row_of.to(entry_groups.device)]

    @torch.no_grad()
    def route(self, query: ScopeInput, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(in scope [X] bool, memory entry [X]) of each input, among the entries of its group's chain: the
        newest (entries are stored in the order added) of those within `recency_margin` of the best score."""
        scores = self.serac.classifier.score_all(self.scope, query, self.keys)  # [X, E] log-probabilities
        scores = scores.masked_fill(~self.in_chains(groups).to(scores.device), float("-inf"))
        best = scores.max(dim=1).values
        near = (scores >= (best - self.serac.recency_margin).unsqueeze(1)) & (scores > float("-inf"))
        position = torch.arange(scores.shape[1], device=scores.device)
        entry = torch.where(near, position, -1).max(dim=1).values.clamp(min=0)
        return best >= math.log(self.serac.threshold), entry

    @torch.no_grad()
    def answer_logits(
        self, inputs: StepInputs, rows: torch.Tensor, groups: torch.Tensor | None = None, every_position: bool = False
    ) -> torch.Tensor:
        """[P, V] logits at the answer positions of `rows` (row-major), each row under its group (None: unedited).

        One classifier pass for the rows with a group, one counterfactual forward for the in-scope rows,
        one backbone resume for the rest. Answer positions only: the counterfactual model reads the query
        in its own tokens, so its other positions do not line up with the backbone's (`every_position` refused).
        """
        if every_position:
            raise ValueError(EVERY_POSITION_REFUSED)
        labels = inputs.labels[rows]
        in_scope = torch.zeros(len(rows), dtype=torch.bool, device=labels.device)
        vocab = self.backbone.model.get_output_embeddings().weight.shape[0]
        parts = {}
        if groups is not None and len(self) and bool((groups >= 0).any()):
            edited = (groups >= 0).nonzero().flatten()
            queries = self.serac.read(inputs, rows[edited.to(rows.device)])
            routed, entry = self.route(queries.query, groups[edited])
            if bool(routed.any()):
                in_scope[edited[routed.cpu()].to(labels.device)] = True
                parts[True] = self._counterfactual_answers(
                    queries.rows(routed.nonzero().flatten()), entry[routed], vocab
                )
        self.routed = in_scope
        if bool((~in_scope).any()):
            rest = (~in_scope).nonzero().flatten()
            parts[False] = inputs.answer_logits(self.backbone, rows[rest.to(rows.device)])
        answers = labels != IGNORE_INDEX
        positions_in_scope = in_scope.unsqueeze(1).expand_as(answers)[answers]
        dtype = parts[False].dtype if False in parts else parts[True].dtype
        logits = torch.empty(int(answers.sum()), vocab, dtype=dtype, device=labels.device)
        for routed_in, part in parts.items():
            logits[positions_in_scope == routed_in] = part.to(dtype)
        return logits

    # -- edits in force for good (the editing API): the memory keeps them, nothing to fold ----------
    def fold(self) -> None:
        """Nothing to write: SERAC's edits stay in the memory, the weights never change."""

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """Rows in group -1 already get the unedited backbone: nothing to swap."""
        yield

    def drop_after(self, mark: int) -> None:
        """Forget the groups opened since `mark` and their entries (edits tried, not kept)."""
        del self.parents[mark:]
        self._chains = {group: chain for group, chain in self._chains.items() if group < mark}
        if not len(self):
            return
        keep = self.entry_groups < mark
        if not bool(keep.all()):
            self.entries.keep(keep.nonzero().flatten())

    def restore(self) -> None:
        """An empty memory again."""
        self.drop_after(0)

    def _counterfactual_answers(self, queries: SERACInputs, entries: torch.Tensor, vocab: int) -> torch.Tensor:
        """[P, vocab]: the counterfactual model's logits at the answer positions of `queries`, given `entries`."""
        cf_logits, cf_labels = self.serac.counterfactual(
            _trimmed(self.counterfactual.rows(entries.to(self.counterfactual.ids.device)))[0],
            queries.counterfactual,
            queries.counterfactual_labels,
            queries.image_tokens,
            queries.has_image,
        )
        answers = cf_logits[cf_labels != IGNORE_INDEX]
        # Vocabularies may differ in size (padding rows, added image tokens): ids the other lacks never win.
        if answers.shape[-1] < vocab:
            answers = F.pad(answers, (0, vocab - answers.shape[-1]), value=torch.finfo(answers.dtype).min)
        return answers[:, :vocab]
