"""Meta-training MEND (Mitchell et al., "Fast Model Editing at Scale", ICLR 2022).

A step edits every record on its own from the frozen backbone's weights, all in one batched edit (an
`WeightEditedModel` group per record); then one forward asks each edited model for the new answer on the
rephrased prompt (cedit) and on another image of the same thing (iedit), and for unchanged output
distributions on unrelated text and image inputs (cloc: KL against the unedited model, whose answers
are cached per record across epochs), and with `neighbor_locality` on the records' near neighbours too
(their unedited answers computed each step). Only the editor learns: the transform at `lr`, the per-layer
step sizes at `lr_lr`.

Sequence-aware training (`sequence_length` K > 1, after RLEdit: Li et al. 2025, "Reinforced Lifelong
Editing for Language Models", arXiv 2502.05759). MEND is meta-trained on single edits of the unedited
weights, and a sequence of edits at test time meets weights it never saw (issue 16 measures the collapse).
RLEdit trains the hypernetwork over whole edit sequences: each edit is made on the weights the previous
ones produced; the losses after every edit are its (negative) rewards, discounted; they score the newest
edit, the retention of earlier ones ("memory backtracking") and locality against the unedited model; and
an L2 penalty on each edit's parameter shift keeps the weights from drifting.
Here a step's B records form ceil(B / K) chains of up to K edits (record i: chain i mod C, position
i div C); edit k of every chain is computed in one batched call on top of edit k-1's group (`on_top_of`:
capture sees the earlier edits), which is MEND's own per-group batching reused along the chain. After
edit k, one post-edit forward over the records edited so far, each under its chain's group there, gives
loss_k = cedit * NLL on the newest edit's rephrases (iedit for its image rephrase) + `cretain` * NLL on
the earlier edits' rephrases (text and image, their mean) + cloc * KL against the unedited model on
those records' locality inputs. The step's loss is sum_k `discount`^(K - k) * loss_k: with discount 0
(the default) the chain's end alone, one forward; with gamma > 0 up to K forwards. `cnorm` adds
cnorm * the mean over the step's edits of ||Delta W||_F^2 (each edit's own update summed over the
edited weights), computed from the low-rank factors as sum_ij (u_i . u_j)(x_i . x_j), never densely.
What is RLEdit's: training on sequences, a loss after every edit, a discount, retention of earlier
edits, locality against the unedited model, the update-norm penalty. What is ours: chains built from
the batch (RLEdit walks one long sequence of batches through training); the discount weighting the
points of a chain, while all earlier edits of the chain are retained with equal weight (RLEdit's code
weights, after each edit, an older edit's losses by the discount to the power of its age and stops at a
depth); one editor for every position (RLEdit's code trains one hypernetwork per editing iteration);
MEND's transform and learned step sizes.
The gradient reaches every edit of the chain through its terms in the post-edit forwards; the inputs
each edit sees (x, delta) are detached, as in MEND. `backprop_window` W makes the edits more than W
positions before a chain's end under `no_grad` (they shape the weights, but are not trained by the step,
and the points after them are not scored). Memory grows linearly with K, at a fixed batch size: the
stored terms (one rank-one term per gradient row, i.e. per token, per edit), the transform's activations
kept for backward (min(K, W) edits), and the post-edit forwards (with `discount` > 0 about K(K+1)/2
record-forwards per chain instead of K), each applying up to K groups per row. K = 1, discount 0,
cnorm 0 is the single-edit step, bit for bit. `max_edit_ratio` (ours; `MEND.limit_edits`) scales every edit
of a chain, the differentiable way, to at most that fraction of the edited weights' norm: a hard budget where
`cnorm` is a soft one.

The editor's normalisation statistics are committed once per step, merged across processes, and not
at all for a skipped step; a step whose loss is not finite on any process is skipped on all of them
(counted in `skipped_steps`): no statistics and no optimizer update. So under DDP, N processes with B
records each train as one process with N*B records would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import grad_norm

from kedit_lightning.backbones import Backbone, BackboneSpec
from kedit_lightning.editors.edited_model import StepInputs, WeightEditedModel
from kedit_lightning.editors.losses import masked_kl, per_example_nll
from kedit_lightning.editors.mend import MEND
from kedit_lightning.evaluation import HOPS, NEIGHBOR, Protocol
from kedit_lightning.modules.editing import EditorModule

POST_EDIT = ("edit_outer", "edit_outer_image", "loc", "loc_image")
LOCALITY = ("loc", "loc_image")
FINITE_BATCHES_KEY = "kedit_finite_batches"


class LocalityTargets:
    """The unedited model's answer logits on each record's locality inputs, kept across epochs (the
    backbone is frozen, so they never change), up to `max_bytes`; records beyond that are recomputed."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: dict[str, tuple[torch.Tensor, ...]] = {}
        self.names = LOCALITY  # the locality sub-batches of the data: `loc` alone for text-only data

    def get(self, keys: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """The batch's targets per locality sub-batch, or None unless every record is cached."""
        if not keys or any(key not in self.entries for key in keys):
            return None
        return {name: torch.cat([self.entries[key][i] for key in keys]) for i, name in enumerate(self.names)}

    def put(self, keys: Sequence[str], targets: Mapping[str, torch.Tensor], counts: Mapping[str, list[int]]) -> None:
        """Store each record's targets per locality sub-batch of `targets` (text-only data has `loc` only)."""
        self.names = tuple(targets)
        per_record = {name: targets[name].detach().split(counts[name]) for name in self.names}
        for i, key in enumerate(keys):
            entry = tuple(per_record[name][i].clone() for name in self.names)
            size = sum(t.numel() * t.element_size() for t in entry)
            if key not in self.entries and self.bytes + size <= self.max_bytes:
                self.entries[key] = entry
                self.bytes += size


class ChainPoint(NamedTuple):
    """The chains after their k-th edit: each record's chain's group there [B], the records scored there [B]
    (those edited so far), each scored chain's newest edit [B] (a chain shorter than K, when K does not divide
    the batch, ends one edit early), and whether the editor is trained through this point's edits."""

    groups: torch.Tensor
    scored: torch.Tensor
    newest: torch.Tensor
    trained: bool


def chain_edits(
    editor: MEND, model: WeightEditedModel, inputs: StepInputs, sequence_length: int, window: int | None
) -> list[ChainPoint]:
    """Edit the `edit_inner` records as chains (see the module docstring); the chains after each edit."""
    rows = inputs.rows("edit_inner")
    n_chains = -(-len(rows) // sequence_length)
    steps = -(-len(rows) // n_chains)
    records = torch.arange(len(rows))
    chain, position = records % n_chains, records // n_chains
    end = (len(rows) - 1 - chain) // n_chains  # the position of each record's chain's last edit
    last: torch.Tensor | None = None
    points = []
    for step in range(steps):
        step_rows = rows[step * n_chains : (step + 1) * n_chains]
        on_top_of = None if last is None else last[: len(step_rows)]
        trained = window is None or step >= steps - window
        with nullcontext() if trained else torch.no_grad():
            groups = editor(model, inputs, step_rows, on_top_of)
        last = groups if last is None else torch.cat([groups, last[len(groups) :]])
        scored = position <= step  # only the last step can leave chains out, and it scores every record
        newest = scored & (position == end.clamp(max=step))
        points.append(ChainPoint(last[chain], scored, newest, trained))
    return points


def point_losses(
    model: WeightEditedModel,
    inputs: StepInputs,
    batch: Mapping[str, Any],
    names: Sequence[str],
    pre: Mapping[str, torch.Tensor],
    point: ChainPoint,
) -> dict[str, torch.Tensor]:
    """The outer loss's parts at one point of the chains: one post-edit forward over the scored records'
    `names` rows, each under its chain's group there."""
    records = torch.arange(len(point.groups))
    record_of = {name: batch["neighbor_record"].cpu() if name == NEIGHBOR else records for name in names}
    keep = {name: point.scored[record_of[name]] for name in names}
    names = [name for name in names if bool(keep[name].any())]  # a record may have no neighbours
    device = inputs.labels.device
    rows = {name: inputs.rows(name)[keep[name].to(device)] for name in names}
    groups = torch.cat([point.groups[record_of[name][keep[name]]] for name in names])
    logits = model.answer_logits(inputs, torch.cat([rows[name] for name in names]), groups)
    post = dict(zip(names, logits.split([int(inputs.answer_counts(rows[name]).sum()) for name in names])))
    labels = {name: batch[name]["labels"][keep[name].to(device)] for name in names}
    rephrased = [name for name in ("edit_outer", "edit_outer_image") if name in post]
    nll = {name: per_example_nll(post[name], labels[name]) for name in rephrased}
    newest = point.newest[point.scored].to(device)
    parts = {
        "edit": nll["edit_outer"][newest].mean(),
        "loc": sum(
            masked_kl(scored_rows(inputs, name, pre[name], keep[name]), post[name], labels[name])
            for name in names
            if name in (*LOCALITY, NEIGHBOR)
        ),
    }
    if "edit_outer_image" in post:
        parts["image_edit"] = nll["edit_outer_image"][newest].mean()
    if not bool(newest.all()):
        parts["retain"] = sum(nll[name][~newest].mean() for name in rephrased)
    return parts


def scored_rows(inputs: StepInputs, name: str, logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The answer logits of sub-batch `name`'s kept rows, from those of all its rows."""
    if bool(keep.all()):
        return logits
    counts = inputs.answer_counts(inputs.rows(name)).tolist()
    return torch.cat([part for part, kept in zip(logits.split(counts), keep.tolist()) if kept])


def outer_losses(
    editor: MEND,
    backbone: Backbone,
    batch: Mapping[str, Any],
    pre: Mapping[str, torch.Tensor] | None = None,
    cache: LocalityTargets | None = None,
    neighbors: bool = False,
    sequence_length: int = 1,
    window: int | None = None,
    discount: float = 0.0,
    norm: bool = False,
) -> dict[str, torch.Tensor]:
    """The outer loss's parts for a batch: the records edited in chains of `sequence_length` (1: each
    on its own), scored after the chains' last edit and, with `discount` gamma > 0, after each earlier
    edit k too, weighted gamma^(K - k) (the module docstring says what is scored where).

    `pre`: the unedited answer logits on the locality inputs when known (else computed, and stored in
    `cache`). Text-only batches have no image sub-batches, and so no `image_edit` part; chains of one
    edit have no `retain` part. With `neighbors`, the batch's near neighbours (`neighbor` rows, each under
    its record's edit) join the locality KL. With `norm`, `norm` is the mean over the step's edits of
    each edit's squared Frobenius norm ||Delta W||^2 (summed over the edited weights)."""
    post_edit = [key for key in POST_EDIT if key in batch]
    locality = [key for key in LOCALITY if key in batch]
    neighbor = [NEIGHBOR] if neighbors and NEIGHBOR in batch else []
    inputs = StepInputs(backbone, {key: batch[key] for key in ("edit_inner", *post_edit, *neighbor)})
    model = editor.edited_model(backbone)
    points = chain_edits(editor, model, inputs, sequence_length, window)
    if pre is None:
        with torch.no_grad():  # a pass of its own: in the post-edit one, backward would run through these rows too
            pre = inputs.split(model.answer_logits(inputs, inputs.rows(*locality)), locality)
        if cache is not None and "meta" in batch:
            counts = {name: inputs.answer_counts(inputs.rows(name)).tolist() for name in locality}
            cache.put([meta["origin"] for meta in batch["meta"]], pre, counts)
    if neighbor:  # computed every step: the cache holds one row per record and sub-batch
        with torch.no_grad():
            pre = {**pre, NEIGHBOR: model.answer_logits(inputs, inputs.rows(NEIGHBOR))}
    parts: dict[str, torch.Tensor] = {}
    for k, point in enumerate(points):
        weight = discount ** (len(points) - 1 - k)  # 0 ** 0 = 1: the last point alone when discount is 0
        if weight == 0 or not point.trained:  # edits outside the window give no gradient
            continue
        for name, value in point_losses(model, inputs, batch, [*post_edit, *neighbor], pre, point).items():
            value = value if weight == 1 else weight * value
            parts[name] = value if name not in parts else parts[name] + value
    if norm:
        parts["norm"] = model.squared_norms(torch.arange(model.mark())).mean()
    return parts


class MENDModule(EditorModule):
    def __init__(
        self,
        backbone: BackboneSpec,
        rank: int = 1920,
        n_hidden: int = 1,
        combine: bool = True,
        norm: bool = True,
        lr: float = 1e-6,
        edit_lr: float = 1e-4,
        lr_lr: float = 1e-4,
        cedit: float = 0.1,
        iedit: float = 0.1,
        cloc: float = 1.0,
        cache_locality: bool = True,
        locality_cache_mb: int = 512,
        neighbor_locality: bool = False,
        hops: Sequence[str] = HOPS,
        logged_edits: int = 4,
        variant: str = "paper",
        sequence_length: int = 1,
        backprop_window: int | None = None,
        cretain: float | None = None,
        discount: float = 0.0,
        cnorm: float = 0.0,
        max_edit_ratio: float | None = None,
        protocol: Protocol = "kedit",
    ) -> None:
        """`variant`: see `editors.mend`. `sequence_length`, `backprop_window`: sequence-aware training (see
        the module docstring); `cretain`: the retention term's weight (default: `cedit`); `discount`: the weight
        gamma of the losses after each earlier edit of a chain (0: the chain's end alone); `cnorm`: the weight of
        the penalty on each edit's squared norm ||Delta W||_F^2; `max_edit_ratio`: each edit scaled down to at
        most this times the edited weights' norm (`MEND.limit_edits`), in training and in the exported editor."""
        if variant not in MEND.VARIANTS:
            raise ValueError(f"model.variant must be one of {', '.join(MEND.VARIANTS)}; got {variant!r}")
        if not isinstance(sequence_length, int) or sequence_length < 1:
            raise ValueError(f"model.sequence_length must be an integer >= 1; got {sequence_length!r}")
        if backprop_window is not None and (not isinstance(backprop_window, int) or backprop_window < 1):
            raise ValueError(f"model.backprop_window must be an integer >= 1 or null; got {backprop_window!r}")
        if not isinstance(discount, int | float) or not 0 <= discount <= 1:
            raise ValueError(f"model.discount must be a number in [0, 1]; got {discount!r}")
        if not isinstance(cnorm, int | float) or not cnorm >= 0:
            raise ValueError(f"model.cnorm must be a number >= 0; got {cnorm!r}")
        if max_edit_ratio is not None and not (isinstance(max_edit_ratio, int | float) and max_edit_ratio > 0):
            raise ValueError(f"model.max_edit_ratio must be a number > 0 or null; got {max_edit_ratio!r}")
        super().__init__(backbone, hops, logged_edits, protocol)
        self.save_hyperparameters()
        self.editor: MEND | None = None
        # A buffer, so the count of skipped (non-finite) steps survives checkpoint and resume.
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.finite_batches = 0  # batches with a finite loss since the last optimizer step
        self.locality_targets = LocalityTargets(locality_cache_mb * 2**20 if cache_locality else 0)

    def build_editor(self, backbone: Backbone) -> None:
        hp = self.hparams
        self.editor = MEND.for_backbone(
            backbone,
            rank=hp.rank,
            n_hidden=hp.n_hidden,
            combine=hp.combine,
            norm=hp.norm,
            edit_lr=hp.edit_lr,
            variant=hp.variant,
            max_edit_ratio=hp.max_edit_ratio,
        )

    def _cached_targets(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        keys = [meta["origin"] for meta in batch.get("meta", ())]
        cached = self.locality_targets.get(keys)
        # A sharded backbone's forwards are collective: every rank computes when any has to.
        if self.device_mesh is not None and not self.trainer.strategy.reduce_boolean_decision(
            cached is not None, all=True
        ):
            return None
        return cached

    def step_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        return outer_losses(
            self.editor,
            self.backbone,
            batch,
            self._cached_targets(batch),
            self.locality_targets,
            hp.neighbor_locality,
            hp.sequence_length,
            hp.backprop_window,
            hp.discount,
            hp.cnorm > 0,
        )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        parts = self.step_losses(batch)
        hp = self.hparams
        loss = hp.cedit * parts["edit"] + hp.iedit * parts.get("image_edit", 0.0) + hp.cloc * parts["loc"]
        if "retain" in parts:
            loss = loss + (hp.cedit if hp.cretain is None else hp.cretain) * parts["retain"]
        if "norm" in parts:
            loss = loss + hp.cnorm * parts["norm"]
        pending = self.editor.take_pending_statistics()
        # Every rank must agree, or DDP would wait forever for the gradients of a skipped rank.
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        self.skipped_steps += int(not finite)
        # Logged the same way on every step: Lightning refuses a key logged two ways in one epoch.
        self.log("train/skipped_steps", self.skipped_steps.float(), prog_bar=True)
        if not finite:
            # Lightning's DDP needs a loss from every rank (None is refused): this one gives the
            # editor exact zero gradients, and `on_before_optimizer_step` then drops them.
            return sum(p.sum() for p in self.editor.parameters()) * 0.0
        self.finite_batches += 1
        if pending.numel():
            # [world size, L] in rank order (just [L] on one device): every rank commits the same.
            self.editor.commit_statistics(self.all_gather(pending))
        batch_size = batch["edit_inner"]["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/loss_{k}": v for k, v in parts.items()}, batch_size=batch_size)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        finite_batches, self.finite_batches = self.finite_batches, 0
        if not finite_batches:
            # Adam leaves a parameter without a gradient alone, its moments and step count included.
            optimizer.zero_grad(set_to_none=True)
            return
        # One tag family per kind (TensorBoard groups tags by their first component): grad_norm/<editor
        # parameter> and grad_norm/total, edit_lr/<edited parameter>.
        norms = grad_norm(self.editor, norm_type=2)
        total = norms.pop("grad_2.0_norm_total")
        self.log_dict({"grad_norm/total": total, **{f"grad_norm/{k.split('/', 1)[1]}": v for k, v in norms.items()}})
        for name, lr in zip(self.editor.param_names, self.editor.edit_lrs.detach()):
            self.log(f"edit_lr/{name}", lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[FINITE_BATCHES_KEY] = self.finite_batches  # non-zero when saved within an accumulation

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.finite_batches = checkpoint.get(FINITE_BATCHES_KEY, 0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return editor_optimizer(self.editor, self.hparams.lr, self.hparams.lr_lr)


def editor_optimizer(editor: MEND, lr: float, lr_lr: float) -> torch.optim.Adam:
    """Adam on the transforms at `lr` and on the step sizes at `lr_lr`. Fused: one pass over the editor's
    parameters (tens of millions at rank 1920) instead of several, a fifth of the time on a CPU."""
    return torch.optim.Adam(
        [{"params": editor.editor_parameters(), "lr": lr}, {"params": editor.lr_parameters(), "lr": lr_lr}], fused=True
    )
