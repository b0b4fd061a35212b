"""Edits held at one layer beside the unchanged backbone: the edited model of GRACE and WISE.

Both lifelong editors attach to a single Linear of the language model (by default the last of the
backbone's edited weights: the FFN output matrix of the top edited layer) and change what it
returns through a forward hook, never its weight. `LayerMemoryModel` gives them the edit-group
semantics of every edited model (see edited_model.py): each input row sees the edits of its
group's chain and of every folded group; `fold` puts all groups in force for every row,
`unedited` hides them all for the duration, `drop_after` forgets the groups opened since a mark.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kedit_lightning.backbones.base import Backbone, answer_read_mask
from kedit_lightning.editors.edited_model import EditGroups, StepInputs, edited_module
from kedit_lightning.editors.losses import per_example_nll


def memory_weight_name(backbone: Backbone, weight: str | None) -> str:
    """The edited weight a one-layer editor attaches to: `weight`, one of the backbone's edited
    parameters, or by default the last of them (the specs list the FFN output matrix of the top layer last)."""
    if weight is None:
        return backbone.edit_param_names[-1]
    if weight not in backbone.edit_param_names:
        raise ValueError(
            f"weight {weight!r} is not one of the backbone's edited parameters ({', '.join(backbone.edit_param_names)})"
        )
    return weight


def key_positions(labels: torch.Tensor) -> torch.Tensor:
    """[N]: each row's last prompt token (the position that predicts its first answer token)."""
    return answer_read_mask(labels).int().argmax(1)


@dataclass
class HookRows:
    """What a layer hook knows of the rows it transforms: labels and attention mask at the bucket's width,
    which groups each row sees ([N, G] bool), and whether the rows are being edited (trained)."""

    labels: torch.Tensor
    mask: torch.Tensor
    visible: torch.Tensor
    editing: bool


class LayerMemoryModel(EditGroups, ABC):
    """A backbone whose `weight` Linear (or Conv1D) output is changed by edits held in groups.

    Subclasses implement `transform(x, output, rows)` (x [N, T, in], output [N, T, out]) and keep their
    per-group state; `drop_groups(mark)` and `fold_groups()` update it.
    """

    def __init__(self, backbone: Backbone, weight: str | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = memory_weight_name(backbone, weight)
        self.module: nn.Module = edited_module(backbone, self.name)
        self.folded = 0  # groups below this are in force for every row
        self.hidden = False  # inside `unedited`

    # -- per subclass ------------------------------------------------------------------------
    @abstractmethod
    def transform(self, x: torch.Tensor, output: torch.Tensor, rows: HookRows) -> torch.Tensor:
        """The layer's output for these rows, given its input."""

    @abstractmethod
    def has_edits(self) -> bool: ...

    @abstractmethod
    def drop_groups(self, mark: int) -> None:
        """Forget the state of the groups from `mark` on."""

    def fold_groups(self) -> None:
        """Called by `fold` before the groups so far become folded."""

    # -- groups ------------------------------------------------------------------------------
    def visible(self, groups: torch.Tensor | None, n_rows: int, device: torch.device) -> torch.Tensor:
        """[N, G] bool: the groups whose edits each row sees (its chain and the folded ones; none when hidden)."""
        visible = torch.zeros(n_rows, len(self.parents) + 1, dtype=torch.bool)
        if not self.hidden:
            visible[:, : self.folded] = True
            if groups is not None:
                chains = self.chains(groups.cpu())
                chains = torch.where(chains < 0, len(self.parents), chains)
                visible.scatter_(1, chains, True)
        return visible[:, :-1].to(device)

    @contextmanager
    def hooked(
        self, inputs: StepInputs, rows: torch.Tensor, groups: torch.Tensor | None, editing: bool = False
    ) -> Iterator[None]:
        """The layer's hook for one bucket's `rows` (in the bucket's order), each under its group."""
        if not self.has_edits() and not editing:
            yield
            return
        visible = self.visible(groups, len(rows), rows.device)

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            n = len(rows)
            x = args[0].reshape(n, -1, args[0].shape[-1])  # OPT's layers run their MLP on [N * T, H]
            width = x.shape[1]
            labels, mask = inputs.labels[rows, :width], inputs.fields["attention_mask"][rows, :width]
            out = self.transform(x, output.reshape(n, width, -1), HookRows(labels, mask, visible, editing))
            return out.reshape(output.shape)

        handle = self.module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _around(
        self, inputs: StepInputs, rows: torch.Tensor, groups: torch.Tensor | None, editing: bool = False
    ) -> Callable[[torch.Tensor], Any]:
        def around(positions: torch.Tensor) -> Any:
            return self.hooked(inputs, rows[positions], None if groups is None else groups[positions.cpu()], editing)

        return around

    def answer_logits(self, inputs: StepInputs, rows: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """[P, V] logits at the answer positions of `rows` (row-major), each row under its group (None: -1)."""
        return inputs.answer_logits(self.backbone, rows, self._around(inputs, rows, groups))

    def row_nll(self, inputs: StepInputs, rows: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """[N]: each row's mean answer NLL under its group, with gradients into what is being edited."""
        with torch.enable_grad():
            logits = inputs.answer_logits(self.backbone, rows, self._around(inputs, rows, groups, editing=True))
            return per_example_nll(logits, inputs.labels[rows])

    @torch.no_grad()
    def layer_inputs(self, inputs: StepInputs, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [N, T, in], attention mask [N, T]): the edited layer's inputs for `rows`, which no edit at
        this layer changes, zero-padded to the widest bucket."""
        parts, seen = [], []
        for positions, state, labels in inputs.states(rows):
            handle = self.module.register_forward_hook(lambda module, args, output: seen.append(args[0]))
            try:
                self.backbone.resume(state, answer_read_mask(labels))
            finally:
                handle.remove()
            width = labels.shape[1]
            parts.append((positions, seen.pop().reshape(len(positions), width, -1), width))
        width = max(part[2] for part in parts)
        x = parts[0][1].new_zeros(len(rows), width, parts[0][1].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=x.device)
        for positions, part, part_width in parts:
            x[positions, :part_width] = part
            mask[positions, :part_width] = inputs.fields["attention_mask"][rows[positions], :part_width].bool()
        return x, mask

    # -- edits in force for good ---------------------------------------------------------------
    def fold(self) -> None:
        """Every group so far in force for every row (the weights never change)."""
        self.fold_groups()
        self.folded = len(self.parents)

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """No edit seen by any row, for the duration."""
        self.hidden = True
        try:
            yield
        finally:
            self.hidden = False

    def drop_after(self, mark: int) -> None:
        """Forget the groups opened since `mark` (folded groups stay folded only below it)."""
        if mark < self.folded:
            raise ValueError(f"groups up to {self.folded} are folded; cannot drop back to {mark}")
        del self.parents[mark:]
        self.drop_groups(mark)

    def restore(self) -> None:
        """No edits at all: the unedited backbone."""
        self.folded = 0
        self.drop_after(0)
