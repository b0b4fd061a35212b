"""Optimised weight edits: FT-L and LoRA, the field's fine-tuning baselines (EasyEdit's FT and LoRA).

Every edit group gets its own trainable change of the edited weights and Adam runs `steps` steps on
its edit loss. Rows do not interact and Adam is per element, so one forward over all rows serves
every group and each group's optimisation is the one it would have alone. The changes are low-rank
terms of a `WeightEditedModel` (W~ = W - sum_r u_r v_r^T), so these edits answer, fold and restore
like MEND's:

- FT-L (Zhu et al. 2020, "Modifying memories in transformer models"; EasyEdit's FT with objective
  `prompt_last`): a dense change D of each edited weight, as min(out, in) terms against unit vectors,
  clamped after every step to |D| <= `norm_constraint` element-wise (the weights stay within W0 +- eps).
- LoRA (Hu et al. 2022): D = alpha / rank * B A per edited weight, B zero and A Kaiming-uniform at the
  start (as peft); no dropout, so edits are deterministic.

Objectives: `target_new`, the mean NLL of the answer tokens (teacher-forced), or `prompt_last`, every
answer token scored at the last prompt position. A group whose loss is under `stop_loss` takes no more
steps (EasyEdit's FT: 1e-2).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kedit_lightning.editors.edited_model import StepInputs, WeightEditedModel, WeightEditor, new_edit_groups
from kedit_lightning.editors.losses import per_example_nll, per_example_prompt_last_nll

OBJECTIVES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "target_new": per_example_nll,
    "prompt_last": per_example_prompt_last_nll,
}


def out_in(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of an edited Linear or GPT-2 Conv1D (whose weight is stored [in, out])."""
    shape = module.weight.shape
    return (shape[1], shape[0]) if isinstance(module, Conv1D) else (shape[0], shape[1])


class OptimizedEdit(WeightEditor, ABC):
    """Adam on per-group weight changes (`start` makes them, `terms` turns them into low-rank terms)."""

    def __init__(self, lr: float, steps: int, objective: str, stop_loss: float) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r}: expected one of {sorted(OBJECTIVES)}")
        if not lr > 0 or not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"lr {lr!r} and steps {steps!r}: expected a positive lr and an integer >= 1 steps")
        self.lr, self.steps, self.objective, self.stop_loss = lr, steps, objective, stop_loss

    @abstractmethod
    def start(self, model: WeightEditedModel, n_groups: int) -> dict[str, list[torch.Tensor]]:
        """Per edited weight: the trainable tensors of `n_groups` groups' changes, group first."""

    @abstractmethod
    def terms(self, params: Mapping[str, list[torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per edited weight: (u [G, r, out], v [G, r, in]) of each group's change."""

    def param_groups(self, params: Mapping[str, list[torch.Tensor]]) -> list[dict[str, Any]]:
        return [{"params": [t for tensors in params.values() for t in tensors]}]

    def constrain(self, params: Mapping[str, list[torch.Tensor]]) -> None:
        """After each step (FT-L's norm constraint)."""

    CONFIG: tuple[str, ...] = ()
    """The constructor arguments `config` records."""

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain data: `from_config(config)` rebuilds the editor."""
        return {name: getattr(self, name) for name in self.CONFIG}

    def _open(
        self,
        model: WeightEditedModel,
        params: Mapping[str, list[torch.Tensor]],
        n_rows: int,
        on_top_of: torch.Tensor | None,
        batched: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New groups holding `params`' changes: (each row's group, each row's weight in its group's loss)."""
        groups, weights = new_edit_groups(model, n_rows, on_top_of, batched)
        first = int(groups.min())
        for name, (u, v) in self.terms(params).items():
            ids = torch.arange(first, first + u.shape[0]).repeat_interleave(u.shape[1])
            model.add({name: (u.flatten(0, 1), v.flatten(0, 1))}, ids)
        return groups, weights

    def forward(
        self,
        model: WeightEditedModel,
        inputs: StepInputs,
        rows: torch.Tensor,
        on_top_of: torch.Tensor | None = None,
        batched: bool = False,
    ) -> torch.Tensor:
        """As `MEND.forward`: each row's (or, `batched`, all rows') edit, optimised for `steps` steps."""
        mark = model.mark()
        n_groups = 1 if batched else len(rows)
        params = self.start(model, n_groups)
        optimizer = torch.optim.Adam(self.param_groups(params), lr=self.lr)
        labels = inputs.labels[rows]
        loss_of = OBJECTIVES[self.objective]
        with torch.enable_grad():
            for _ in range(self.steps):
                groups, weights = self._open(model, params, len(rows), on_top_of, batched)
                per_row = loss_of(model.answer_logits(inputs, rows, groups), labels) * weights.to(labels.device)
                slots = (groups - groups.min()).to(labels.device)
                losses = per_row.new_zeros(n_groups).index_add(0, slots, per_row)
                model.drop_after(mark)
                going = losses.detach() >= self.stop_loss
                if not bool(going.any()):
                    break
                # Groups already under `stop_loss` take no step: their values are put back after it.
                stopped = ~going
                kept = [(t, t.detach()[stopped].clone()) for tensors in params.values() for t in tensors]
                optimizer.zero_grad()
                losses[going].sum().backward()
                optimizer.step()
                with torch.no_grad():
                    for t, values in kept:
                        t[stopped] = values
                    self.constrain(params)
        with torch.no_grad():
            detached = {name: [t.detach() for t in tensors] for name, tensors in params.items()}
            groups, _ = self._open(model, detached, len(rows), on_top_of, batched)
        return groups


class FTL(OptimizedEdit):
    """FT-L: Adam on a dense change of each edited weight, clamped to `norm_constraint` (None: unclamped).

    Defaults are EasyEdit's FT-L (hparams/FT: 25 steps, lr 5e-4, prompt_last, stop at loss 1e-2) with the
    L-infinity bound of its GPT-2 XL setting and of ROME's FT-L baseline (5e-4)."""

    CONFIG = ("lr", "steps", "norm_constraint", "objective", "stop_loss")

    def __init__(
        self,
        lr: float = 5e-4,
        steps: int = 25,
        norm_constraint: float | None = 5e-4,
        objective: str = "prompt_last",
        stop_loss: float = 1e-2,
    ) -> None:
        super().__init__(lr, steps, objective, stop_loss)
        self.norm_constraint = norm_constraint

    def start(self, model: WeightEditedModel, n_groups: int) -> dict[str, list[torch.Tensor]]:
        params = {}
        for name, module in model.modules.items():
            out, inp = out_in(module)
            params[name] = [module.weight.new_zeros(n_groups, out, inp, dtype=torch.float32).requires_grad_()]
        return params

    def terms(self, params: Mapping[str, list[torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        terms = {}
        for name, (change,) in params.items():
            n_groups, out, inp = change.shape
            eye = torch.eye(min(out, inp), device=change.device).expand(n_groups, -1, -1)
            # W~ = W + D = W - sum_r u_r v_r^T: against unit vectors on the smaller side.
            terms[name] = (-change.transpose(1, 2), eye) if inp <= out else (eye, -change)
        return terms

    def constrain(self, params: Mapping[str, list[torch.Tensor]]) -> None:
        if self.norm_constraint is not None:
            for (change,) in params.values():
                change.clamp_(-self.norm_constraint, self.norm_constraint)


class LoRA(OptimizedEdit):
    """LoRA on the edited weights: D = alpha / rank * B A, trained with Adam on the edit alone.

    Defaults are EasyEdit's LoRA (hparams/LoRA/llama-7b: rank 8, alpha 32, lr 5e-3, 70 steps, the answer
    tokens' NLL, no early stop); EasyEdit adapts q_proj and v_proj, here the editor's layers. Every edit
    draws its A from a generator seeded with `seed`, so a run's scores do not depend on the global RNG."""

    CONFIG = ("rank", "alpha", "lr", "steps", "objective", "stop_loss", "seed")

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 32.0,
        lr: float = 5e-3,
        steps: int = 70,
        objective: str = "target_new",
        stop_loss: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(lr, steps, objective, stop_loss)
        self.rank, self.alpha, self.seed = rank, alpha, seed

    def start(self, model: WeightEditedModel, n_groups: int) -> dict[str, list[torch.Tensor]]:
        params = {}
        generator = torch.Generator().manual_seed(self.seed)  # on the CPU: the same draws on any device
        for name, module in model.modules.items():
            out, inp = out_in(module)
            down = torch.empty(n_groups, self.rank, inp)
            for row in down:  # each group's A as peft initialises one: Kaiming-uniform, a = sqrt(5)
                nn.init.kaiming_uniform_(row, a=math.sqrt(5), generator=generator)
            down = down.to(module.weight.device)
            up = module.weight.new_zeros(n_groups, out, self.rank, dtype=torch.float32)
            params[name] = [up.requires_grad_(), down.requires_grad_()]
        return params

    def terms(self, params: Mapping[str, list[torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        scale = self.alpha / self.rank
        return {name: (-scale * up.transpose(1, 2), down) for name, (up, down) in params.items()}
