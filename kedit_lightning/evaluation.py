"""Edit evaluation: apply an editor to each record on its own and score the edited model.

Every record is edited starting from the unedited weights (edits are functional: the backbone's
parameters are never written), so no record leaks into the next. The scores are the field's
standard ones (DESIGN.md, "Metrics"): Reliability, T-/I-Generality, T-/I-Locality, Portability
per hop, each as answer-token accuracy and exact match, averaged per edit.

VLKEB's one-hop-edit variant (`port_edit` rows, see data_modules/vlkeb.py) scores a portability
question after a second edit on top of the record's own: each such row is scored on the model
that `edit_further` gives for its `port_edit` row, the other port rows on the post-edit model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from data_modules.encoding import SUB_BATCH_KEYS, EditBatch, SubBatch
from kedit_lightning.backbones.base import Backbone
from kedit_lightning.metrics import EditAccuracy, EditLocality, PortabilityByHop

EditFn = Callable[[Backbone, SubBatch, Mapping[str, torch.Tensor] | None], dict[str, torch.Tensor]]
"""A weight editor as evaluation sees it: (backbone, edit sub-batch, current weights or None) -> edited weights."""

EditedModel = Callable[[SubBatch], torch.Tensor]
"""The post-edit model as the metrics see it: sub-batch -> logits aligned with labels.

A weight editor's is the backbone with edited weights (`with_weights`); SERAC's routes each
input to its counterfactual model or to the unchanged backbone.
"""

EditFurther = Callable[[SubBatch], EditedModel]
"""The post-edit model with one more edit (a one-row sub-batch) on top of the record's own."""

HOPS = ("1-hop", "2-hop", "3-hop", "4-hop")
ACCURACY_KEYS = ("reliability", "t_generality", "i_generality")
LOCALITY_KEYS = ("t_locality", "i_locality")
HEADLINE = ACCURACY_KEYS + LOCALITY_KEYS
_POST_SUB_BATCH = {
    "reliability": "edit_inner",
    "t_generality": "edit_outer",
    "i_generality": "edit_outer_image",
    "t_locality": "loc",
    "i_locality": "loc_image",
}


def _rows(sub_batch: SubBatch, index: torch.Tensor | slice) -> SubBatch:
    return {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in sub_batch.items()}


def with_weights(backbone: Backbone, params: Mapping[str, torch.Tensor]) -> EditedModel:
    """The backbone with `params` standing in for its edited weights."""
    return partial(backbone, params=params)


def record_batches(batch: EditBatch) -> Iterator[dict[str, Any]]:
    """Split a collated EditBatch into one-record EditBatches; port (and port_edit) rows follow their record."""
    for i in range(batch["edit_inner"]["input_ids"].shape[0]):
        one: dict[str, Any] = {key: _rows(batch[key], slice(i, i + 1)) for key in SUB_BATCH_KEYS}
        if "meta" in batch:
            one["meta"] = batch["meta"][i : i + 1]
        if "port" in batch:
            rows = (batch["port_record"] == i).nonzero().flatten()
            if rows.numel():
                one["port"] = _rows(batch["port"], rows)
                one["port_hops"] = [batch["port_hops"][r] for r in rows.tolist()]
            if "port_edit" in batch:
                # port_edit_row indexes the batch's port rows; here it indexes this record's.
                position = {int(row): k for k, row in enumerate(rows)}
                edits = [e for e, row in enumerate(batch["port_edit_row"].tolist()) if row in position]
                if edits:
                    one["port_edit"] = _rows(batch["port_edit"], torch.tensor(edits))
                    one["port_edit_row"] = torch.tensor([position[batch["port_edit_row"][e].item()] for e in edits])
        yield one


class EditMetrics(nn.Module):
    """All edit metrics of one evaluation, updated one edited record at a time."""

    def __init__(self, hops: Sequence[str] = HOPS) -> None:
        super().__init__()
        self.accuracy = nn.ModuleDict({key: EditAccuracy() for key in ACCURACY_KEYS})
        self.locality = nn.ModuleDict({key: EditLocality() for key in LOCALITY_KEYS})
        self.portability = PortabilityByHop(hops=tuple(hops))
        self.portability_exact = PortabilityByHop(hops=tuple(hops), exact=True)

    @torch.no_grad()
    def update(
        self,
        backbone: Backbone,
        record: Mapping[str, Any],
        edited: EditedModel,
        edit_further: EditFurther | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score one edited record (`backbone` is the pre-edit model); returns its post-edit logits per sub-batch.

        `edit_further` is needed for records with one-hop edits (`port_edit`).
        """
        post = {key: edited(record[key]) for key in SUB_BATCH_KEYS}
        for key in ACCURACY_KEYS:
            self.accuracy[key].update(post[_POST_SUB_BATCH[key]], record[_POST_SUB_BATCH[key]]["labels"])
        for key in LOCALITY_KEYS:
            sub_batch = record[_POST_SUB_BATCH[key]]
            self.locality[key].update(backbone(sub_batch), post[_POST_SUB_BATCH[key]], sub_batch["labels"])
        if "port" in record:
            self._update_portability(record, edited, edit_further)
        return post

    def _update_portability(
        self, record: Mapping[str, Any], edited: EditedModel, edit_further: EditFurther | None
    ) -> None:
        port, hops = record["port"], record["port_hops"]
        further: dict[int, int] = {}  # port row -> its port_edit row
        if "port_edit" in record:
            if edit_further is None:
                raise ValueError(
                    "the data has one-hop edits (port_edit_q / port_edit_a) but no way to apply a further edit was given"
                )
            further = {int(row): e for e, row in enumerate(record["port_edit_row"])}
        plain = [r for r in range(len(hops)) if r not in further]
        scored = [(plain, edited)] if plain else []
        scored += [([row], edit_further(_rows(record["port_edit"], slice(e, e + 1)))) for row, e in further.items()]
        for rows, model in scored:
            sub_batch = _rows(port, torch.tensor(rows))
            logits = model(sub_batch)
            for metric in (self.portability, self.portability_exact):
                metric.update(logits, sub_batch["labels"], [hops[r] for r in rows])

    def compute(self) -> dict[str, Any]:
        """The report: fractions in [0, 1], portability keyed by hop, the same under `exact_match`."""
        token, exact = {}, {}
        for key in ACCURACY_KEYS:
            scores = self.accuracy[key].compute()
            token[key], exact[key] = float(scores["token_acc"]), float(scores["exact_match"])
        for key in LOCALITY_KEYS:
            scores = self.locality[key].compute()
            token[key], exact[key] = float(scores["token_acc"]), float(scores["exact_match"])
        for metric, out in ((self.portability, token), (self.portability_exact, exact)):
            if metric.update_count == 0:  # data without portability questions
                continue
            by_hop = {hop: float(v) for hop, v in metric.compute().items() if not torch.isnan(v)}
            if by_hop:
                out["portability"] = by_hop
        # compute() syncs across ranks (and caches); the `count` state itself stays this rank's own.
        n_edits = int(self.accuracy["reliability"].compute()["count"])
        return {**token, "n_edits": n_edits, "exact_match": exact}

    def reset(self) -> None:
        for metric in [*self.accuracy.values(), *self.locality.values(), self.portability, self.portability_exact]:
            metric.reset()


def flatten_report(report: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"portability": {"1-hop": x}} -> {"portability/1-hop": x}, for loggers and tables."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, Mapping):
            flat.update(flatten_report(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = float(value)
    return flat


def evaluate_records(
    backbone: Backbone, edit: EditFn, batches: Iterator[EditBatch], metrics: EditMetrics
) -> dict[str, Any]:
    """Edit and score every record of `batches` (each from the unedited weights); the report."""
    for batch in batches:
        for record in record_batches(batch):
            params = edit(backbone, record["edit_inner"], None)

            def edit_further(sub_batch: SubBatch, params: Mapping[str, torch.Tensor] = params) -> EditedModel:
                return with_weights(backbone, edit(backbone, sub_batch, params))

            metrics.update(backbone, record, with_weights(backbone, params), edit_further)
    return metrics.compute()
