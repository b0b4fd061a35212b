"""Editing with an exported editor: the Python API behind `kedit edit` and `kedit eval`.

    editor = Editor.from_pretrained("checkpoints/mend-blip2-tiny-synthetic-vqa/version_0")
    backbone = editor.load_backbone("checkpoints/base/blip2-tiny-synthetic")
    edited = editor.edit(backbone, [{"prompt": "Question: Where is this object located? Short answer:",
                                     "target": "Velor", "image": "images/kepo/view0.png"}])
    edited.save_pretrained("edited-model")   # an ordinary transformers model directory
    edited.restore()                          # the original weights, bit for bit

Weight editors (MEND, FT) write the new weights into the backbone's parameters (in place: the
backbone object itself is edited), and only after every update of the call is computed and
finite, so a refused edit leaves the model as it was. SERAC leaves the weights alone: its edits go
into a memory, and the returned model routes inputs (encoded with `editor.processor(backbone)`)
to its counterfactual model or to the unchanged backbone.

Requests in one call are edited `batch_size` at a time (one batched edit per group; all at once
by default); groups, and further `edit` calls on the returned `EditedBackbone`, are sequential
edits, each starting from what the previous one left.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from PIL import Image
from tqdm.auto import tqdm

from data_modules.datasets import VQA_TEMPLATE, DataKind, PromptBuilder, load_image
from data_modules.encoding import IGNORE_INDEX, EditBatch, SubBatch, SubBatchEncoder
from data_modules.records import EditRecord
from kedit_lightning.backbones import FAMILIES, Backbone
from kedit_lightning.editors.edited_model import StepInputs
from kedit_lightning.editors.serac import MemoryEditedModel
from kedit_lightning.evaluation import HEADLINE, HOPS, EditedModel, EditMetrics, record_batches, with_weights
from kedit_lightning.export import METHODS, check_fingerprint, read_card, rebuild_module, verify_weights
from kedit_lightning.modules.editing import EditorModule, WeightEditorModule


class NonFiniteEdit(FloatingPointError):
    """An edit whose new weights are not all finite; it is refused, never applied."""


@dataclass(frozen=True)
class EditRequest:
    """One edit: after it, `prompt` (about `image`, or text-only when None) should be answered `target`.

    `image` is a PIL image or a path (relative to the `image_root` given to `Editor.edit`).
    """

    prompt: str
    target: str
    image: Image.Image | str | Path | None = None


Request = EditRequest | EditRecord | Mapping[str, Any]
"""An EditRequest; an EditRecord (its `src`, `alt`, `image`); or a dict with `prompt`, `target` and
optionally `image`, or in the public record layout (`src`, `alt`, `image`)."""


def check_finite(weights: Mapping[str, torch.Tensor], what: str, consequence: str) -> None:
    bad = [name for name, w in weights.items() if not bool(torch.isfinite(w).all())]
    if bad:
        raise NonFiniteEdit(
            f"{what} gives non-finite values in {len(bad)} edited weight(s) ({', '.join(bad[:3])}); {consequence}"
        )


def _open_image(image: Image.Image | str | Path, image_root: str | Path | None, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image_root) / image if image_root is not None else Path(image)
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"edit request {index}: cannot load image {path}: {err}") from err


def request_triple(
    request: Request, index: int, prompts: PromptBuilder, image_root: str | Path | None
) -> tuple[str, str, Image.Image | None]:
    """(prompt, target, image or None) of one request; records' `src` go through the prompt template."""
    if isinstance(request, EditRecord):
        return prompts.edit_prompt(request.src), request.alt, load_image(image_root or ".", request, "image", index)
    if isinstance(request, EditRequest):
        fields: Mapping[str, Any] = {"prompt": request.prompt, "target": request.target, "image": request.image}
    elif isinstance(request, Mapping):
        fields = {
            "prompt": prompts.edit_prompt(request["src"]) if "src" in request else request.get("prompt"),
            "target": request.get("alt", request.get("target")),
            "image": request.get("image"),
        }
    else:
        raise TypeError(
            f"edit request {index}: expected an EditRequest, EditRecord or dict, got {type(request).__name__}"
        )
    for name in ("prompt", "target"):
        if not isinstance(fields[name], str) or not fields[name].strip():
            raise ValueError(
                f"edit request {index}: field {name!r} must be a non-empty string (a dict gives prompt/target or src/alt), got {fields[name]!r}"
            )
    image = fields["image"]
    return fields["prompt"], fields["target"], None if image is None else _open_image(image, image_root, index)


def device_of(backbone: Backbone) -> torch.device:
    return next(backbone.parameters()).device


class WeightEdits:
    """Edits as new weights (MEND, FT), applied functionally: each starts from the weights the previous one left."""

    def __init__(self, module: EditorModule) -> None:
        self.module = module
        self.weights: dict[str, torch.Tensor] | None = None

    def _edited(self, sub_batch: SubBatch, what: str, consequence: str) -> dict[str, torch.Tensor]:
        with torch.enable_grad():
            weights = {name: w.detach() for name, w in self.module.edit(sub_batch, self.weights).items()}
        check_finite(weights, what, consequence)
        return weights

    def add(self, sub_batch: SubBatch, what: str, consequence: str) -> None:
        self.weights = self._edited(sub_batch, what, consequence)

    def model(self) -> EditedModel:
        return self.module.backbone if self.weights is None else with_weights(self.module.backbone, self.weights)

    def model_with(self, sub_batch: SubBatch) -> EditedModel:
        """The post-edit model with the edit of `sub_batch` on top, the edits in force left as they are."""
        return with_weights(self.module.backbone, self._edited(sub_batch, "a further edit", "evaluation stopped"))


class MemoryEdits:
    """Edits kept in SERAC's memory beside the unchanged backbone, each call's edits a group on top of the last."""

    def __init__(self, module: EditorModule) -> None:
        self.module = module
        self.memory = module.editor.edited_model(module.backbone)
        self.group = torch.tensor([-1])

    def _edit(self, sub_batch: SubBatch) -> torch.Tensor:
        """A new group holding the edits of `sub_batch`, on top of the edits in force."""
        inputs = StepInputs(self.module.backbone, {"edits": sub_batch}, prefix=False)
        rows = inputs.rows("edits")
        return self.module.editor.edit(self.memory, inputs, rows, self.group.expand(len(rows)), batched=True)[:1]

    def add(self, sub_batch: SubBatch, what: str, consequence: str) -> None:
        self.group = self._edit(sub_batch)

    def model(self) -> EditedModel:
        return MemoryRouted(self.memory, self.group)

    def model_with(self, sub_batch: SubBatch) -> EditedModel:
        """The post-edit model with the edit of `sub_batch` on top, the edits in force left as they are."""
        return MemoryRouted(self.memory, self._edit(sub_batch))


class MemoryRouted:
    """sub-batch -> logits aligned with its labels: the backbone's, its answer positions answered by
    `memory` under `group` (until the editing API moves onto answer logits)."""

    def __init__(self, memory: MemoryEditedModel, group: torch.Tensor) -> None:
        self.memory = memory
        self.group = group

    @torch.no_grad()
    def __call__(self, sub_batch: SubBatch) -> torch.Tensor:
        backbone = self.memory.backbone
        logits = backbone(sub_batch).clone()
        inputs = StepInputs(backbone, {"queries": sub_batch})
        rows = inputs.rows("queries")
        answers = self.memory.answer_logits(inputs, rows, self.group.expand(len(rows)))
        logits[sub_batch["labels"] != IGNORE_INDEX] = answers.to(logits.dtype)
        return logits


EditState = WeightEdits | MemoryEdits


class EditedBackbone:
    """What `Editor.edit` returns: the post-edit model; `restore()` gives back the original exactly.

    Weight edits are written into `backbone` itself; `original` is a copy of its edited weights
    when this object was made. Memory edits (SERAC) live in `memory`; the weights never change.
    """

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.original = {name: p.detach().clone() for name, p in backbone.editable_parameters().items()}
        self.memory: MemoryEdits | None = None
        self.n_edits = 0

    def __call__(self, sub_batch: SubBatch) -> torch.Tensor:
        return self.backbone(sub_batch) if self.memory is None else self.memory.model()(sub_batch)

    def write(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy `weights` into the backbone's edited parameters of the same names."""
        params = self.backbone.editable_parameters()
        unknown = set(weights) - set(params)
        if unknown:
            raise KeyError(f"the edit returned weights the backbone does not edit: {sorted(unknown)}")
        with torch.no_grad():
            for name, w in weights.items():
                params[name].copy_(w)

    def restore(self) -> Backbone:
        """Put back the original weights, forget memory edits, and return the backbone (which can be edited again)."""
        self.write(self.original)
        self.memory = None
        self.n_edits = 0
        return self.backbone

    def save_pretrained(self, path: str | Path) -> None:
        """An ordinary transformers model directory (model, tokenizer, image processor) of the edited model."""
        if self.memory is not None:
            raise TypeError(
                "SERAC's edits live in a memory beside the unchanged base model (a classifier routes inputs to a counterfactual "
                "model), so there are no edited weights to save as a transformers directory; keep the editor artifact and the edits"
            )
        self.backbone.save_pretrained(path)


class Editor:
    """An exported editor, ready to apply: `Editor.from_pretrained(dir)` for any method in `METHODS`.

    The weights are verified when loading; the editor itself is rebuilt for each backbone it is
    given (after checking the backbone's fingerprint), as the method's training module builds it.
    """

    def __init__(self, card: Mapping[str, Any], path: str | Path) -> None:
        self.card = dict(card)
        self.method = card["method"]
        self.path = str(path)
        self._module: EditorModule | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Editor:
        card = read_card(path)
        verify_weights(path, card)
        return cls(card, path)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The backbone this editor was trained on: family, config hash, edited names and shapes."""
        return self.card["backbone_fingerprint"]

    @property
    def metrics(self) -> dict[str, Any]:
        """Validation metrics recorded at export."""
        return self.card.get("metrics", {})

    @property
    def edits_weights(self) -> bool:
        """True when edits become new weights (saveable as a transformers model); False for memory editors."""
        return issubclass(METHODS[self.method], WeightEditorModule)

    def load_backbone(self, source: str, dtype: str | None = None, device: str | torch.device = "cpu") -> Backbone:
        """The backbone family this editor was trained on, from a hub id or directory, checked against the fingerprint."""
        family = self.fingerprint["family"]
        if family not in FAMILIES:
            raise ValueError(f"{self.path}: backbone family {family!r} is not one of {sorted(FAMILIES)}")
        dtype = dtype or self.card["hyper_parameters"].get("backbone", {}).get("dtype", "float32")
        backbone = FAMILIES[family].from_pretrained(
            source, edit_params=list(self.fingerprint["edit_params"]), dtype=getattr(torch, dtype)
        )
        backbone = backbone.to(device).eval()
        self.attach(backbone)
        return backbone

    def attach(self, backbone: Backbone) -> EditorModule:
        """The editor rebuilt for `backbone` (kept until another backbone is given); refuses another fingerprint."""
        if self._module is None or self._module.backbone is not backbone:
            check_fingerprint(self.fingerprint, backbone.fingerprint(), f"the editor in {self.path}")
            self._module = rebuild_module(self.card, self.path, backbone)
        return self._module

    def processor(self, backbone: Backbone) -> SubBatchEncoder:
        """What edit data is tokenized with: the backbone's processor, or SERAC's, which adds its own tokens."""
        return self.attach(backbone).input_processor()

    def start(self, backbone: Backbone) -> EditState:
        """An empty sequence of edits on `backbone`; `add` edits to it, `model()` is the post-edit model."""
        module = self.attach(backbone)
        return WeightEdits(module) if isinstance(module, WeightEditorModule) else MemoryEdits(module)

    def encode(
        self,
        backbone: Backbone,
        requests: Sequence[Request],
        batch_size: int | None = None,
        image_root: str | Path | None = None,
        kind: DataKind = "vqa",
        vqa_template: str = VQA_TEMPLATE,
    ) -> list[SubBatch]:
        """Requests as edit sub-batches of `batch_size` (None: one), tokenized with `processor(backbone)`, on its device."""
        prompts = PromptBuilder(kind, vqa_template)
        triples = [request_triple(r, i, prompts, image_root) for i, r in enumerate(requests)]
        if not triples:
            raise ValueError("no edit requests given")
        encode, size = self.processor(backbone), batch_size or len(triples)
        groups = []
        for start in range(0, len(triples), size):
            group = triples[start : start + size]
            with_image = [t[2] is not None for t in group]
            if any(with_image) != all(with_image):
                raise ValueError(
                    f"edit requests {start}..{start + len(group) - 1}: a batched edit needs images for all requests or for none"
                )
            images = [t[2] for t in group] if all(with_image) else None
            groups.append(
                move_data_to_device(encode([t[0] for t in group], [t[1] for t in group], images), device_of(backbone))
            )
        return groups

    def edit(
        self,
        backbone: Backbone | EditedBackbone,
        requests: Sequence[Request],
        batch_size: int | None = None,
        image_root: str | Path | None = None,
        kind: DataKind = "vqa",
        vqa_template: str = VQA_TEMPLATE,
    ) -> EditedBackbone:
        """Apply `requests` (batched `batch_size` at a time, the groups in sequence); the post-edit model.

        Pass the returned `EditedBackbone` back in to keep editing sequentially with the same `restore()` point.
        Raises `NonFiniteEdit` (the backbone unchanged) when any weight update is not finite.
        """
        edited = backbone if isinstance(backbone, EditedBackbone) else EditedBackbone(backbone)
        groups = self.encode(edited.backbone, requests, batch_size, image_root, kind, vqa_template)
        state = edited.memory if edited.memory is not None else self.start(edited.backbone)
        for number, sub_batch in enumerate(groups, start=1):
            state.add(sub_batch, f"edit group {number} of {len(groups)}", "refused, the backbone is unchanged")
        if isinstance(state, WeightEdits):
            edited.write(state.weights)
        else:
            edited.memory = state
        edited.n_edits += len(requests)
        return edited


def _records(loader: Iterable[EditBatch], device: torch.device, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The one-record EditBatches of `loader` (the first `limit`), on `device`."""
    seen = 0
    for batch in loader:
        for record in record_batches(move_data_to_device(batch, device)):
            if seen == limit:
                return
            seen += 1
            yield record


def _origin(record: Mapping[str, Any], position: int) -> str:
    return record["meta"][0]["origin"] if "meta" in record else f"record {position}"


def score_records(
    backbone: Backbone, records: Iterable[Mapping[str, Any]], state: EditState, hops: Sequence[str] = HOPS
) -> dict[str, Any]:
    """The edit report of `records`, all scored on the post-edit model of `state` (one-hop edits go on top of it)."""
    metrics = EditMetrics(hops).to(device_of(backbone))
    for record in records:
        metrics.update(backbone, record, state.model(), state.model_with)
    return metrics.compute()


def evaluate(
    editor: Editor, backbone: Backbone, loader: Iterable[EditBatch], hops: Sequence[str] = HOPS, progress: bool = True
) -> dict[str, Any]:
    """Edit each record on its own, from the unedited model, and score it: what validation reports."""
    metrics = EditMetrics(hops).to(device_of(backbone))
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    for position, record in enumerate(
        tqdm(_records(loader, device_of(backbone)), total=total, desc="editing", disable=not progress)
    ):
        state = editor.start(backbone)
        state.add(record["edit_inner"], f"the edit of {_origin(record, position)}", "evaluation stopped")
        metrics.update(backbone, record, state.model(), state.model_with)
    return metrics.compute()


def curve_points(n_edits: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... below `n_edits`, then `n_edits`."""
    points, scale = [], 1
    while scale < n_edits:
        points += [k * scale for k in (1, 2, 5) if k * scale < n_edits]
        scale *= 10
    return points + [n_edits]


def evaluate_sequential(
    editor: Editor,
    backbone: Backbone,
    loader: Iterable[EditBatch],
    n_edits: int,
    hops: Sequence[str] = HOPS,
    probe: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """Edit the first `n_edits` records one after another, each on top of the previous edits.

    At 1, 2, 5, 10, ... edits the first `probe` records edited so far are scored (how Reliability
    of the earliest edits and Locality hold up as edits accumulate: `sequential.curve`). The
    report itself scores all `n_edits` records on the final post-edit model. `loader` is iterated twice.
    """
    device = device_of(backbone)
    marks = set(curve_points(n_edits))
    state, earliest, curve, done = editor.start(backbone), [], [], 0
    with tqdm(total=n_edits, desc="sequential edits", disable=not progress) as bar:
        for record in _records(loader, device, n_edits):
            state.add(record["edit_inner"], f"sequential edit {done + 1} ({_origin(record, done)})", "stopped")
            done += 1
            if len(earliest) < probe:
                earliest.append(record)
            if done in marks:
                report = score_records(backbone, earliest, state, hops)
                curve.append({"n_edits": done, **{key: report[key] for key in HEADLINE}})
            bar.update()
    if done < n_edits:
        raise ValueError(f"{n_edits} sequential edits asked for, but the data has only {done} records")
    final = score_records(
        backbone,
        tqdm(_records(loader, device, n_edits), total=n_edits, desc="scoring", disable=not progress),
        state,
        hops,
    )
    return {**final, "sequential": {"probe_edits": len(earliest), "curve": curve}}
