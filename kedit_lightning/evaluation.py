"""Edit evaluation: the one loop that edits every record of a batch and scores the post-edit model.

Each record is edited on its own from the unedited weights (an edit group per record, all in one
batched edit), so no record leaks into another; then every sub-batch of every record is answered
under its record's edit in one forward, and the locality inputs once more unedited. The scores are
the field's standard ones (DESIGN.md, "Metrics"): Reliability, T-/I-Generality, T-/I-Locality,
Portability per hop, each as answer-token accuracy and exact match, averaged per edit.

VLKEB's one-hop-edit variant (`port_edit` rows, see data_modules/vlkeb.py) answers a portability
question after a second edit on top of the record's own.

A protocol is a set of metric definitions (README, "Metric protocols"): `kedit` (ours), `easyedit` and
`vlkeb` (the reference toolkits'). They differ in locality (and `easyedit` has no portability); the
first protocol asked for gives the report's plain keys, every one asked for (when several) its
`<protocol>/<metric>` keys. With `unedited=True` the same metrics score the unedited model too
(`pre_<metric>` keys).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MeanMetric

from data_modules.encoding import IGNORE_INDEX, SUB_BATCH_KEYS, EditBatch, SubBatch
from kedit_lightning.backbones.base import Backbone
from kedit_lightning.editors.edited_model import Editor, StepInputs
from kedit_lightning.generation import GenerationMetrics
from kedit_lightning.metrics import EditAccuracy, EditLocality, PairedIdAgreement, PortabilityByHop, TopKAgreement

HOPS = ("1-hop", "2-hop", "3-hop", "4-hop")
ACCURACY_KEYS = ("reliability", "t_generality", "i_generality")
SUB_BATCH_OF = {
    "reliability": "edit_inner",
    "t_generality": "edit_outer",
    "i_generality": "edit_outer_image",
    "t_locality": "loc",
    "i_locality": "loc_image",
}
LOCALITY_KEYS = ("t_locality", "i_locality")
HEADLINE = ACCURACY_KEYS + LOCALITY_KEYS
LOCALITY_SUB_BATCHES = ("loc", "loc_image")
NEIGHBOR_KEY, NEIGHBOR = "n_locality", "neighbor"
"""Near-neighbour locality (same relation, another subject): reported where the data has neighbours, not in
the headline mean (so `val/score` means the same with or without them)."""
LOCALITY_OF = {**{key: SUB_BATCH_OF[key] for key in LOCALITY_KEYS}, NEIGHBOR_KEY: NEIGHBOR}
Protocol = Literal["kedit", "easyedit", "vlkeb"]
PROTOCOLS: tuple[Protocol, ...] = ("kedit", "easyedit", "vlkeb")
EVERY_POSITION_PROTOCOLS = ("easyedit",)
"""Protocols whose locality reads the logits at every attended position, not only the answer's."""
WITHOUT_PORTABILITY = ("easyedit",)
"""Protocols that define no portability (EasyEdit's multimodal trainer scores none)."""


def locality_metrics(protocol: Protocol) -> nn.ModuleDict:
    """T-/I-/N-Locality as `protocol` defines them (Reliability, Generality and Portability are the same in all)."""
    if protocol == "kedit":
        return nn.ModuleDict({key: EditLocality() for key in LOCALITY_OF})
    if protocol == "easyedit":  # near neighbours are text prompts: scored as text locality is
        return nn.ModuleDict(
            {"t_locality": TopKAgreement(k=1), "i_locality": TopKAgreement(k=10), NEIGHBOR_KEY: TopKAgreement(k=1)}
        )
    if protocol == "vlkeb":
        return nn.ModuleDict({key: PairedIdAgreement() for key in LOCALITY_OF})
    raise ValueError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")


def headline(report: Mapping[str, Any]) -> list[str]:
    """The headline metrics a report has: text-only data has no image ones."""
    return [key for key in HEADLINE if key in report]


def sub_batch_rows(sub_batch: SubBatch, index: torch.Tensor | slice) -> SubBatch:
    """The rows `index` of every tensor of `sub_batch`."""
    return {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in sub_batch.items()}


def record_batches(batch: EditBatch) -> Iterator[dict[str, Any]]:
    """Split a collated EditBatch into one-record EditBatches; port (and port_edit) rows follow their record."""
    for i in range(batch["edit_inner"]["input_ids"].shape[0]):
        one: dict[str, Any] = {
            key: sub_batch_rows(batch[key], slice(i, i + 1)) for key in SUB_BATCH_KEYS if key in batch
        }
        if "meta" in batch:
            one["meta"] = batch["meta"][i : i + 1]
        if NEIGHBOR in batch:
            rows = (batch["neighbor_record"] == i).nonzero().flatten()
            if rows.numel():
                one[NEIGHBOR], one["neighbor_record"] = sub_batch_rows(batch[NEIGHBOR], rows), torch.zeros_like(rows)
        if "port" in batch:
            rows = (batch["port_record"] == i).nonzero().flatten()
            if rows.numel():
                one["port"] = sub_batch_rows(batch["port"], rows)
                one["port_hops"] = [batch["port_hops"][r] for r in rows.tolist()]
            if "port_edit" in batch:
                # port_edit_row indexes the batch's port rows; here it indexes this record's.
                position = {int(row): k for k, row in enumerate(rows)}
                edits = [e for e, row in enumerate(batch["port_edit_row"].tolist()) if row in position]
                if edits:
                    one["port_edit"] = sub_batch_rows(batch["port_edit"], torch.tensor(edits))
                    one["port_edit_row"] = torch.tensor([position[batch["port_edit_row"][e].item()] for e in edits])
        yield one


def pick_rows(values: torch.Tensor, counts: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """The `rows` of `values` [P, ...], whose rows each have `counts` [N] of its P positions."""
    chunks = values.split(counts.tolist())
    return torch.cat([chunks[r] for r in rows])


def record_rows(labels: torch.Tensor, logits: torch.Tensor, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [R, T], answer logits [P_R, V]) of `rows` of a sub-batch whose answer logits are `logits` [P, V]."""
    return labels[list(rows)], pick_rows(logits, (labels != IGNORE_INDEX).sum(-1), rows)


class EditMetrics(nn.Module):
    """All edit metrics of one evaluation, under each of `protocols`, updated one edited record at a time;
    with `unedited`, the same metrics of the unedited model beside them.

    `groups` ("data_type/<name>", "image_type/<name>", the same on every rank) also score the records whose
    `meta["groups"]` name them on their own; the report nests them as {"data_type": {name: {...}}}.
    """

    def __init__(
        self,
        hops: Sequence[str] = HOPS,
        protocols: Sequence[Protocol] = ("kedit",),
        unedited: bool = False,
        groups: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not protocols:
            raise ValueError("no metric protocol given")
        self.protocols = tuple(protocols)
        self.accuracy = nn.ModuleDict({key: EditAccuracy() for key in ACCURACY_KEYS})
        self.locality = nn.ModuleDict({protocol: locality_metrics(protocol) for protocol in self.protocols})
        self.portability = PortabilityByHop(hops=tuple(hops))
        self.portability_exact = PortabilityByHop(hops=tuple(hops), exact=True)
        self.unedited = EditMetrics(hops, protocols) if unedited else None
        self.every_position = any(protocol in EVERY_POSITION_PROTOCOLS for protocol in self.protocols)
        self.group_names = list(groups)
        self.groups = nn.ModuleList(EditMetrics(hops, protocols) for _ in self.group_names)
        # A memory editor's scope decisions (SERAC): the fraction of rows it routed to an edit, per metric's
        # sub-batch, over the in-scope ones (recall) and over the locality ones (false-positive rate).
        self.routed = nn.ModuleDict({key: MeanMetric() for key in (*HEADLINE, NEIGHBOR_KEY, "recall", "fp_rate")})

    @torch.no_grad()
    def update(
        self,
        labels: Mapping[str, torch.Tensor],
        post: Mapping[str, torch.Tensor],
        pre: Mapping[str, torch.Tensor],
        hops: Sequence[str] = (),
        every_position: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
        meta: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Score a batch: `labels` [N, T] per sub-batch, post-edit answer logits [P, V] per sub-batch,
        pre-edit ones for the locality sub-batches (for every sub-batch with `unedited`); `hops` names each
        `port` row's hop; `every_position` (for protocols that read them) per locality sub-batch: pre- and
        post-edit logits at every attended position and each row's count of them; `meta` each record's
        groups. A metric whose sub-batch is absent (the image ones, for text-only data) is not updated."""
        for name, group in zip(self.group_names, self.groups):
            rows = [i for i, record in enumerate(meta) if name in record.get("groups", ())]
            if rows:
                keys = [key for key in post if key in SUB_BATCH_OF.values()]
                picked = {key: record_rows(labels[key], post[key], rows) for key in keys}
                everywhere = None
                if every_position is not None:
                    everywhere = {
                        key: (pick_rows(p, n, rows), pick_rows(q, n, rows), n[rows])
                        for key, (p, q, n) in every_position.items()
                    }
                group.update(
                    {key: picked[key][0] for key in keys},
                    {key: picked[key][1] for key in keys},
                    {key: record_rows(labels[key], pre[key], rows)[1] for key in pre if key in keys},
                    every_position=everywhere,
                )
        for key in ACCURACY_KEYS:
            if SUB_BATCH_OF[key] in post:
                self.accuracy[key].update(post[SUB_BATCH_OF[key]], labels[SUB_BATCH_OF[key]])
        for protocol, metrics in self.locality.items():
            for key, metric in metrics.items():
                name = LOCALITY_OF[key]
                if name not in post:
                    continue
                if protocol in EVERY_POSITION_PROTOCOLS:
                    metric.update(*every_position[name])
                else:
                    metric.update(pre[name], post[name], labels[name])
        if "port" in post:
            for metric in (self.portability, self.portability_exact):
                metric.update(post["port"], labels["port"], hops)
        if self.unedited is not None:
            unedited_everywhere = None
            if every_position is not None:
                unedited_everywhere = {name: (p, p, n) for name, (p, _, n) in every_position.items()}
            self.unedited.update(labels, {key: pre[key] for key in post}, pre, hops, unedited_everywhere)

    @torch.no_grad()
    def update_scope(self, routed: Mapping[str, torch.Tensor]) -> None:
        """Scope decisions: per sub-batch, [N] bool, whether each row was routed to an edit."""
        by_metric = {key: routed[name].float() for key, name in (SUB_BATCH_OF | LOCALITY_OF).items() if name in routed}
        for key, value in by_metric.items():
            self.routed[key].update(value)
        self.routed["recall"].update(torch.cat([by_metric[key] for key in ACCURACY_KEYS if key in by_metric]))
        self.routed["fp_rate"].update(torch.cat([by_metric[key] for key in LOCALITY_OF if key in by_metric]))

    def _protocol_report(self, protocol: Protocol, every_metric: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """(token-level, exact-match) scores under `protocol`; metrics never updated are absent.
        `every_metric` (groups, which some ranks may never update) computes, and so syncs, every one and
        leaves out those with no edits."""
        token, exact = {}, {}
        for key, metric in [*self.accuracy.items(), *self.locality[protocol].items()]:
            if metric.update_count == 0 and key != "reliability" and not every_metric:
                continue
            scores = metric.compute()
            if every_metric and int(scores["count"]) == 0:
                continue
            token[key], exact[key] = float(scores["token_acc"]), float(scores["exact_match"])
        for metric, out in ((self.portability, token), (self.portability_exact, exact)):
            if metric.update_count == 0 or protocol in WITHOUT_PORTABILITY:  # or data without portability questions
                continue
            by_hop = {hop: float(v) for hop, v in metric.compute().items() if not torch.isnan(v)}
            if by_hop:
                out["portability"] = by_hop
        return token, exact

    def compute(self, every_metric: bool = False) -> dict[str, Any]:
        """The report: fractions in [0, 1], portability keyed by hop, the same under `exact_match`, for the
        first protocol; with several, every protocol's token-level scores as `<protocol>/<metric>`; with
        `unedited`, `pre_<metric>` (and `<protocol>/pre_<metric>`) for the unedited model; scope decisions
        under `scope`, metric groups under their field."""
        token, exact = self._protocol_report(self.protocols[0], every_metric)
        # compute() syncs across ranks (and caches); the `count` state itself stays this rank's own.
        report = {**token, "n_edits": int(self.accuracy["reliability"].compute()["count"]), "exact_match": exact}
        if len(self.protocols) > 1:
            for protocol in self.protocols:
                scores = self._protocol_report(protocol, every_metric)[0]
                report.update({f"{protocol}/{key}": value for key, value in scores.items()})
        if self.unedited is not None:
            before = self.unedited.compute()
            for key, value in before.items():
                if key == "exact_match":
                    exact.update({f"pre_{k}": v for k, v in value.items()})
                elif key != "n_edits":
                    protocol, _, metric = key.rpartition("/")
                    report[f"{protocol}/pre_{metric}" if protocol else f"pre_{key}"] = value
        scope = {key: float(metric.compute()) for key, metric in self.routed.items() if metric.update_count}
        if scope:
            report["scope"] = scope
        for name, group in zip(self.group_names, self.groups):
            field, value = name.split("/", 1)
            with warnings.catch_warnings():  # a group no record of this rank is in: computed all the same
                warnings.filterwarnings("ignore", "The ``compute`` method of metric", UserWarning)
                scores = group.compute(every_metric=True)
            if scores["n_edits"]:
                report.setdefault(field, {})[value] = {k: v for k, v in scores.items() if k != "exact_match"}
                exact.setdefault(field, {})[value] = scores["exact_match"]
        return report

    def reset(self) -> None:
        metrics = [*self.accuracy.values(), *(m for ms in self.locality.values() for m in ms.values())]
        for metric in [*metrics, *self.routed.values(), self.portability, self.portability_exact]:
            metric.reset()
        for child in [self.unedited, *self.groups]:
            if child is not None:
                child.reset()


def report_column(
    report: Mapping[str, Any], protocol: str = "", unedited: bool = False, exact: bool = False
) -> dict[str, Any]:
    """One column of a printed table from a report: the first protocol's scores (or `protocol`'s, from its
    `<protocol>/` keys), the unedited model's (`pre_` keys) with `unedited`, exact match with `exact`."""
    prefix = (f"{protocol}/" if protocol else "") + ("pre_" if unedited else "")
    column = {}
    for key, value in (report.get("exact_match", {}) if exact else report).items():
        rest = key[len(prefix) :] if key.startswith(prefix) else ""
        if (
            rest
            and "/" not in rest
            and not rest.startswith("pre_")
            and rest not in ("n_edits", "exact_match", "sequential")
        ):
            column[rest] = value
    return {**column, "n_edits": report.get("n_edits")}


def flatten_report(report: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"portability": {"1-hop": x}} -> {"portability/1-hop": x}, for loggers and tables."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, Mapping):
            flat.update(flatten_report(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = float(value)
    return flat


def evaluate_batch(
    editor: Editor,
    backbone: Backbone,
    batch: EditBatch,
    metrics: EditMetrics,
    generation: GenerationMetrics | None = None,
) -> dict[str, torch.Tensor]:
    """Edit every record of `batch` on its own and score it into `metrics`; the post-edit answer logits
    per sub-batch. Passes: the frozen prefix (once per width bucket), one edit capture (two with one-hop
    edits), one post-edit and one pre-edit pass, whatever the number of records; a protocol that reads
    every position adds one post- and one pre-edit pass over the locality rows. With `generation` the
    same edits also answer by greedy decoding (`gen_*` scores)."""
    names = [key for key in (*SUB_BATCH_KEYS, NEIGHBOR, "port", "port_edit") if key in batch]
    inputs = StepInputs(backbone, {key: batch[key] for key in names})
    model = editor.edited_model(backbone)
    edits = editor(model, inputs, inputs.rows("edit_inner"))
    queries = {key: edits for key in SUB_BATCH_KEYS if key in batch}
    if NEIGHBOR in batch:
        queries[NEIGHBOR] = edits[batch["neighbor_record"].cpu()]
    if "port" in batch:
        port = edits[batch["port_record"].cpu()]
        if "port_edit" in batch:
            edited_rows = batch["port_edit_row"].cpu()
            port = port.clone()
            port[edited_rows] = editor(model, inputs, inputs.rows("port_edit"), on_top_of=port[edited_rows])
        queries["port"] = port
    logits = model.answer_logits(inputs, inputs.rows(*queries), torch.cat(list(queries.values())))
    post = inputs.split(logits, list(queries))
    if getattr(model, "routed", None) is not None:  # a memory editor's scope decisions, row for row (SERAC)
        metrics.update_scope(dict(zip(queries, model.routed.split([len(inputs.rows(key)) for key in queries]))))
    locality = [key for key in (*LOCALITY_SUB_BATCHES, NEIGHBOR) if key in batch]
    unedited = list(queries) if metrics.unedited is not None else locality
    with model.unedited():  # the original model, also where edits are already folded into the weights
        pre = inputs.split(model.answer_logits(inputs, inputs.rows(*unedited)), unedited)
    every_position = None
    if metrics.every_position and locality:
        rows, groups = inputs.rows(*locality), torch.cat([queries[key] for key in locality])
        post_all = inputs.split(model.answer_logits(inputs, rows, groups, every_position=True), locality, True)
        with model.unedited():
            pre_all = inputs.split(model.answer_logits(inputs, rows, every_position=True), locality, True)
        every_position = {
            key: (pre_all[key], post_all[key], inputs.read_counts(inputs.rows(key), True)) for key in locality
        }
    labels = {key: inputs.labels[inputs.rows(key)] for key in queries}
    metrics.update(labels, post, pre, batch.get("port_hops", ()), every_position, batch.get("meta", ()))
    if generation is not None:
        generation.update(model, backbone, batch, queries)
    return post
