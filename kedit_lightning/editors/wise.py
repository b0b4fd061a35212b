"""WISE: a side memory with routing and knowledge sharding (Wang, Li, Yao, Chen, Xi, Zhang and Chen,
"WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language Models", NeurIPS 2024,
https://arxiv.org/abs/2405.14768).

The paper's method (WISE-Merge), with its published multimodal defaults:
- Side memory: a copy W' of one FFN output matrix W (main memory). Edits train W' only: SGD at lr 1.0,
  each gradient masked by the current shard's random mask (a fraction `mask_ratio` of W's entries), W'
  kept within `norm_constraint` of W entrywise.
- Routing: the activation score of an input is Delta_act(x) = ||a(x) (W' - W)^T||, a(x) the layer's input,
  averaged over the input's tokens. An input goes to the side memory when its score exceeds the
  threshold `act_ratio` x the smallest score of an edit prompt in force, to the main memory otherwise.
- Edit loss: the answer NLL plus the margin loss ReLU(Delta_irr - alpha) + ReLU(beta - Delta_edit)
  + ReLU(gamma - (Delta_edit - Delta_irr)), which pushes edit prompts' scores up and irrelevant ones' down.
- Knowledge sharding and merging: every `save_freq` edits start a new shard (a new random mask); every
  `merge_freq` edits the shards are merged into the side memory with TIES (trim to `density` by magnitude,
  elect signs, average the agreeing entries; Yadav et al., NeurIPS 2023).
Ours: the harness hands an editor only the edit, so the irrelevant inputs of the margin loss are
`irrelevant_rows` random token sequences as long as the edit prompt (the paper samples unrelated data;
EasyEdit uses the record's locality prompt). Scores are per row, never per batch. Side-memory changes
are kept per edit group (a delta on top of the group's parent) until `fold`, which adds them to their shards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_modules.encoding import IGNORE_INDEX
from kedit_lightning.backbones.base import Backbone
from kedit_lightning.editors.edited_model import ConfiguredEditor, StepInputs, new_edit_groups
from kedit_lightning.editors.layer_memory import HookRows, LayerMemoryModel


def activation_scores(side: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N]: Delta_act per row, the norm of the side memory's change to the output averaged over its tokens."""
    norms = side.float().norm(dim=-1) * mask
    return norms.sum(1) / mask.sum(1).clamp(min=1)


def ties_merge(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging of task vectors: keep each one's top `density` fraction of entries by magnitude, elect
    each entry's sign by the summed mass, and average the kept entries that agree with it."""
    stacked = torch.stack(deltas).float()
    flat = stacked.flatten(1)
    keep = max(1, int(round(density * flat.shape[1])))
    threshold = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
    trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.view(stacked.shape[1:]).to(deltas[0].dtype)


class SideMemoryModel(LayerMemoryModel):
    """WISE's edited model: the side memory as changes to the layer's output weight in the x @ delta layout
    ([in, out]); folded ones in shards and a merged part, pending ones per edit group with the smallest
    activation score of their edit prompts."""

    def __init__(self, backbone: Backbone, weight: str | None, wise: WISE) -> None:
        super().__init__(backbone, weight)
        self.wise = wise
        shape = self.module.weight.shape
        self.shape = (shape[1], shape[0]) if isinstance(self.module, nn.Linear) else tuple(shape)
        device = self.module.weight.device
        self.merged = torch.zeros(self.shape, device=device)
        self.shards: dict[int, torch.Tensor] = {}
        self.folded_edits = 0
        self.folded_score = float("inf")
        self.deltas: dict[int, torch.Tensor] = {}  # pending group -> its change on top of its parent
        self.scores: dict[int, float] = {}
        self.edits: dict[int, int] = {}  # pending group -> its number of edit rows
        self.shard_of: dict[int, int] = {}
        self.training: dict[int, torch.Tensor] = {}  # group -> delta being trained

    def has_edits(self) -> bool:
        return bool(self.deltas) or self.folded_edits > 0

    def folded_change(self) -> torch.Tensor:
        """[in, out]: the folded edits' W' - W (merged shards and the shards since)."""
        return self.merged + sum(self.shards.values(), torch.zeros_like(self.merged))

    def delta_of(self, visible: torch.Tensor) -> torch.Tensor:
        """[in, out]: W' - W of the side memory a row that sees the groups `visible` [G] uses."""
        total = self.folded_change()
        for group, delta in {**self.deltas, **self.training}.items():
            if bool(visible[group]):
                total = total + delta
        return total

    def side_change(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """[N, T, out]: x @ (W' - W) for each row's side memory (the folded one and its visible groups')."""
        change = x @ (torch.zeros_like(self.merged) if self.hidden else self.folded_change()).to(x.dtype)
        for group, delta in {**self.deltas, **self.training}.items():
            rows = visible[:, group]
            if bool(rows.any()):
                change = change + rows.view(-1, 1, 1).to(x.dtype) * (x @ delta.to(x.dtype))
        return change

    def edits_in_chain(self, group: int) -> int:
        visible = self.visible(torch.tensor([group]), 1, torch.device("cpu"))[0]
        return self.folded_edits + sum(n for g, n in self.edits.items() if visible[g])

    def threshold(self, visible: torch.Tensor) -> torch.Tensor:
        """[N]: act_ratio x the smallest edit score each row sees (inf: no edit in force)."""
        least = torch.full((len(visible),), self.folded_score if not self.hidden else float("inf"))
        for group, score in self.scores.items():
            least = torch.where(visible[:, group].cpu(), least.clamp(max=score), least)
        return (self.wise.act_ratio * least).to(visible.device)

    def transform(self, x: torch.Tensor, output: torch.Tensor, rows: HookRows) -> torch.Tensor:
        """The side memory's output for the rows it routes there (every row while editing), the main's otherwise."""
        change = self.side_change(x, rows.visible)
        if rows.editing:
            return output + change.to(output.dtype)
        routed = activation_scores(change, rows.mask) > self.threshold(rows.visible)
        return output + (routed.view(-1, 1, 1) * change).to(output.dtype)

    def fold_groups(self) -> None:
        """Pending changes into their shards; every `merge_freq` edits the shards merge into the side memory.
        Refused (FloatingPointError, nothing folded) when a change is not finite."""
        if not all(bool(torch.isfinite(delta).all()) for delta in self.deltas.values()):
            raise FloatingPointError("non-finite values in a WISE side-memory change")
        for group in sorted(self.deltas):
            shard = self.shard_of[group]
            self.shards[shard] = self.shards.get(shard, torch.zeros_like(self.merged)) + self.deltas[group]
            before = self.folded_edits
            self.folded_edits += self.edits[group]
            self.folded_score = min(self.folded_score, self.scores[group])
            if self.folded_edits // self.wise.merge_freq > before // self.wise.merge_freq:
                parts = [*self.shards.values(), *([self.merged] if bool(self.merged.any()) else [])]
                self.merged = ties_merge(parts, self.wise.density)
                self.shards.clear()
        self.drop_groups(0)

    def drop_groups(self, mark: int) -> None:
        for table in (self.deltas, self.scores, self.edits, self.shard_of):
            for group in [g for g in table if g >= mark]:
                del table[group]

    def restore(self) -> None:
        super().restore()
        self.merged.zero_()
        self.shards.clear()
        self.folded_edits, self.folded_score = 0, float("inf")


class WISE(ConfiguredEditor):
    """WISE as an editor: `edited_model(backbone)` is an empty side memory at `weight` (default: the last of
    the backbone's edited weights); calling it trains each edit's side-memory change (see module doc)."""

    def __init__(
        self,
        edit_lr: float = 1.0,
        n_iter: int = 10,
        mask_ratio: float = 0.2,
        norm_constraint: float = 1.0,
        act_margin: tuple[float, float, float] = (5.0, 20.0, 10.0),
        act_ratio: float = 0.4,
        save_freq: int = 500,
        merge_freq: int = 1000,
        density: float = 0.53,
        irrelevant_rows: int = 1,
        seed: int = 0,
        weight: str | None = None,
    ) -> None:
        super().__init__()
        if merge_freq % save_freq:
            raise ValueError(f"merge_freq ({merge_freq}) must be a multiple of save_freq ({save_freq})")
        self.edit_lr, self.n_iter, self.mask_ratio, self.norm_constraint = edit_lr, n_iter, mask_ratio, norm_constraint
        self.alpha, self.beta, self.gamma = act_margin
        self.act_ratio, self.save_freq, self.merge_freq, self.density = act_ratio, save_freq, merge_freq, density
        self.irrelevant_rows, self.seed, self.weight = irrelevant_rows, seed, weight

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain data: `WISE.from_config(config)` rebuilds it."""
        return {
            "edit_lr": self.edit_lr,
            "n_iter": self.n_iter,
            "mask_ratio": self.mask_ratio,
            "norm_constraint": self.norm_constraint,
            "act_margin": [self.alpha, self.beta, self.gamma],
            "act_ratio": self.act_ratio,
            "save_freq": self.save_freq,
            "merge_freq": self.merge_freq,
            "density": self.density,
            "irrelevant_rows": self.irrelevant_rows,
            "seed": self.seed,
            "weight": self.weight,
        }

    def edited_model(self, backbone: Backbone) -> SideMemoryModel:
        return SideMemoryModel(backbone, self.weight, self)

    def shard_mask(self, shard: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The random gradient mask of a shard: the same for the same seed and shard."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + shard)
        return (torch.rand(shape, generator=generator) < self.mask_ratio).to(device)

    def irrelevant(self, model: SideMemoryModel, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The edited layer's inputs for `irrelevant_rows` random token sequences of `width` tokens, and their mask."""
        backbone = model.backbone
        generator = torch.Generator().manual_seed(self.seed)
        vocab = backbone.model.get_input_embeddings().num_embeddings
        ids = torch.randint(vocab, (self.irrelevant_rows, width), generator=generator)
        if backbone.image_token_id is not None:
            ids = torch.where(ids == backbone.image_token_id, (ids + 1) % vocab, ids)
        sub_batch = {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids, device=device),
            "labels": torch.full_like(ids, IGNORE_INDEX, device=device),
        }
        inputs = StepInputs(backbone, {"irrelevant": sub_batch})
        return model.layer_inputs(inputs, inputs.rows("irrelevant"))

    def margin_loss(self, edit: torch.Tensor, irrelevant: torch.Tensor) -> torch.Tensor:
        """The paper's activation margin loss of one side memory: edit-prompt scores [N], irrelevant ones [M]."""
        return (
            F.relu(irrelevant - self.alpha).mean()
            + F.relu(self.beta - edit).mean()
            + F.relu(self.gamma - (edit[:, None] - irrelevant[None, :])).mean()
        )

    def forward(
        self,
        model: SideMemoryModel,
        inputs: StepInputs,
        rows: torch.Tensor,
        on_top_of: torch.Tensor | None = None,
        batched: bool = False,
    ) -> torch.Tensor:
        """Each row's edit (or, `batched`, all rows' in one group): a side-memory change trained for up to
        `n_iter` masked SGD steps on NLL + margin loss. Returns each row's group."""
        groups, weights = new_edit_groups(model, len(rows), on_top_of, batched)
        x, mask = model.layer_inputs(inputs, rows)
        x = x.float()  # the scores in float32 whatever the backbone's dtype, as the deltas are
        prompt_width = int((inputs.labels[rows] == IGNORE_INDEX).sum(1).max())
        x_irr, mask_irr = self.irrelevant(model, prompt_width, x.device)
        x_irr = x_irr.float()
        new = sorted(set(groups.tolist()))
        # What each new group's side memory holds before its edit: the folded part and its ancestors'.
        visible = model.visible(torch.tensor(new), len(new), x.device)
        below = torch.stack([model.delta_of(visible[i]) for i in range(len(new))])
        deltas = nn.Parameter(torch.zeros(len(new), *model.shape, device=x.device))
        model.shard_of.update({group: model.edits_in_chain(group) // self.save_freq for group in new})
        masks = torch.stack([self.shard_mask(model.shard_of[group], model.shape, x.device) for group in new])
        slot = torch.tensor([new.index(g) for g in groups.tolist()], device=x.device)
        optimizer = torch.optim.SGD([deltas], lr=self.edit_lr, weight_decay=1e-5)
        previous = float("inf")
        try:
            for _ in range(self.n_iter):
                model.training = dict(zip(new, deltas))
                nll = (model.row_nll(inputs, rows, groups) * weights.to(x.device)).sum()
                with torch.enable_grad():
                    totals = below + deltas
                    edit_scores = activation_scores(torch.einsum("nti,nio->nto", x, totals[slot]), mask)
                    irr_scores = activation_scores(
                        torch.einsum("mti,gio->gmto", x_irr, totals).flatten(0, 1), mask_irr.repeat(len(new), 1)
                    )
                    margin = sum(
                        self.margin_loss(edit_scores[slot == i], irr_scores.view(len(new), -1)[i])
                        for i in range(len(new))
                    )
                    loss = nll + margin
                if abs(loss.item() - previous) <= 1e-4 and loss.item() <= 0.02:  # EasyEdit's early stop
                    break
                previous = loss.item()
                optimizer.zero_grad()
                loss.backward()
                deltas.grad *= masks
                optimizer.step()
                with torch.no_grad():
                    deltas.copy_((below + deltas).clamp(-self.norm_constraint, self.norm_constraint) - below)
        finally:
            model.training = {}
        with torch.no_grad():
            totals = below + deltas
            scores = activation_scores(torch.einsum("nti,nio->nto", x, totals[slot]), mask)
        for i, group in enumerate(new):
            model.deltas[group] = deltas[i].detach().clone()
            model.scores[group] = float(scores[slot == i].min())
            model.edits[group] = int((slot == i).sum())
        return groups
