"""GRACE: a discrete key-value codebook at one layer (Hartvigsen, Sankaranarayanan, Palangi, Kim and
Ghassemi, "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors", NeurIPS 2023,
https://arxiv.org/abs/2211.11031).

The paper's method, with its published defaults (Euclidean distance, cold-started values trained with
Adam at lr 1.0, initial deferral radius 1.0, `coverage` radius growth, replace-last):
- Key: the edited layer's input at the last prompt token. Value: a vector that replaces the layer's
  output at that token when the input's key lies within the nearest entry's deferral radius epsilon.
- An edit searches the codebook for the nearest key. None within (eps_init + its epsilon): a new entry
  (key, eps_init). Within it and the same answer: that entry's radius grows to cover the new key. Within
  it and another answer: a new entry, and both radii shrink to half the distance (they no longer overlap).
- The chosen entry's value is trained for `n_iter` steps on the edit's answer NLL; nothing else changes,
  so earlier edits hold by construction and far inputs are untouched.
Ours: entries are never changed in place. A grown or shrunk radius, or a value trained further, is a new
entry of the edit's group that shadows the old one for that group's descendants, so edit groups (batched
records, sequential chains, dropped trial edits) stay independent as in every edited model here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kedit_lightning.backbones.base import Backbone
from kedit_lightning.editors.edited_model import ConfiguredEditor, StepInputs, new_edit_groups
from kedit_lightning.editors.layer_memory import HookRows, LayerMemoryModel, key_positions

_SPLIT_MARGIN = 1e-5  # the older entry's halved radius sits just inside half the distance, as in the paper


def distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[N, E] Euclidean distances, computed directly (exact zeros for equal vectors)."""
    return torch.cdist(queries.float(), keys.float(), compute_mode="donot_use_mm_for_euclid_dist")


class CodebookModel(LayerMemoryModel):
    """GRACE's edited model: codebook entries (key, value, radius, answer) in edit groups, and shadows
    (group, entry): an entry its group's descendants no longer see."""

    def __init__(self, backbone: Backbone, weight: str | None) -> None:
        super().__init__(backbone, weight)
        self.keys: torch.Tensor | None = None  # [E, in]
        self.values: torch.Tensor | None = None  # [E, out]
        self.radii = torch.empty(0)
        self.entry_groups = torch.empty(0, dtype=torch.long)
        self.answers: list[tuple[int, ...]] = []
        self.shadow_groups = torch.empty(0, dtype=torch.long)
        self.shadow_entries = torch.empty(0, dtype=torch.long)
        self.training: tuple[torch.Tensor, torch.Tensor] | None = None  # (entries, values) being trained

    def __len__(self) -> int:
        return len(self.answers)

    def has_edits(self) -> bool:
        return len(self) > 0

    def allowed(self, visible: torch.Tensor) -> torch.Tensor:
        """[N, E] bool: the entries each row sees (its visible groups', less those a visible group shadows)."""
        device = visible.device
        allowed = visible[:, self.entry_groups.to(device)]
        if len(self.shadow_groups):
            hits = visible[:, self.shadow_groups.to(device)].float()
            shadowed = torch.zeros(allowed.shape, device=device).index_add_(1, self.shadow_entries.to(device), hits)
            allowed &= shadowed == 0
        return allowed

    def nearest(self, queries: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance [N], entry [N]) of each query's nearest allowed key (inf, 0 when it sees none)."""
        found = distances(queries, self.keys).masked_fill(~self.allowed(visible), float("inf"))
        return found.min(1)

    def current_values(self) -> torch.Tensor:
        if self.training is None:
            return self.values
        entries, values = self.training
        return self.values.index_put((entries,), values)

    def transform(self, x: torch.Tensor, output: torch.Tensor, rows: HookRows) -> torch.Tensor:
        """Replace-last: the output at the last prompt token becomes the nearest entry's value when the key
        is within that entry's radius."""
        if not len(self):
            return output
        index = torch.arange(len(x), device=x.device)
        at = key_positions(rows.labels)
        distance, entry = self.nearest(x[index, at], rows.visible)
        hit = distance <= self.radii.to(x.device)[entry]
        values = self.current_values()[entry].to(output.dtype)
        replaced = torch.where(hit.unsqueeze(1), values, output[index, at])
        return output.index_put((index, at), replaced)

    def fold_groups(self) -> None:
        """Refused (FloatingPointError, nothing folded) when a value is not finite."""
        if self.values is not None and not bool(torch.isfinite(self.values).all()):
            raise FloatingPointError("non-finite values in the GRACE codebook")

    def add_entry(self, key: torch.Tensor, value: torch.Tensor, radius: float, group: int, answer: tuple) -> int:
        self.keys = key[None] if self.keys is None else torch.cat([self.keys, key[None]])
        self.values = value[None] if self.values is None else torch.cat([self.values, value[None]])
        self.radii = torch.cat([self.radii, torch.tensor([radius])])
        self.entry_groups = torch.cat([self.entry_groups, torch.tensor([group])])
        self.answers.append(answer)
        return len(self) - 1

    def shadow(self, entry: int, group: int) -> None:
        self.shadow_groups = torch.cat([self.shadow_groups, torch.tensor([group])])
        self.shadow_entries = torch.cat([self.shadow_entries, torch.tensor([entry])])

    def drop_groups(self, mark: int) -> None:
        keep = self.entry_groups < mark
        shadows = self.shadow_groups < mark
        self.shadow_groups, self.shadow_entries = self.shadow_groups[shadows], self.shadow_entries[shadows]
        if bool(keep.all()):
            return
        # Entries come in group order (a group's entries are added when it is opened), so the kept ones are
        # a prefix and the kept shadows' entry indices stay valid.
        n = int(keep.sum())
        self.keys = self.keys[:n] if n else None
        self.values = self.values[:n] if n else None
        self.radii, self.entry_groups, self.answers = self.radii[:n], self.entry_groups[:n], self.answers[:n]


class GRACE(ConfiguredEditor):
    """GRACE as an editor: `edited_model(backbone)` is an empty codebook at `weight` (default: the last of the
    backbone's edited weights); calling it adds each edit row's entry and trains its value (see module doc)."""

    def __init__(self, edit_lr: float = 1.0, n_iter: int = 50, eps: float = 1.0, weight: str | None = None) -> None:
        super().__init__()
        self.edit_lr = edit_lr
        self.n_iter = n_iter
        self.eps = eps
        self.weight = weight

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain data: `GRACE.from_config(config)` rebuilds it."""
        return {"edit_lr": self.edit_lr, "n_iter": self.n_iter, "eps": self.eps, "weight": self.weight}

    def edited_model(self, backbone: Backbone) -> CodebookModel:
        return CodebookModel(backbone, self.weight)

    def place(self, model: CodebookModel, key: torch.Tensor, group: int, answer: tuple, out_dim: int) -> int:
        """The codebook update for one edit's key (module doc); the entry whose value the edit trains."""
        cold = torch.rand(out_dim, device=key.device)  # the paper's cold start
        if not len(model):
            return model.add_entry(key, cold, self.eps, group, answer)
        visible = model.visible(torch.tensor([group]), 1, key.device)
        distance, entry = (t.item() for t in model.nearest(key[None], visible))
        if distance > self.eps + float(model.radii[entry]):
            return model.add_entry(key, cold, self.eps, group, answer)
        model.shadow(entry, group)
        old_key, old_value, old_radius = model.keys[entry], model.values[entry], float(model.radii[entry])
        if model.answers[entry] != answer:  # a conflict: split the radii
            model.add_entry(old_key, old_value, distance / 2 - _SPLIT_MARGIN, group, model.answers[entry])
            return model.add_entry(key, cold, distance / 2, group, answer)
        return model.add_entry(old_key, old_value, max(old_radius, distance), group, answer)  # coverage

    def forward(
        self,
        model: CodebookModel,
        inputs: StepInputs,
        rows: torch.Tensor,
        on_top_of: torch.Tensor | None = None,
        batched: bool = False,
    ) -> torch.Tensor:
        """Each row's edit (or, `batched`, all rows' in one group): codebook entries, then `n_iter` Adam steps
        on their values against the rows' answer NLL. Returns each row's group."""
        groups, weights = new_edit_groups(model, len(rows), on_top_of, batched)
        x, _ = model.layer_inputs(inputs, rows)
        labels = inputs.labels[rows]
        keys = x[torch.arange(len(rows), device=x.device), key_positions(labels)]
        out_dim = model.module.weight.shape[0 if isinstance(model.module, nn.Linear) else 1]
        chosen = [
            self.place(model, key, int(group), tuple(row[row >= 0].tolist()), out_dim)
            for key, group, row in zip(keys, groups, labels)
        ]
        entries = torch.tensor(sorted(set(chosen)), device=x.device)
        values = nn.Parameter(model.values[entries].clone())
        optimizer = torch.optim.Adam([values], lr=self.edit_lr)
        try:
            for _ in range(self.n_iter):
                model.training = (entries, values)
                loss = (model.row_nll(inputs, rows, groups) * weights.to(x.device)).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            model.training = None
        model.values[entries] = values.detach()
        return groups
