"""The edited model: a backbone with pending edits, used by training, validation, baselines and the editing API.

A weight edit changes each edited weight by a sum of rank-one terms, W~ = W - sum_r u_r v_r^T (MEND:
u = alpha * delta~, v = x~; a gradient step: u = lr * delta, v = x), so the edited layer computes
y~ = W x - sum_r (v_r . x) u_r: no full-size weight per edit, and every row of a batch can carry its
own edit. Edits come in groups (one record's edit, or several records batched into one); a group
may sit on top of another (a sequential edit). Each input row is answered under one group and sees
it and its ancestors; group -1 is the unedited model.

`StepInputs` stacks the sub-batches of a step into one padded batch and runs the frozen prefix
(`Backbone.prefix`) once for all of them; every capture and post-edit pass resumes from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cached_property
from typing import Any, Protocol, Self

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from data_modules.encoding import IGNORE_INDEX, SubBatch
from kedit_lightning.backbones.base import Backbone, PrefixState, answer_read_mask
from kedit_lightning.editors.losses import per_example_nll

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per edited weight name: (u [R, out], v [R, in]) rank-one terms, or captured (x [R, in], delta [R, out])."""


class StepInputs:
    """The sub-batches of one step stacked into one right-padded batch, their frozen prefix computed once.

    Every tensor field the sub-batches share is stacked (SERAC's extra tokens too); `pixel_values` are
    encoded once per distinct image into `image_features` (one row per input row that has an image).
    The prefix runs once per bucket of sub-batches of similar width (within `BUCKET_SPREAD`), so short
    text-only rows are not padded to the width of image rows. `prefix=False` skips it (for callers that
    need only tokens and image features).
    """

    BUCKET_SPREAD = 1.25

    def __init__(self, backbone: Backbone, sub_batches: Mapping[str, SubBatch], prefix: bool = True) -> None:
        self.names = list(sub_batches)
        sizes = [sub_batches[name]["input_ids"].shape[0] for name in self.names]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.slices = {name: slice(start, start + size) for name, start, size in zip(self.names, starts, sizes)}
        keys = [k for k, v in sub_batches[self.names[0]].items() if isinstance(v, torch.Tensor) and k != "pixel_values"]
        # Label fields (the backbone's, SERAC's counterfactual ones) pad with the ignore index, the rest with 0.
        self.fields = {
            k: _stack([sub_batches[n][k] for n in self.names], IGNORE_INDEX if k.endswith("labels") else 0)
            for k in keys
        }
        has_image = [sub_batches[n].get("pixel_values") is not None for n in self.names]
        device = self.fields["input_ids"].device
        self.has_image = torch.cat([torch.full((s,), h, device=device) for s, h in zip(sizes, has_image)])
        pixels = [sub_batches[n]["pixel_values"] for n, h in zip(self.names, has_image) if h]
        with torch.no_grad():
            self.image_features = backbone.encode_visual(pixels) if pixels else None
        self.buckets: list[tuple[torch.Tensor, int, PrefixState | None]] = []
        self.bucket_of = torch.empty(len(self.has_image), dtype=torch.long, device=device)
        self.place_in_bucket = torch.empty_like(self.bucket_of)
        widths = {n: sub_batches[n]["input_ids"].shape[1] for n in self.names}
        for names in _buckets(widths, self.BUCKET_SPREAD):
            rows = self.rows(*names)
            width = max(widths[n] for n in names)
            state = None
            if prefix:
                features = None if self.image_features is None else self.image_features[self.image_rows(rows)]
                features = None if features is None else features[self.has_image[rows]]
                ids, mask = self.fields["input_ids"][rows, :width], self.fields["attention_mask"][rows, :width]
                state = backbone.prefix(ids, mask, features if features is not None and len(features) else None)
            self.bucket_of[rows] = len(self.buckets)
            self.place_in_bucket[rows] = torch.arange(len(rows), device=device)
            self.buckets.append((rows, width, state))

    @property
    def labels(self) -> torch.Tensor:
        return self.fields["labels"]

    def rows(self, *names: str) -> torch.Tensor:
        """The stacked row indices of the named sub-batches, in order."""
        device = self.labels.device
        return torch.cat([torch.arange(self.slices[n].start, self.slices[n].stop, device=device) for n in names])

    def image_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """For each of `rows`, its row in `image_features` (-1 without an image)."""
        index = torch.cumsum(self.has_image.long(), 0) - 1
        return torch.where(self.has_image, index, torch.full_like(index, -1))[rows]

    def answer_counts(self, rows: torch.Tensor) -> torch.Tensor:
        return (self.labels[rows] != IGNORE_INDEX).sum(-1)

    def read_counts(self, rows: torch.Tensor, every_position: bool = False) -> torch.Tensor:
        """Positions read per row: its answer positions, or with `every_position` all its attended ones."""
        return self.fields["attention_mask"][rows].bool().sum(-1) if every_position else self.answer_counts(rows)

    def split(
        self, logits: torch.Tensor, names: Sequence[str], every_position: bool = False
    ) -> dict[str, torch.Tensor]:
        """Logits of the named sub-batches' rows (in order, as `rows(*names)`) -> one tensor per name."""
        sizes = [int(self.read_counts(self.rows(name), every_position).sum()) for name in names]
        return dict(zip(names, logits.split(sizes)))

    def states(self, rows: torch.Tensor) -> Iterator[tuple[torch.Tensor, PrefixState, torch.Tensor]]:
        """`rows` by prefix bucket: (their positions in `rows`, their prefix state, their labels at its width)."""
        buckets = self.bucket_of[rows]
        for bucket in buckets.unique().tolist():
            positions = (buckets == bucket).nonzero().flatten()
            _, width, state = self.buckets[bucket]
            yield positions, state.rows(self.place_in_bucket[rows[positions]]), self.labels[rows[positions], :width]

    def answer_logits(
        self,
        backbone: Backbone,
        rows: torch.Tensor,
        around: Callable[[torch.Tensor], AbstractContextManager[None]] = lambda positions: nullcontext(),
        every_position: bool = False,
    ) -> torch.Tensor:
        """[P, V] logits at the answer positions of `rows` (row-major) from their prefix states; `around(positions)`
        wraps each bucket's pass (an edited model's hooks for the rows at those positions of `rows`). With
        `every_position`, at every attended position instead (the reference toolkits' locality reads them)."""
        parts, order = [], []
        for positions, state, labels in self.states(rows):
            width = labels.shape[1]
            attended = self.fields["attention_mask"][rows[positions], :width].bool()
            with around(positions):
                parts.append(backbone.resume(state, attended if every_position else answer_read_mask(labels)))
            order.append(positions)
        return _in_row_order(backbone.head(torch.cat(parts)), torch.cat(order), self.read_counts(rows, every_position))


def _in_row_order(answers: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Answer-position values of rows taken in the order `positions` (of rows counting `counts` answers
    each), back in row order."""
    per_row = dict(zip(positions.tolist(), answers.split(counts[positions].tolist())))
    return torch.cat([per_row[i] for i in range(len(counts))])


def _buckets(widths: Mapping[str, int], spread: float) -> list[list[str]]:
    """Names grouped, in order of width, so that no group's widest is over `spread` times its narrowest."""
    groups: list[list[str]] = []
    for name in sorted(widths, key=widths.get):
        if groups and widths[name] <= spread * widths[groups[-1][0]]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _stack(tensors: Sequence[torch.Tensor], pad_value: int) -> torch.Tensor:
    if tensors[0].dim() < 2:
        return torch.cat(list(tensors))
    width = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, width - t.shape[1]), value=pad_value) for t in tensors])


def edited_module(backbone: Backbone, name: str) -> nn.Module:
    """The Linear (or GPT-2 Conv1D) whose `weight` is the parameter `name` of `backbone.model`."""
    module_name, _, attr = name.rpartition(".")
    module = backbone.model.get_submodule(module_name)
    if attr != "weight" or not isinstance(module, (nn.Linear, Conv1D)):
        raise TypeError(
            f"edits change the weight of a Linear or Conv1D; {name!r} is {attr!r} of a {type(module).__name__}"
        )
    return module


class EditedModel(Protocol):
    """A backbone with pending edits in groups: what every editor's `edited_model(backbone)` gives
    (`WeightEditedModel` for MEND and fine-tuning, SERAC's `MemoryEditedModel`)."""

    def new_groups(self, parents: Sequence[int] | torch.Tensor) -> torch.Tensor: ...

    def answer_logits(
        self, inputs: StepInputs, rows: torch.Tensor, groups: torch.Tensor | None = None, every_position: bool = False
    ) -> torch.Tensor:
        """[P, V] logits at the answer positions of `rows` (`every_position`: every attended one), each row
        under its group (None: unedited)."""

    def fold(self) -> Any:
        """Make every group an edit in force for all rows (weights: write them into the backbone)."""

    def unedited(self) -> AbstractContextManager[None]:
        """The original model for the duration (pre-edit answers after `fold`)."""

    def mark(self) -> int: ...

    def drop_after(self, mark: int) -> None:
        """Forget the groups opened since `mark`."""

    def restore(self) -> None:
        """The original model back, bit for bit, and no edits."""


class Editor(Protocol):
    """An editor (`MEND`, `FineTune`, `SERAC`): `edited_model(backbone)` is a fresh, unedited model;
    calling the editor edits it on `rows` of `inputs` (prompt + new answer), one new group per row on
    top of `on_top_of` (None: the unedited model), or one for all rows with `batched`, and returns each
    row's group. A call rather than a method, so module hooks (DDP's `replicate` under FSDP) see it."""

    def edited_model(self, backbone: Backbone) -> EditedModel: ...

    def __call__(
        self,
        model: EditedModel,
        inputs: StepInputs,
        rows: torch.Tensor,
        on_top_of: torch.Tensor | None = None,
        batched: bool = False,
    ) -> torch.Tensor: ...


class EditGroups:
    """Edit groups (see the module docstring): each group's parent, -1 for the unedited model."""

    def __init__(self) -> None:
        self.parents: list[int] = []

    def new_groups(self, parents: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Open one group on top of each of `parents` (-1: the unedited model); their ids."""
        parents = [int(p) for p in parents]
        first = len(self.parents)
        if any(p >= first for p in parents):
            raise ValueError(f"parent groups {parents} do not exist yet (there are {first})")
        self.parents += parents
        return torch.arange(first, first + len(parents))

    def mark(self) -> int:
        """A point to `drop_after`: the number of groups so far."""
        return len(self.parents)

    def chains(self, groups: torch.Tensor) -> torch.Tensor:
        """[N, D]: each row's group and its ancestors (padded with -1)."""
        chains = []
        for group in groups.tolist():
            chain = []
            while group >= 0:
                chain.append(group)
                group = self.parents[group]
            chains.append(chain)
        depth = max((len(c) for c in chains), default=0)
        return torch.tensor([c + [-1] * (depth - len(c)) for c in chains], dtype=torch.long).view(len(chains), depth)


class WeightEditedModel(EditGroups):
    """A backbone with pending low-rank weight edits, organised in groups (see the module docstring).

    `capture` gives the rows (x, delta) of the edit loss's gradient at every edited weight, `add`
    stores rank-one terms as new groups, `answer_logits` answers rows each under its group, and
    `weights` folds every group into dense weights (for saving, or to edit on from there).
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.names = list(backbone.edit_param_names)
        self.modules = {name: edited_module(backbone, name) for name in self.names}
        self.terms: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {n: [] for n in self.names}
        self._padded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.original: dict[str, torch.Tensor] | None = None  # the weights before the first `fold`

    def add(self, terms: Factors, groups: torch.Tensor) -> None:
        """Add rank-one terms (u [R, out], v [R, in]) per weight; `groups` [R] is each term's group."""
        for name, (u, v) in terms.items():
            self.terms[name].append((u, v, groups.to(u.device)))
        self._padded.clear()

    def _padded_terms(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(u [G + 1, r, out], v [G + 1, r, in]): each group's terms zero-padded to the most any group has;
        the last group, all zeros, stands for -1 (no edit)."""
        if name not in self._padded:
            u = torch.cat([t[0] for t in self.terms[name]])
            v = torch.cat([t[1] for t in self.terms[name]])
            groups = torch.cat([t[2] for t in self.terms[name]])
            n_groups = len(self.parents)
            counts = torch.bincount(groups, minlength=n_groups + 1)
            order = torch.argsort(groups, stable=True)
            slot = torch.arange(len(groups), device=groups.device) - (torch.cumsum(counts, 0) - counts)[groups[order]]
            index = torch.full((n_groups + 1, max(int(counts.max()), 1)), len(groups), device=groups.device)
            index[groups[order], slot] = order
            self._padded[name] = (F.pad(u, (0, 0, 0, 1))[index], F.pad(v, (0, 0, 0, 1))[index])
        return self._padded[name]

    def _correction(self, name: str, x: torch.Tensor, chains: torch.Tensor) -> torch.Tensor:
        """sum over the groups in each row's chain of sum_r (v_r . x) u_r; x is [N, T, in].

        In the layer's own dtype (a bf16 backbone's under autocast): the terms are cast once, before each
        row gathers its group's, so backward keeps half-size copies."""
        u, v = (t.to(x.dtype) for t in self._padded_terms(name))
        chains = torch.where(chains < 0, len(self.parents), chains).to(u.device)
        total = None
        with torch.autocast(x.device.type, enabled=False):
            for level in range(chains.shape[1]):
                group = chains[:, level]
                part = torch.bmm(torch.bmm(x, v[group].transpose(1, 2)), u[group])  # [N, T, r] then [N, T, out]
                total = part if total is None else total + part
        return total

    @contextmanager
    def _applied(
        self, groups: torch.Tensor | None, record: dict[str, list[torch.Tensor]] | None = None
    ) -> Iterator[None]:
        """Hooks that subtract each row's edits from the edited layers' outputs (and record x, y)."""
        chains = None if groups is None else self.chains(groups)
        active = chains is not None and chains.shape[1] > 0 and any(self.terms[n] for n in self.names)

        def hook(name: str):
            def apply(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                x = args[0]
                if active and self.terms[name]:
                    rows = chains.shape[0]
                    correction = self._correction(name, x.reshape(rows, -1, x.shape[-1]), chains)
                    output = output - correction.reshape(output.shape).to(output.dtype)
                if record is not None:
                    record[name] += [x.detach(), output]
                return output

            return apply

        handles = (
            [m.register_forward_hook(hook(n)) for n, m in self.modules.items()] if active or record is not None else []
        )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- the three operations -------------------------------------------------------------------
    def answer_logits(
        self, inputs: StepInputs, rows: torch.Tensor, groups: torch.Tensor | None = None, every_position: bool = False
    ) -> torch.Tensor:
        """[P, V] logits at the answer positions of `rows` (row-major; `every_position`: every attended one),
        each row under its group (None: unedited)."""
        if groups is None:
            return inputs.answer_logits(self.backbone, rows, every_position=every_position)
        return inputs.answer_logits(
            self.backbone, rows, lambda positions: self._applied(groups[positions.cpu()]), every_position
        )

    def capture(
        self, inputs: StepInputs, rows: torch.Tensor, groups: torch.Tensor | None, weights: torch.Tensor
    ) -> tuple[Factors, dict[str, torch.Tensor]]:
        """The rows (x, delta) of the gradient of sum_n weights[n] * NLL_n (each row's mean answer-token NLL)
        at every edited weight, each input row under its group's edits; and each gradient row's input row.

        Rows are per token; those whose x or delta is all zero (padding, positions after the answer)
        carry nothing and are dropped. Input rows do not interact, so each row's gradient rows are
        those of its own loss: one forward captures the edits of every record.
        """
        records, hidden = [], []
        with torch.enable_grad():
            for positions, state, labels in inputs.states(rows):
                state.hidden = state.hidden.detach().requires_grad_()  # so the layers above are in the graph
                record: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
                with self._applied(None if groups is None else groups[positions.cpu()], record):
                    hidden.append(self.backbone.resume(state, answer_read_mask(labels)))
                records.append((positions, labels.shape[1], record))
            order = torch.cat([positions for positions, _, _ in records])
            logits = _in_row_order(self.backbone.head(torch.cat(hidden)), order, inputs.answer_counts(rows))
            loss = (per_example_nll(logits, inputs.labels[rows]) * weights.to(logits.device)).sum()
            outputs = [record[n][1] for _, _, record in records for n in self.names]
            grads = iter(torch.autograd.grad(loss, outputs, allow_unused=True, materialize_grads=True))
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {n: [] for n in self.names}
        for positions, width, record in records:
            for name in self.names:
                x = record[name][0].reshape(-1, record[name][0].shape[-1])
                grad = next(grads)
                delta = grad.reshape(-1, grad.shape[-1])
                keep = (x != 0).any(-1) & (delta != 0).any(-1)
                parts[name].append((x[keep], delta[keep], positions[keep.nonzero().flatten() // width]))
        factors, row_of = {}, {}
        for name in self.names:
            x, delta, row = (torch.cat(t) for t in zip(*parts[name]))
            order = torch.argsort(row, stable=True)  # the rows' order, as one forward over them would give
            factors[name], row_of[name] = (x[order], delta[order]), row[order].cpu()
        return factors, row_of

    @cached_property
    def unedited_squared_norm(self) -> float:
        """||W_0||_F^2 over the edited weights before any edit (which `fold` never changes: it keeps them in
        `original`, and `restore` writes them back), computed once: what edit sizes are measured against."""
        weights = self.original if self.original is not None else self.backbone.editable_parameters()
        return sum(float(w.detach().float().pow(2).sum()) for w in weights.values())

    def squared_norms(self, groups: torch.Tensor) -> torch.Tensor:
        """[N]: each group's own update ||sum_r u_r v_r^T||_F^2 (not its parents'), summed over the edited
        weights, from its factors: sum_ij (u_i . u_j)(v_i . v_j), never the dense [out, in] matrix."""
        total = torch.zeros(len(groups))
        for name in self.names:
            if self.terms[name]:
                u, v = (t[groups.to(t.device)].float() for t in self._padded_terms(name))
                total = total.to(u.device) + (u @ u.transpose(1, 2) * (v @ v.transpose(1, 2))).sum((1, 2))
        return total

    def weights(self) -> dict[str, torch.Tensor]:
        """Every group folded into dense weights, W - sum_r u_r v_r^T (all groups: a chain of edits in force)."""
        params = self.backbone.editable_parameters()
        dense = {}
        for name in self.names:
            w = params[name].detach()
            if self.terms[name]:
                u = torch.cat([t[0] for t in self.terms[name]]).float()
                v = torch.cat([t[1] for t in self.terms[name]]).float()
                update = u.T @ v  # [out, in]
                w = w - (update.T if isinstance(self.modules[name], Conv1D) else update).to(w.dtype)
            dense[name] = w
        return dense

    # -- edits in force for good (the editing API, sequential evaluation) ---------------------
    @torch.no_grad()
    def fold(self) -> dict[str, torch.Tensor]:
        """Write every group into the backbone's weights (in place) and forget the terms: from now on
        the unedited rows (group -1) see these edits. Refused, with nothing written and the terms
        dropped, when a folded weight is not finite; returns the written weights."""
        dense = self.weights()
        for group in self.terms.values():
            group.clear()
        self._padded.clear()
        bad = [name for name, w in dense.items() if not bool(torch.isfinite(w).all())]
        if bad:
            raise FloatingPointError(f"non-finite values in {len(bad)} edited weight(s) ({', '.join(bad[:3])})")
        if self.original is None:
            self.original = {name: w.detach().clone() for name, w in self.backbone.editable_parameters().items()}
        _write(self.backbone, dense)
        return dense

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """The backbone's original weights, for the duration (pre-edit answers after `fold`)."""
        if self.original is None:
            yield
            return
        folded = {name: w.detach().clone() for name, w in self.backbone.editable_parameters().items()}
        _write(self.backbone, self.original)
        try:
            yield
        finally:
            _write(self.backbone, folded)

    def drop_after(self, mark: int) -> None:
        """Forget the groups opened since `mark` (edits tried, not kept)."""
        del self.parents[mark:]
        for name in self.names:
            kept = [(u[g < mark], v[g < mark], g[g < mark]) for u, v, g in self.terms[name]]
            self.terms[name] = [t for t in kept if len(t[2])]
        self._padded.clear()

    def restore(self) -> None:
        """The original weights back, bit for bit, and no edits."""
        if self.original is not None:
            _write(self.backbone, self.original)
        self.original = None
        self.parents.clear()
        for group in self.terms.values():
            group.clear()
        self._padded.clear()


@torch.no_grad()
def _write(backbone: Backbone, weights: Mapping[str, torch.Tensor]) -> None:
    params = backbone.editable_parameters()
    for name, w in weights.items():
        params[name].copy_(w)


def new_edit_groups(
    model: EditGroups, n_rows: int, on_top_of: torch.Tensor | None, batched: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each edit row's new group [n], each row's weight in the edit loss [n]) for `n_rows` edit rows:
    a group per row (each row its own loss), or with `batched` one group for all (the mean loss)."""
    parents = torch.full((n_rows,), -1) if on_top_of is None else on_top_of.cpu()
    if not batched:
        return model.new_groups(parents), torch.ones(n_rows)
    if bool((parents != parents[0]).any()):
        raise ValueError("a batched edit goes on top of one group; the rows name several")
    return model.new_groups(parents[:1]).expand(n_rows), torch.full((n_rows,), 1.0 / n_rows)


class ConfiguredEditor(nn.Module):
    """An editor rebuilt from its `config` (its constructor arguments as plain data, which artifacts and
    kedit_lightning/configs/editors/ store): `from_config(editor.config)`."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        return cls(**config)


class WeightEditor(ConfiguredEditor):
    """An editor whose edits are low-rank weight changes (MEND, fine-tuning), on a `WeightEditedModel`."""

    def edited_model(self, backbone: Backbone) -> WeightEditedModel:
        return WeightEditedModel(backbone)
