"""The straightforward path, kept as the oracle the fast one must agree with.

Each record is edited alone, from the unedited weights, with full-depth forwards: the edit loss's
gradient rows are captured with hooks on the edited layers, MEND's transform (or the plain gradient)
gives dense edited weights, and every sub-batch runs through the whole model with them
(`Backbone.forward(sub_batch, params)`, torch.func.functional_call). Nothing is shared between
records or phases. `kedit_lightning.editors.edited_model` must give the same losses, editor
gradients and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from data_modules.encoding import IGNORE_INDEX, SUB_BATCH_KEYS, SubBatch
from kedit_lightning.backbones.base import Backbone
from kedit_lightning.editors.edited_model import edited_module
from kedit_lightning.editors.ft import FineTune
from kedit_lightning.editors.losses import masked_kl, masked_nll
from kedit_lightning.editors.mend import MEND
from kedit_lightning.editors.tuning import FTL, LoRA
from kedit_lightning.evaluation import EditMetrics, record_batches

Weights = dict[str, torch.Tensor]


def run_with(backbone: Backbone, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """The whole model's logits (aligned with labels) with `params` standing in for the named weights."""
    if not params:
        return backbone(sub_batch)
    return functional_call(backbone, {f"model.{name}": value for name, value in params.items()}, (sub_batch,))


def answers(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full [B, T, V] logits -> [P, V] at the answer positions, as the fast path computes them."""
    return logits[labels != IGNORE_INDEX]


def capture_factors(
    backbone: Backbone, sub_batch: SubBatch, params: Mapping[str, torch.Tensor], names: Sequence[str] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rows (x, delta) of the edit loss's gradient at each weight in `names` (default: all of `params`),
    the model run with `params`."""
    names = list(params) if names is None else list(names)
    modules = {name: edited_module(backbone, name) for name in names}
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
            loss = masked_nll(answers(run_with(backbone, sub_batch, leaves), sub_batch["labels"]), sub_batch["labels"])
            flat = [out for name in names for out in outputs[name]]
            grads = iter(torch.autograd.grad(loss, flat, allow_unused=True, materialize_grads=True))
    finally:
        for handle in handles:
            handle.remove()
    factors = {}
    for name in names:
        w = params[name]
        in_dim, out_dim = (w.shape[1], w.shape[0]) if isinstance(modules[name], nn.Linear) else tuple(w.shape)
        x = torch.cat([a.reshape(-1, in_dim) for a in inputs[name]])
        delta = torch.cat([next(grads).reshape(-1, out_dim) for _ in outputs[name]])
        keep = (x != 0).any(-1) & (delta != 0).any(-1)
        factors[name] = (x[keep], delta[keep])
    return factors


def edit_gradients(
    backbone: Backbone, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None = None
) -> Weights:
    """Plain autograd gradient of the edit loss w.r.t. the edited weights."""
    weights = {**backbone.editable_parameters(), **(params or {})}
    leaves = {name: w.detach().requires_grad_() for name, w in weights.items()}
    with torch.enable_grad():
        loss = masked_nll(answers(run_with(backbone, sub_batch, leaves), sub_batch["labels"]), sub_batch["labels"])
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, grads))


def _current(backbone: Backbone, params: Mapping[str, torch.Tensor] | None) -> Weights:
    return {n: (params[n] if params and n in params else p.detach()) for n, p in backbone.editable_parameters().items()}


def mend_weights(
    editor: MEND, backbone: Backbone, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None = None
) -> Weights:
    """MEND's dense edited weights for the (batched) edit `sub_batch`, on top of `params`."""
    weights = _current(backbone, params)
    factors = capture_factors(backbone, sub_batch, weights, editor.param_names)
    edited = {}
    for i, name in enumerate(editor.param_names):
        key, mode = editor.route[name]
        x, delta = editor.transforms[key](*factors[name], mode)
        update = (editor.edit_lrs[i] * delta.float()).T @ x.float()
        if isinstance(edited_module(backbone, name), Conv1D):
            update = update.T
        edited[name] = weights[name] - update.to(weights[name].dtype)
    return edited


def ft_weights(
    ft: FineTune, backbone: Backbone, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None = None
) -> Weights:
    current = _current(backbone, params)
    for _ in range(ft.steps):
        grads = edit_gradients(backbone, sub_batch, current)
        current = {n: (w - ft.lr * grads[n]).detach() for n, w in current.items()}
    return current


def objective_nll(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """[B] per row: mean NLL of its answer tokens, read where they are (target_new) or all at the first
    answer position, the last prompt token's prediction (prompt_last); `logits` [B, T, V] aligned with labels."""
    losses = []
    for b in range(labels.shape[0]):
        positions = (labels[b] != IGNORE_INDEX).nonzero().flatten()
        read = positions[:1].expand(len(positions)) if objective == "prompt_last" else positions
        log_probs = torch.log_softmax(logits[b, read].float(), -1)
        losses.append(-log_probs[torch.arange(len(positions)), labels[b, positions]].mean())
    return torch.stack(losses)


def optimized_weights(
    editor: FTL | LoRA, backbone: Backbone, sub_batch: SubBatch, params: Mapping[str, torch.Tensor] | None = None
) -> Weights:
    """FT-L's / LoRA's dense edited weights for the (batched) edit `sub_batch`: Adam on dense weights through
    the whole model, stopping when the mean loss is under `stop_loss`; FT-L clamped after every step."""
    current = _current(backbone, params)
    trainable: dict[str, list[torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(getattr(editor, "seed", 0))  # LoRA's A: drawn from its own seed
    for name, w in current.items():
        out, inp = w.T.shape if isinstance(edited_module(backbone, name), Conv1D) else w.shape
        if isinstance(editor, LoRA):
            a = torch.empty(editor.rank, inp)
            nn.init.kaiming_uniform_(a, a=5**0.5, generator=generator)
            trainable[name] = [torch.zeros(out, editor.rank, requires_grad=True), a.requires_grad_()]
        else:
            trainable[name] = [torch.zeros(out, inp, requires_grad=True)]

    def weights() -> Weights:
        edited = {}
        for name, w in current.items():
            tensors = trainable[name]
            change = editor.alpha / editor.rank * tensors[0] @ tensors[1] if isinstance(editor, LoRA) else tensors[0]
            edited[name] = w + (change.T if isinstance(edited_module(backbone, name), Conv1D) else change)
        return edited

    optimizer = torch.optim.Adam([t for tensors in trainable.values() for t in tensors], lr=editor.lr)
    with torch.enable_grad():
        for _ in range(editor.steps):
            logits = run_with(backbone, sub_batch, weights())
            loss = objective_nll(logits, sub_batch["labels"], editor.objective).mean()
            if loss < editor.stop_loss:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if isinstance(editor, FTL) and editor.norm_constraint is not None:
                with torch.no_grad():
                    for (change,) in trainable.values():
                        change.clamp_(-editor.norm_constraint, editor.norm_constraint)
    return {name: w.detach() for name, w in weights().items()}


def dense_edit(editor: nn.Module, backbone: Backbone, sub_batch: SubBatch, params: Weights | None = None) -> Weights:
    if isinstance(editor, (FTL, LoRA)):
        return optimized_weights(editor, backbone, sub_batch, params)
    return (mend_weights if isinstance(editor, MEND) else ft_weights)(editor, backbone, sub_batch, params)


def mend_step_losses(editor: MEND, backbone: Backbone, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The outer loss's parts as the per-record loop computes them (seven full forwards per record)."""
    parts: dict[str, list[torch.Tensor]] = {"edit": [], "image_edit": [], "loc": []}
    for record in record_batches(batch):
        params = mend_weights(editor, backbone, record["edit_inner"])

        def post(key: str, record: dict = record, params: dict = params) -> torch.Tensor:
            return answers(run_with(backbone, record[key], params), record[key]["labels"])

        with torch.no_grad():
            pre = {key: answers(backbone(record[key]), record[key]["labels"]) for key in ("loc", "loc_image")}
        parts["edit"].append(masked_nll(post("edit_outer"), record["edit_outer"]["labels"]))
        parts["image_edit"].append(masked_nll(post("edit_outer_image"), record["edit_outer_image"]["labels"]))
        parts["loc"].append(sum(masked_kl(pre[k], post(k), record[k]["labels"]) for k in ("loc", "loc_image")))
    return {key: torch.stack(values).mean() for key, values in parts.items()}


def evaluate_batch(editor: nn.Module, backbone: Backbone, batch: Mapping[str, Any], metrics: EditMetrics) -> None:
    """Each record alone: edit, then every sub-batch through the whole model with the dense weights."""
    for record in record_batches(batch):
        with torch.enable_grad():
            params = {k: v.detach() for k, v in dense_edit(editor, backbone, record["edit_inner"]).items()}
        with torch.no_grad():
            labels = {key: record[key]["labels"] for key in SUB_BATCH_KEYS}
            post = {key: answers(run_with(backbone, record[key], params), labels[key]) for key in SUB_BATCH_KEYS}
            pre = {key: answers(backbone(record[key]), labels[key]) for key in ("loc", "loc_image")}
            hops = ()
            if "port" in record:
                further = dict(zip(record.get("port_edit_row", torch.zeros(0)).tolist(), range(10**6)))
                logits = []
                for row in range(record["port"]["input_ids"].shape[0]):
                    weights = params
                    if row in further:
                        edit = {
                            k: (v[further[row] : further[row] + 1] if isinstance(v, torch.Tensor) else v)
                            for k, v in record["port_edit"].items()
                        }
                        with torch.enable_grad():
                            weights = {k: v.detach() for k, v in dense_edit(editor, backbone, edit, params).items()}
                    one = {
                        k: (v[row : row + 1] if isinstance(v, torch.Tensor) else v) for k, v in record["port"].items()
                    }
                    logits.append(answers(run_with(backbone, one, weights), one["labels"]))
                post["port"], labels["port"], hops = torch.cat(logits), record["port"]["labels"], record["port_hops"]
        metrics.update(labels, post, pre, hops)


@torch.no_grad()
def greedy_tokens(
    backbone: Backbone, sub_batch: SubBatch, max_new_tokens: int, params: Mapping[str, torch.Tensor] | None = None
) -> list[int]:
    """A one-row sub-batch's greedy continuation of its prompt (the tokens before its answer), one full forward
    per token with `params` written into the named weights for the duration; cut at the end-of-sequence token."""
    start = int((sub_batch["labels"][0] != IGNORE_INDEX).nonzero()[0])
    ids = sub_batch["input_ids"][:, :start]
    current = backbone.editable_parameters()
    saved = {name: current[name].detach().clone() for name in params or {}}
    try:
        for name, value in (params or {}).items():
            current[name].copy_(value)
        for _ in range(max_new_tokens):
            logits = backbone.model_logits(ids, torch.ones_like(ids), sub_batch.get("pixel_values"))[:, -1]
            if backbone.image_token_id is not None and backbone.image_token_id < logits.shape[-1]:
                logits[:, backbone.image_token_id] = float("-inf")  # a placeholder is never generated
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    finally:
        for name, value in saved.items():
            current[name].copy_(value)
    new = ids[0, start:].tolist()
    eos = backbone.processor.tokenizer.eos_token_id
    return new[: new.index(eos)] if eos in new else new
