"""MEND: Model Editor Networks with Gradient Decomposition.

Mitchell, Lin, Bosselut, Finn and Manning, "Fast Model Editing at Scale", ICLR 2022
(https://arxiv.org/abs/2110.11309). The whole algorithm is in this file:

1. Edit loss. L = NLL of the new answer on the edit prompt (`masked_nll`, mean over examples).
2. Rank-one factors. For an edited Linear y = W x, dL/dW = sum_t delta_t x_t^T with
   delta_t = dL/dy_t, so each token contributes a rank-one matrix. x_t is captured by a forward
   hook on the Linear, delta_t by `torch.autograd.grad(L, layer outputs)`: gradients of the
   outputs only, no parameter gradients and no `.backward()` (cheap, and invisible to DDP).
   Rows whose x or delta is all zero (padding, positions after the answer) carry nothing and
   are dropped.
3. Transform. One GradientTransform g per weight shape, shared by every edited layer of that
   shape, maps each row pair to (x~_t, delta~_t): normalise x and delta with running statistics
   (see "Statistics" below), then a residual MLP of low-rank layers
       h = z + act(s_l * (U V z + b) + o_l)
   with a per-layer ("mode") scale s_l and offset o_l, and U = 0 at init so g starts as the
   identity.
4. Edit. W~ = W - alpha_l * sum_t delta~_t x~_t^T, with a learned step size alpha_l per edited
   layer (initialised to `edit_lr`, trained with its own learning rate). With identity init and
   no statistics yet this is exactly one step of gradient descent on L.
5. Meta-training. The new weights are applied functionally (`Backbone.forward(batch, params)`),
   so an outer loss on other inputs (rephrases, locality) backpropagates into g and alpha.
   The factors x, delta are constants of the edit: gradients reach the editor through g and
   alpha, and reach earlier edits through W.

Batched edits (several examples in one sub-batch) sum all their rows into one update; sequential
edits call the editor again with the weights the previous call returned.

Statistics. The per-feature mean and variance of all x and delta rows seen in training so far
normalise every edit, in training and evaluation alike. They change once per training step,
not per edit: in training mode an edit normalises with the statistics as they were at the start
of the step and adds its rows' moments to a pending (count, mean, M2) held by the editor; the
training loop takes the pending moments once per step (`take_pending_statistics`), merges those
of every process (`commit_statistics`) and drops them for a skipped step. A step is then a
function of its whole batch and of nothing else: no record depends on which records preceded
it in the step, and a step split over data-parallel processes (each seeing only its records)
computes what one process computes on the whole batch. Before any statistics exist (the first
step) normalisation is the identity, so that step's edits are plain gradient steps.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from data_modules.encoding import SubBatch
from kedit_lightning.backbones.base import Backbone
from kedit_lightning.editors.losses import masked_nll

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

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # torch.where instead of an `if` keeps the check on the device (no host sync per edit).
        ready = self.count >= 2
        mean = torch.where(ready, self.mean, torch.zeros_like(self.mean))
        inv_std = torch.where(ready, 1.0 / (self.var.sqrt() + _NORM_EPS), torch.ones_like(self.mean))
        return (rows - mean) * inv_std


class LowRankResidual(nn.Module):
    """h = z + act(scale[mode] * (U V z + b) + shift[mode]), U [dim, rank], V [rank, dim]."""

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

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        # F.linear on the parameters themselves: under autocast their bf16 copies are then cast
        # once per step and cached; `.T` views would be re-cast (and kept for backward) per edit.
        h = F.linear(F.linear(z, self.down), self.up, self.bias)
        h = h * self.mode_scale[mode] + self.mode_shift[mode]
        # clamp, not relu: its gradient passes at exactly 0, where an identity-initialised
        # hidden layer sits; relu's zero gradient there would leave that layer untrainable.
        return z + (h.clamp(min=0) if self.activate else h)


class ResidualMLP(nn.Module):
    """`n_hidden` activated low-rank residual layers, then one linear low-rank residual layer."""

    def __init__(self, dim: int, rank: int, n_hidden: int, n_modes: int, init: str) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.layers = nn.ModuleList(
            LowRankResidual(dim, rank, n_modes, activate=i < n_hidden, init=init) for i in range(n_hidden + 1)
        )

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        for layer in self.layers:
            z = layer(z, mode)
        return z


class GradientTransform(nn.Module):
    """g: (x [N, x_dim], delta [N, delta_dim]) -> (x~, delta~), shared by the layers of one weight shape.

    `combine=True` transforms concat(x, delta) with one MLP (the paper's default); otherwise x and
    delta get one MLP each.
    """

    def __init__(
        self, x_dim: int, delta_dim: int, n_modes: int, rank: int, n_hidden: int, combine: bool, init: str, norm: bool
    ) -> None:
        super().__init__()
        self.x_dim, self.delta_dim = x_dim, delta_dim
        self.norm = norm
        self.combine = combine
        self.x_moments = RunningMoments(x_dim)
        self.delta_moments = RunningMoments(delta_dim)
        if combine:
            self.mlp = ResidualMLP(x_dim + delta_dim, rank, n_hidden, n_modes, init)
        else:
            self.x_mlp = ResidualMLP(x_dim, rank, n_hidden, n_modes, init)
            self.delta_mlp = ResidualMLP(delta_dim, rank, n_hidden, n_modes, init)

    def forward(self, x: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, delta = x.float(), delta.float()
        if self.norm:
            if self.training:
                self.x_moments.accumulate(x)
                self.delta_moments.accumulate(delta)
            x, delta = self.x_moments(x), self.delta_moments(delta)
        if self.combine:
            return self.mlp(torch.cat([x, delta], dim=-1), mode).split([self.x_dim, self.delta_dim], dim=-1)
        return self.x_mlp(x, mode), self.delta_mlp(delta, mode)


def _edited_module(backbone: Backbone, name: str) -> nn.Module:
    """The Linear (or GPT-2 Conv1D) whose `weight` is the parameter `name` of `backbone.model`."""
    module_name, _, attr = name.rpartition(".")
    module = backbone.model.get_submodule(module_name)
    if attr != "weight" or not isinstance(module, (nn.Linear, Conv1D)):
        raise TypeError(
            f"MEND edits the weight of a Linear or Conv1D; {name!r} is {attr!r} of a {type(module).__name__}"
        )
    return module


def capture_factors(
    backbone: Backbone, sub_batch: SubBatch, params: Mapping[str, torch.Tensor], names: Sequence[str] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rows (x [N, in], delta [N, out]) of the edit loss's gradient for each weight in `names`.

    The forward runs with `params` standing in for the model's parameters (`names` defaults to
    all of them). The weights in `names` enter as detached leaves that require grad, so the
    hooked outputs are part of the graph even in a frozen model; only those outputs are
    differentiated. Rows with an all-zero x or delta are dropped.
    """
    names = list(params) if names is None else list(names)
    modules = {name: _edited_module(backbone, name) for name in names}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def recorder(name: str):
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            inputs[name].append(args[0].detach())
            outputs[name].append(output)

        return record

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    leaves = {name: w.detach().requires_grad_(name in modules) for name, w in params.items()}
    try:
        with torch.enable_grad():
            loss = masked_nll(backbone(sub_batch, leaves), sub_batch["labels"])
            flat_outputs = [out for name in names for out in outputs[name]]
            flat_grads = iter(torch.autograd.grad(loss, flat_outputs, allow_unused=True, materialize_grads=True))
    finally:
        for handle in handles:
            handle.remove()

    factors = {}
    for name in names:
        w = params[name]
        in_dim, out_dim = (w.shape[1], w.shape[0]) if isinstance(modules[name], nn.Linear) else tuple(w.shape)
        grads = [next(flat_grads) for _ in outputs[name]]
        x = torch.cat([a.reshape(-1, in_dim) for a in inputs[name]]) if grads else w.new_zeros(0, in_dim)
        delta = torch.cat([g.reshape(-1, out_dim) for g in grads]) if grads else w.new_zeros(0, out_dim)
        keep = (x != 0).any(-1) & (delta != 0).any(-1)
        factors[name] = (x[keep], delta[keep])
    return factors


def edit_gradients(
    backbone: Backbone, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Plain gradient of the edit loss w.r.t. the edited weights (autograd on the weights themselves).

    The reference MEND's identity-initialised transform reproduces, and the fine-tuning baseline's
    step direction. `params` overrides weights as in `MEND.forward`; the result has a gradient
    for every editable parameter and every name in `params`.
    """
    weights = {**backbone.editable_parameters(), **(params or {})}
    leaves = {name: w.detach().requires_grad_() for name, w in weights.items()}
    with torch.enable_grad():
        loss = masked_nll(backbone(sub_batch, leaves), sub_batch["labels"])
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, grads))


class MEND(nn.Module):
    """The MEND editor for a fixed set of edited weights.

    `param_shapes` maps each edited parameter name (as in `backbone.model.named_parameters()`)
    to its shape; names in `transposed` are stored [in, out] (GPT-2's Conv1D), all others
    [out, in] (nn.Linear). `MEND.for_backbone(backbone, ...)` fills both in from a backbone.
    `forward(backbone, sub_batch, params)` returns the edited weights {name: W~}.
    """

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
    ) -> None:
        super().__init__()
        if init not in ("id", "xavier"):
            raise ValueError(f"MEND init must be 'id' or 'xavier', got {init!r}")
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
        }

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
                )
                for key, members in groups.items()
            }
        )
        self.edit_lrs = nn.Parameter(torch.full((len(self.param_names),), float(edit_lr)))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MEND:
        """The editor `config` (a `MEND.config`) describes, with fresh weights."""
        return cls(**config)

    @classmethod
    def for_backbone(cls, backbone: Backbone, **hparams: Any) -> MEND:
        """An editor for `backbone.edit_param_names`, with shapes and layouts read from the model."""
        weights = backbone.editable_parameters()
        transposed = [name for name in weights if isinstance(_edited_module(backbone, name), Conv1D)]
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

    def forward(
        self, backbone: Backbone, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Edit on `sub_batch`; returns `params` (or {}) updated with the new weight of every edited name."""
        params = dict(params or {})
        weights = {
            name: params[name] if name in params else backbone.model.get_parameter(name) for name in self.param_names
        }
        for name, w in weights.items():
            if tuple(w.shape) != self.param_shapes[name]:
                raise ValueError(
                    f"MEND was built for {name!r} of shape {self.param_shapes[name]}, the backbone's is {tuple(w.shape)}"
                )
            if (name in self.transposed) != isinstance(_edited_module(backbone, name), Conv1D):
                raise ValueError(
                    f"MEND's layout for {name!r} (transposed={name in self.transposed}) does not match the backbone's module"
                )
        factors = capture_factors(backbone, sub_batch, {**params, **weights}, self.param_names)
        for i, name in enumerate(self.param_names):
            key, mode = self.route[name]
            x, delta = self.transforms[key](*factors[name], mode)
            # Summed in float32 even under bf16 autocast (a sum over every token of the edit); the
            # step size scales the rows first, so backward keeps no full-size float32 update.
            with torch.autocast(x.device.type, enabled=False):
                update = (self.edit_lrs[i] * delta.float()).T @ x.float()  # lr * sum_t delta~_t x~_t^T: [out, in]
            if name in self.transposed:
                update = update.T
            params[name] = weights[name] - update.to(weights[name].dtype)
        return params
