"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022, arXiv 2110.11309).

For an edited Linear y = W x the gradient of the edit loss is a sum of rank-one terms delta_t x_t^T
(delta_t = dL/dy_t), one per token. MEND maps each pair through a learned transform g (running
normalisation, then a low-rank residual MLP that starts as the identity) to (x~_t, delta~_t) and edits
W~ = W - alpha_l * sum_t delta~_t x~_t^T, with a learned step size alpha_l per layer. The edit is
applied as low-rank terms of a `WeightEditedModel`, so an outer loss on other inputs backpropagates into g
and alpha. With identity g and no statistics yet, an edit is one step of gradient descent.

Statistics are committed once per training step: the step's rows are merged into them afterwards (across
processes, dropped for a skipped step). In the `paper` variant every edit of a step normalises with the
statistics as of its start, so a step is a function of its global batch alone.

`variant` names the two readings of MEND (each difference a choice with a reason, neither a fix):

- `paper` (the default, and this package's behaviour before variants existed): W~ = W - alpha * g~, the
  paper's sign (a step of descent when g is the identity); the last residual layer linear, so the
  identity-initialised transform can move its output both ways; normalisation the identity until two
  rows are committed, then the statistics as of the step's start.
- `reference-code` (github.com/eric-mitchell/mend, algs/mend.py and nn.py; EasyEdit's trainer follows
  it): W~ = W + alpha * g~; every residual layer clamped at 0, the last one too; training normalises
  with statistics that already hold the rows seen so far, this edit's own included (the reference
  updates its moments row by row before normalising, one edited layer after another), so the very
  first edit is normalised by its own rows, and DDP ranks normalise with their own rows within a step.
  The reference's gradient accumulation (`accumulate_bs`) is the Trainer's `accumulate_grad_batches`,
  set in the configs that carry the public defaults.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from kedit_lightning.backbones.base import Backbone
from kedit_lightning.editors.edited_model import (
    StepInputs,
    WeightEditedModel,
    WeightEditor,
    edited_module,
    new_edit_groups,
)

_NORM_EPS = 1e-7


def merge_moments(moments: torch.Tensor) -> torch.Tensor:
    """The moments of the union of K groups of rows, from each group's packed (count, mean, M2).

    `moments` is [K, 1 + 2D]: column 0 the group's row count, then its per-feature mean and sum
    of squared deviations from that mean. Chan, Golub and LeVeque's pairwise update, for K groups
    at once: mean = sum_k n_k mean_k / n, M2 = sum_k (M2_k + n_k (mean_k - mean)^2). Empty groups
    (n_k = 0) contribute nothing.
    """
    count, mean, m2 = moments[:, :1], *moments[:, 1:].chunk(2, dim=1)
    total = count.sum(0)
    merged_mean = (count * mean).sum(0) / total.clamp(min=1)
    merged_m2 = (m2 + count * (mean - merged_mean).square()).sum(0)
    return torch.cat([total, merged_mean, merged_m2])


class RunningMoments(nn.Module):
    """Per-feature running mean and variance of rows, changed only by `commit`.

    `accumulate(rows)` merges a batch of rows into the pending moments (vectorised, no Python
    loop over rows); `take_pending()` hands them out packed as (count, mean, M2) and clears them;
    `commit(moments)` merges packed moments (one row per process) into the running ones. Until
    two rows have been committed, normalisation is the identity.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))  # sum of squared deviations from the mean
        # Not a buffer: it lives within one training step, is never saved, and must not be
        # overwritten by DDP's buffer broadcast from rank 0.
        self.pending: torch.Tensor | None = None

    def packed_size(self) -> int:
        return 1 + 2 * self.dim

    @torch.no_grad()
    def accumulate(self, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0:
            return
        rows = rows.float()
        batch_mean = rows.mean(0)
        batch = torch.cat([batch_mean.new_tensor([rows.shape[0]]), batch_mean, (rows - batch_mean).square().sum(0)])
        pending = self.pending if self.pending is not None else batch.new_zeros(self.packed_size())
        # Rows with a non-finite value (a step that will be skipped) must not poison the
        # statistics; torch.where keeps the check on the device (no host sync per edit).
        self.pending = torch.where(torch.isfinite(rows).all(), merge_moments(torch.stack([pending, batch])), pending)

    def take_pending(self) -> torch.Tensor:
        """The pending moments packed as (count, mean, M2) [1 + 2D] (zeros when none); clears them."""
        pending = (
            self.pending if self.pending is not None else self.mean.new_zeros(self.packed_size(), dtype=torch.float32)
        )
        self.pending = None
        return pending

    @torch.no_grad()
    def commit(self, moments: torch.Tensor) -> None:
        """Merge packed moments [K, 1 + 2D] (e.g. every process's pending ones, in rank order)."""
        # In float32 whatever the buffers' dtype: a bf16 count would make the weights of the merge coarse.
        running = torch.cat([self.count.reshape(1).float(), self.mean.float(), self.m2.float()])
        merged = merge_moments(torch.cat([running[None], moments.float()]))
        self.count.add_(moments[:, 0].sum().round().long())
        self.mean.copy_(merged[1 : 1 + self.dim])
        self.m2.copy_(merged[1 + self.dim :])

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance (as `torch.var`); meaningful once `count >= 2`."""
        return self.m2 / (self.count - 1).clamp(min=1)

    def forward(self, rows: torch.Tensor, with_pending: bool = False) -> torch.Tensor:
        """`rows` normalised by the committed moments, or with `with_pending` by those merged with the
        pending ones (the step's rows so far); the identity while fewer than two rows count."""
        count, mean, var = self.count, self.mean, self.var
        if with_pending and self.pending is not None:
            running = torch.cat([self.count.reshape(1).float(), self.mean.float(), self.m2.float()])
            merged = merge_moments(torch.stack([running, self.pending]))
            count, mean, m2 = merged[0], merged[1 : 1 + self.dim], merged[1 + self.dim :]
            var = m2 / (count - 1).clamp(min=1)
        # torch.where instead of an `if` keeps the check on the device (no host sync per edit).
        ready = count >= 2
        mean = torch.where(ready, mean, torch.zeros_like(mean))
        inv_std = torch.where(ready, 1.0 / (var.sqrt() + _NORM_EPS), torch.ones_like(mean))
        return (rows - mean) * inv_std


class LowRankResidual(nn.Module):
    """h = z + act(scale[mode] * (U V z + b) + shift[mode]), U [dim, rank], V [rank, dim]; `mode` is the
    edited layer's index among those sharing the transform, or one per row of z."""

    def __init__(self, dim: int, rank: int, n_modes: int, activate: bool, init: str) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, dim))  # V, as in the paper's code (unit normal)
        self.up = nn.Parameter(torch.zeros(dim, rank))  # U = 0: the layer starts as the identity
        if init == "xavier":
            nn.init.xavier_normal_(self.down)
            nn.init.xavier_normal_(self.up)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.activate = activate

    def forward(self, z: torch.Tensor, mode: int | torch.Tensor) -> torch.Tensor:
        # F.linear on the parameters themselves: under autocast their bf16 copies are then cast
        # once per step and cached; `.T` views would be re-cast (and kept for backward) per edit.
        h = F.linear(F.linear(z, self.down), self.up, self.bias)
        h = h * self.mode_scale[mode] + self.mode_shift[mode]
        # clamp, not relu: its gradient passes at exactly 0, where an identity-initialised
        # hidden layer sits; relu's zero gradient there would leave that layer untrainable.
        return z + (h.clamp(min=0) if self.activate else h)


class ResidualMLP(nn.Module):
    """`n_hidden` activated low-rank residual layers, then one more, linear unless `activate_last`."""

    def __init__(self, dim: int, rank: int, n_hidden: int, n_modes: int, init: str, activate_last: bool) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.layers = nn.ModuleList(
            LowRankResidual(dim, rank, n_modes, activate=i < n_hidden or activate_last, init=init)
            for i in range(n_hidden + 1)
        )

    def forward(self, z: torch.Tensor, mode: int | torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            z = layer(z, mode)
        return z


class GradientTransform(nn.Module):
    """g: (x [N, x_dim], delta [N, delta_dim]) -> (x~, delta~), shared by the layers of one weight shape.

    `combine=True` transforms concat(x, delta) with one MLP (the paper's default); otherwise x and
    delta get one MLP each. `reference_code`: every layer activated, and training normalises with
    the step's pending rows included (see the module docstring).
    """

    def __init__(
        self,
        x_dim: int,
        delta_dim: int,
        n_modes: int,
        rank: int,
        n_hidden: int,
        combine: bool,
        init: str,
        norm: bool,
        reference_code: bool = False,
    ) -> None:
        super().__init__()
        self.x_dim, self.delta_dim = x_dim, delta_dim
        self.norm = norm
        self.combine = combine
        self.with_pending = reference_code
        self.x_moments = RunningMoments(x_dim)
        self.delta_moments = RunningMoments(delta_dim)
        if combine:
            self.mlp = ResidualMLP(x_dim + delta_dim, rank, n_hidden, n_modes, init, reference_code)
        else:
            self.x_mlp = ResidualMLP(x_dim, rank, n_hidden, n_modes, init, reference_code)
            self.delta_mlp = ResidualMLP(delta_dim, rank, n_hidden, n_modes, init, reference_code)

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor, mode: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, delta = x.float(), delta.float()
        if self.norm:
            if self.training:
                self.x_moments.accumulate(x)
                self.delta_moments.accumulate(delta)
            x, delta = self.x_moments(x, self.with_pending), self.delta_moments(delta, self.with_pending)
        if self.combine:
            return self.mlp(torch.cat([x, delta], dim=-1), mode).split([self.x_dim, self.delta_dim], dim=-1)
        return self.x_mlp(x, mode), self.delta_mlp(delta, mode)


class MEND(WeightEditor):
    """The MEND editor for a fixed set of edited weights.

    `param_shapes` maps each edited parameter name (as in `backbone.model.named_parameters()`)
    to its shape; names in `transposed` are stored [in, out] (GPT-2's Conv1D), all others
    [out, in] (nn.Linear). `MEND.for_backbone(backbone, ...)` fills both in from a backbone.
    Calling it, `editor(model, inputs, rows)`, edits a `WeightEditedModel` on rows of a step's inputs.
    `variant`: "paper" or "reference-code" (see the module docstring).
    """

    VARIANTS = ("paper", "reference-code")

    def __init__(
        self,
        param_shapes: Mapping[str, Sequence[int]],
        rank: int = 1920,
        n_hidden: int = 1,
        combine: bool = True,
        init: str = "id",
        edit_lr: float = 1e-4,
        norm: bool = True,
        transposed: Collection[str] = (),
        variant: str = "paper",
        max_edit_ratio: float | None = None,
    ) -> None:
        super().__init__()
        if init not in ("id", "xavier"):
            raise ValueError(f"MEND init must be 'id' or 'xavier', got {init!r}")
        if variant not in self.VARIANTS:
            raise ValueError(f"MEND variant must be one of {', '.join(self.VARIANTS)}; got {variant!r}")
        unknown = set(transposed) - set(param_shapes)
        if unknown:
            raise ValueError(f"MEND transposed names not among param_shapes: {sorted(unknown)}")
        self.param_shapes = {name: tuple(int(d) for d in shape) for name, shape in param_shapes.items()}
        for name, shape in self.param_shapes.items():
            if len(shape) != 2:
                raise ValueError(f"MEND edits 2-d weights; {name!r} has shape {shape}")
        self.param_names = list(self.param_shapes)
        self.transposed = sorted(transposed)
        # Constructor arguments as plain data: `MEND.from_config(editor.config)` rebuilds it (for artifacts).
        self.config = {
            "param_shapes": {n: list(s) for n, s in self.param_shapes.items()},
            "rank": rank,
            "n_hidden": n_hidden,
            "combine": combine,
            "init": init,
            "edit_lr": edit_lr,
            "norm": norm,
            "transposed": self.transposed,
            "variant": variant,
        }
        # The reference code adds the transformed update; edit terms are subtracted (W - u v^T), so u flips.
        self.adds_update = variant == "reference-code"
        self.limit_edits(max_edit_ratio)

        # Group by (out, in): layers of one shape share a transform; their index in the group is their mode.
        groups: dict[str, list[str]] = {}
        for name, shape in self.param_shapes.items():
            out_dim, in_dim = shape[::-1] if name in self.transposed else shape
            groups.setdefault(f"{out_dim}x{in_dim}", []).append(name)
        self.route = {name: (key, mode) for key, members in groups.items() for mode, name in enumerate(members)}
        self.transforms = nn.ModuleDict(
            {
                key: GradientTransform(
                    x_dim=int(key.split("x")[1]),
                    delta_dim=int(key.split("x")[0]),
                    n_modes=len(members),
                    rank=rank,
                    n_hidden=n_hidden,
                    combine=combine,
                    init=init,
                    norm=norm,
                    reference_code=variant == "reference-code",
                )
                for key, members in groups.items()
            }
        )
        self.edit_lrs = nn.Parameter(torch.full((len(self.param_names),), float(edit_lr)))

    @classmethod
    def for_backbone(cls, backbone: Backbone, **hparams: Any) -> MEND:
        """An editor for `backbone.edit_param_names`, with shapes and layouts read from the model."""
        weights = backbone.editable_parameters()
        transposed = [name for name in weights if isinstance(edited_module(backbone, name), Conv1D)]
        return cls({name: tuple(w.shape) for name, w in weights.items()}, transposed=transposed, **hparams)

    def editor_parameters(self) -> list[nn.Parameter]:
        """Everything trained with the editor's learning rate (all but `edit_lrs`)."""
        return [p for name, p in self.named_parameters() if name != "edit_lrs"]

    def lr_parameters(self) -> list[nn.Parameter]:
        """The learned per-layer edit step sizes, trained with their own learning rate."""
        return [self.edit_lrs]

    def _moments(self) -> list[RunningMoments]:
        return [m for m in self.modules() if isinstance(m, RunningMoments)] if self.config["norm"] else []

    def take_pending_statistics(self) -> torch.Tensor:
        """Every transform's pending moments (from the edits since the last take), packed in one
        1-d tensor (empty without normalisation), and cleared: what `commit_statistics` merges."""
        pending = [m.take_pending() for m in self._moments()]
        return torch.cat(pending) if pending else self.edit_lrs.new_zeros(0)

    def commit_statistics(self, pending: torch.Tensor) -> None:
        """Merge `take_pending_statistics()` results into the running statistics: [L] from one
        process or [K, L] from K processes (in rank order, so every process commits the same)."""
        moments = self._moments()
        if not moments:
            return
        pending = pending.reshape(-1, sum(m.packed_size() for m in moments))
        for m, part in zip(moments, pending.split([m.packed_size() for m in moments], dim=1)):
            m.commit(part)

    def limit_edits(self, ratio: float | None) -> None:
        """Scale each edit's update down, when larger, to `ratio` times the norm of the unedited weights it edits
        (Frobenius norms over all edited weights together; None: no limit); each weight's share of the
        update stays as the editor made it. Ours, for sequential editing: an editor meta-trained on the
        unedited weights meets weights its earlier edits moved, where its updates grow edit after edit
        (BENCHMARKS.md, sequence-aware MEND). Meta-trained under the limit (`MENDModule.max_edit_ratio`),
        the editor learns edits that take within it; the scaling is differentiable."""
        if ratio is not None and not (isinstance(ratio, int | float) and 0 < ratio < math.inf):
            raise ValueError(f"the edit norm ratio must be a number > 0, got {ratio!r}")
        self.max_edit_ratio = ratio
        self.config["max_edit_ratio"] = ratio  # an artifact keeps the limit its editor was trained under

    def _limited(
        self,
        terms: list[tuple[str, torch.Tensor, torch.Tensor]],
        row_of: Mapping[str, torch.Tensor],
        n_groups: int,
        model: WeightEditedModel,
    ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """`terms` (name, u, x) with each group's rows scaled so that its ||sum u x^T||_F is at most
        `max_edit_ratio` * ||W||_F, the norms from the factors (sum_ij (u_i . u_j)(x_i . x_j) within a group)."""
        # The weights before any edit was folded in: a limit relative to the weights as they are would let
        # each edit grow it, compounding over a sequence.
        limit = self.max_edit_ratio**2 * model.unedited_squared_norm
        squared = torch.zeros(n_groups, dtype=torch.float64)
        for name, u, x in terms:
            rows = row_of[name].to(u.device)
            same_group = (rows.unsqueeze(0) == rows.unsqueeze(1)).float()
            squared.index_add_(0, row_of[name], ((u @ u.T) * (x @ x.T) * same_group).sum(1).double().cpu())
        scale = (limit / squared.clamp(min=torch.finfo(torch.float64).tiny)).sqrt().clamp(max=1.0).float()
        return [(name, u * scale[row_of[name]].to(u.device).unsqueeze(1), x) for name, u, x in terms]

    def check(self, model: WeightEditedModel) -> None:
        """Refuse a backbone whose edited weights differ from those this editor was built for."""
        params = model.backbone.editable_parameters()
        if list(params) != self.param_names:
            raise ValueError(f"MEND was built for the weights {self.param_names}, the backbone edits {list(params)}")
        for name, w in params.items():
            if tuple(w.shape) != self.param_shapes[name]:
                raise ValueError(
                    f"MEND was built for {name!r} of shape {self.param_shapes[name]}, the backbone's is "
                    f"{tuple(w.shape)}"
                )
            if (name in self.transposed) != isinstance(model.modules[name], Conv1D):
                raise ValueError(
                    f"MEND's layout for {name!r} (transposed={name in self.transposed}) does not match the "
                    "backbone's module"
                )

    def forward(
        self,
        model: WeightEditedModel,
        inputs: StepInputs,
        rows: torch.Tensor,
        on_top_of: torch.Tensor | None = None,
        batched: bool = False,
    ) -> torch.Tensor:
        """Edit `model` on `rows` of `inputs` (prompt + new answer): one new group per row on top of
        `on_top_of` (default: the unedited model), or with `batched` one group for all rows (their
        rows summed, the edit loss their mean). Returns each row's new group."""
        self.check(model)
        groups, weights = new_edit_groups(model, len(rows), on_top_of, batched)
        factors, row_of = model.capture(inputs, rows, on_top_of, weights)
        step = dict(zip(self.param_names, self.edit_lrs))
        terms = []
        for key, transform in self.transforms.items():
            # The layers sharing a transform go through it together (their modes row by row): one
            # matmul per weight of the transform, and one gradient for it, instead of one per layer.
            # The reference code runs them one at a time, each normalised with the rows seen so far.
            shared = [name for name in self.param_names if self.route[name][0] == key]
            for names in [[name] for name in shared] if transform.with_pending else [shared]:
                sizes = [len(factors[name][0]) for name in names]
                x, delta = (torch.cat([factors[name][i] for name in names]) for i in (0, 1))
                modes = torch.cat(
                    [torch.full((n,), self.route[name][1], device=x.device) for name, n in zip(names, sizes)]
                )
                x, delta = transform(x, delta, modes)
                for name, x_part, delta_part in zip(names, x.split(sizes), delta.split(sizes)):
                    # Float32 even under bf16 autocast: the terms are summed over every token of the edit.
                    with torch.autocast(x_part.device.type, enabled=False):
                        terms.append((name, step[name] * delta_part.float(), x_part.float()))
        if self.max_edit_ratio is not None:
            terms = self._limited(terms, row_of, len(groups), model)
        for name, u, x in terms:
            model.add({name: (-u if self.adds_update else u, x)}, groups[row_of[name]])
        return groups
