"""Editing with an exported editor: the Python API behind `kedit edit` and `kedit eval`.

    editor = Editor.from_pretrained("runs/mend-blip2-tiny-synthetic-vqa/version_0/editor")
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

The editor is rebuilt from the artifact alone (`artifact.py`); nothing here imports Lightning.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from data_modules.datasets import VQA_TEMPLATE, DataKind, PromptBuilder, load_image
from data_modules.encoding import EditBatch, SubBatch, SubBatchEncoder
from data_modules.records import EditRecord
from data_modules.text_records import TextRecord
from kedit_lightning.artifact import check_fingerprint, read_card, read_processor, rebuild_editor, verify_weights
from kedit_lightning.backbones import FAMILIES, Backbone
from kedit_lightning.editors.edited_model import StepInputs, WeightEditedModel, WeightEditor
from kedit_lightning.evaluation import (
    HOPS,
    LOCALITY_KEYS,
    LOCALITY_OF,
    NEIGHBOR,
    EditMetrics,
    Protocol,
    evaluate_batch,
    headline,
    record_batches,
    sub_batch_rows,
)
from kedit_lightning.generation import GenerationMetrics


class NonFiniteEdit(FloatingPointError):
    """An edit whose new weights are not all finite; it is refused, never applied."""


class WreckedModel(ValueError):
    """An edited model whose weight norms moved past the bound; it is not saved."""


MAX_NORM_RATIO = 2.0  # an edited weight's norm more than twice (or under half) the original's: a wrecked model


@dataclass(frozen=True)
class EditRequest:
    """One edit: after it, `prompt` (about `image`, or text-only when None) should be answered `target`.

    `image` is a PIL image or a path (relative to the `image_root` given to `Editor.edit`).
    """

    prompt: str
    target: str
    image: Image.Image | str | Path | None = None


Request = EditRequest | EditRecord | TextRecord | Mapping[str, Any]
"""An EditRequest; an EditRecord (its `src`, `alt`, `image`); a TextRecord (its `src`, `alt`, no image);
or a dict with `prompt`, `target` and optionally `image`, or in the public record layout (`src`, `alt`, `image`)."""


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
    if isinstance(request, TextRecord):
        return request.src, request.alt, None  # text prompts are used as they are, with no VQA template
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
                f"edit request {index}: field {name!r} must be a non-empty string (a dict gives prompt/target or "
                f"src/alt), got {fields[name]!r}"
            )
    image = fields["image"]
    return fields["prompt"], fields["target"], None if image is None else _open_image(image, image_root, index)


def device_of(backbone: Backbone) -> torch.device:
    return next(backbone.parameters()).device


def to_device(data: Any, device: torch.device) -> Any:
    """`data` with every tensor in it (nested in dicts and lists) on `device`."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, Mapping):
        return {key: to_device(value, device) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(to_device(value, device) for value in data)
    return data


class EditSession:
    """Edits in force on a backbone, one batched edit at a time, each on top of those before.

    Weight edits (MEND, FT) are folded into the backbone's weights as they come (`WeightEditedModel.fold`:
    only finite ones); SERAC's stay in its memory. `model` with `head` answers with every edit in force,
    `model.unedited()` gives the original model for the duration, `restore()` ends it all.
    """

    def __init__(self, editor: nn.Module, backbone: Backbone) -> None:
        self.editor = editor
        self.backbone = backbone
        self.model = editor.edited_model(backbone)
        self.head = -1  # the latest edit's group: its chain is every edit in force
        self.n_edits = 0

    def add(self, sub_batch: SubBatch, what: str, consequence: str) -> None:
        """One batched edit (every row of `sub_batch`) on top of the edits in force."""
        inputs = StepInputs(self.backbone, {"edit": sub_batch})
        rows = inputs.rows("edit")
        mark = self.model.mark()
        group = self.editor(self.model, inputs, rows, on_top_of=torch.full((len(rows),), self.head), batched=True)
        try:
            self.model.fold()
        except FloatingPointError as err:
            self.model.drop_after(mark)
            raise NonFiniteEdit(f"{what} gives {err}; {consequence}") from err
        self.head = int(group[0])
        self.n_edits += len(rows)

    def __call__(self, model: Any, inputs: StepInputs, rows: torch.Tensor, on_top_of: torch.Tensor | None = None):
        """As an editor for `evaluate_batch`: a record's "edit" is the edits in force; a further (one-hop)
        edit is a real one on top of them (dropped again by `scoring`)."""
        if on_top_of is None:
            return torch.full((len(rows),), self.head)
        return self.editor(model, inputs, rows, on_top_of=on_top_of)

    def edited_model(self, backbone: Backbone) -> Any:
        return self.model

    def restore(self) -> None:
        self.model.restore()
        self.head = -1
        self.n_edits = 0


class EditedBackbone:
    """What `Editor.edit` returns: the post-edit model; `restore()` gives back the original exactly.

    Weight edits are written into `backbone` itself; memory edits (SERAC, GRACE, WISE) live in the session's
    memory and the weights never change.
    """

    def __init__(self, session: EditSession) -> None:
        self.session = session
        self.backbone = session.backbone

    @property
    def n_edits(self) -> int:
        return self.session.n_edits

    @property
    def edits_weights(self) -> bool:
        return isinstance(self.session.model, WeightEditedModel)

    def answer_logits(self, sub_batch: SubBatch) -> torch.Tensor:
        """[P, V] logits at the answer positions of `sub_batch`, with every edit in force."""
        inputs = StepInputs(self.backbone, {"query": sub_batch})
        rows = inputs.rows("query")
        with torch.no_grad():
            return self.session.model.answer_logits(inputs, rows, torch.full((len(rows),), self.session.head))

    def restore(self) -> Backbone:
        """Put back the original weights, forget memory edits, and return the backbone (which can be edited again)."""
        self.session.restore()
        return self.backbone

    def norm_ratios(self) -> dict[str, tuple[float, float]]:
        """Each edited weight's (original norm, current norm); equal before any edit and for memory edits."""
        original = self.session.model.original if self.edits_weights else None
        ratios = {}
        for name, weight in self.backbone.editable_parameters().items():
            now = weight.detach().float().norm().item()
            ratios[name] = (now if original is None else original[name].float().norm().item(), now)
        return ratios

    def save_pretrained(self, path: str | Path, max_norm_ratio: float | None = MAX_NORM_RATIO) -> None:
        """An ordinary transformers model directory (model, tokenizer, image processor) of the edited model.

        Refused (`WreckedModel`, nothing written) when an edited weight's norm grew or shrank by more than
        `max_norm_ratio` times; None saves whatever the edits did.
        """
        if not self.edits_weights:
            raise TypeError(
                f"{type(self.session.editor).__name__}'s edits live in a memory beside the unchanged base model "
                "(SERAC: a counterfactual model; GRACE, WISE: a codebook or side memory at one layer), so there are "
                "no edited weights to save as a transformers directory; keep the editor and the edits"
            )
        if max_norm_ratio is not None:
            name, (before, after) = max(self.norm_ratios().items(), key=lambda item: norm_factor(*item[1]))
            if norm_factor(before, after) > max_norm_ratio:
                raise WreckedModel(
                    f"{path}: not saved: the {self.n_edits} edits changed the norm of {name} by "
                    f"x{after / before:.3g} ({before:.4g} -> {after:.4g}), beyond the bound x{max_norm_ratio:g} "
                    "(force it with max_norm_ratio=None, or kedit edit --force)"
                )
        self.backbone.save_pretrained(path)


def norm_factor(before: float, after: float) -> float:
    """How many times a norm grew or shrank (>= 1); infinite when one side is zero and the other not."""
    if before == after:
        return 1.0
    low, high = sorted((before, after))
    return high / low if low > 0 else float("inf")


class Editor:
    """An exported editor, ready to apply: `Editor.from_pretrained(dir)` for any method in `EDITORS`.

    Holds the plain editor (an nn.Module rebuilt from the verified artifact alone, in eval mode and
    frozen) and, once given a backbone whose fingerprint matches, that backbone and the input
    processor edit data is tokenized with.
    """

    def __init__(self, card: Mapping[str, Any], path: str | Path, editor: nn.Module) -> None:
        self.card = dict(card)
        self.method = card["method"]
        self.path = str(path)
        self.editor = editor
        self.backbone: Backbone | None = None
        self.input_processor: SubBatchEncoder | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Editor:
        # Absolute: SERAC's tokenizers are read from the artifact later, whatever the working directory is then.
        path = Path(path).absolute()
        card = read_card(path)
        verify_weights(path, card)
        return cls(card, path, rebuild_editor(card, path))

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
        return isinstance(self.editor, WeightEditor)

    def load_backbone(
        self,
        source: str,
        dtype: str | None = None,
        device: str | torch.device = "cpu",
        allow_other_weights: bool = False,
    ) -> Backbone:
        """The backbone family this editor was trained on, from a hub id or directory, checked against
        the fingerprint (see `attach` for `allow_other_weights`)."""
        family = self.fingerprint["family"]
        if family not in FAMILIES:
            raise ValueError(f"{self.path}: backbone family {family!r} is not one of {sorted(FAMILIES)}")
        dtype = dtype or self.card["hyper_parameters"].get("backbone", {}).get("dtype", "float32")
        backbone = FAMILIES[family].from_pretrained(
            source, edit_params=list(self.fingerprint["edit_params"]), dtype=getattr(torch, dtype)
        )
        backbone = backbone.to(device).eval()
        self.attach(backbone, allow_other_weights=allow_other_weights)
        return backbone

    def attach(self, backbone: Backbone, allow_other_weights: bool = False) -> nn.Module:
        """The editor, set to edit `backbone` (until another is given), on its device.

        Refuses another architecture, and other values of the edited weights than the base it was
        trained on unless `allow_other_weights` (e.g. a further fine-tuned copy of that base).
        """
        if self.backbone is not backbone:
            check_fingerprint(
                self.fingerprint, backbone.fingerprint(), f"the editor in {self.path}", allow_other_weights
            )
            self.input_processor = read_processor(self.path, self.editor, backbone)
            self.editor.to(device_of(backbone))
            self.backbone = backbone
        return self.editor

    def processor(self, backbone: Backbone) -> SubBatchEncoder:
        """What edit data is tokenized with: the backbone's processor, or SERAC's, which adds its own tokens."""
        self.attach(backbone)
        return self.input_processor

    def start(self, backbone: Backbone) -> EditSession:
        """No edits yet on `backbone`; `add` edits to it."""
        return EditSession(self.attach(backbone), backbone)

    def encode(
        self,
        backbone: Backbone,
        requests: Sequence[Request],
        batch_size: int | None = None,
        image_root: str | Path | None = None,
        kind: DataKind = "vqa",
        vqa_template: str = VQA_TEMPLATE,
    ) -> list[SubBatch]:
        """Requests as edit sub-batches of `batch_size` (None: one), tokenized with `processor(backbone)`,
        on its device."""
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
                    f"edit requests {start}..{start + len(group) - 1}: a batched edit needs images for all requests "
                    "or for none"
                )
            images = [t[2] for t in group] if all(with_image) else None
            groups.append(to_device(encode([t[0] for t in group], [t[1] for t in group], images), device_of(backbone)))
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
        edited = backbone if isinstance(backbone, EditedBackbone) else EditedBackbone(self.start(backbone))
        groups = self.encode(edited.backbone, requests, batch_size, image_root, kind, vqa_template)
        before = {name: p.detach().clone() for name, p in edited.backbone.editable_parameters().items()}
        state = (edited.session.head, edited.session.n_edits, edited.session.model.mark())
        try:
            for number, sub_batch in enumerate(groups, start=1):
                edited.session.add(
                    sub_batch, f"edit group {number} of {len(groups)}", "refused, the backbone is unchanged"
                )
        except NonFiniteEdit:
            # All or nothing: the groups of this call that went in come out again.
            edited.session.head, edited.session.n_edits = state[0], state[1]
            edited.session.model.drop_after(state[2])
            with torch.no_grad():
                for name, p in edited.backbone.editable_parameters().items():
                    p.copy_(before[name])
            raise
        return edited


def loader_records(
    loader: Iterable[EditBatch], device: torch.device, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """The one-record EditBatches of `loader` (the first `limit`), on `device`."""
    seen = 0
    for batch in loader:
        for record in record_batches(to_device(batch, device)):
            if seen == limit:
                return
            seen += 1
            yield record


def _origin(record: Mapping[str, Any], position: int) -> str:
    return record["meta"][0]["origin"] if "meta" in record else f"record {position}"


def _batches(loader: Iterable[EditBatch], device: torch.device, limit: int | None = None) -> Iterator[EditBatch]:
    """The batches of `loader` on `device`, cut to the first `limit` records."""
    seen = 0
    for batch in loader:
        size = batch["edit_inner"]["input_ids"].shape[0]
        if limit is not None and seen + size > limit:
            if seen < limit:
                yield from (to_device(r, device) for r in itertools.islice(record_batches(batch), limit - seen))
            return
        seen += size
        yield to_device(batch, device)


def score(
    session: EditSession, batches: Iterable[EditBatch], metrics: EditMetrics, edited: EditedFacts | None = None
) -> dict[str, Any]:
    """The report of `metrics` on `batches`' records, the edits in force (one-hop edits go on top, then are dropped);
    locality inputs that `edited` asks are left out (`without_edited_locality`)."""
    metrics = metrics.to(device_of(session.backbone))
    for batch in batches if edited is None else (part for b in batches for part in without_edited_locality(b, edited)):
        mark = session.model.mark()
        evaluate_batch(session, session.backbone, batch, metrics)
        session.model.drop_after(mark)
    return metrics.compute()


def editor_module(editor: Editor | nn.Module, backbone: Backbone) -> nn.Module:
    """The editor module to edit `backbone` with: an exported editor's, attached, or a plain one (a baseline)."""
    return editor.attach(backbone) if isinstance(editor, Editor) else editor


def evaluate(
    editor: Editor | nn.Module,
    backbone: Backbone,
    loader: Iterable[EditBatch],
    hops: Sequence[str] = HOPS,
    progress: bool = True,
    groups: Sequence[str] = (),
    generate: bool = False,
    protocols: Sequence[Protocol] = ("kedit",),
    unedited: bool = True,
) -> dict[str, Any]:
    """Edit each record on its own, from the unedited model, and score it: what validation reports, under
    each of `protocols`, with `unedited` the unedited model's scores (`pre_` keys), also per metric group
    (`EditMetrics`); with `generate` also the `gen_*` exact match of greedily generated answers
    (generation.py). `editor` is an exported one or a plain editor module (a baseline)."""
    metrics = EditMetrics(hops, protocols, unedited=unedited, groups=groups).to(device_of(backbone))
    generation = GenerationMetrics().to(device_of(backbone)) if generate else None
    plain = editor_module(editor, backbone)
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    with tqdm(total=total, desc="editing", disable=not progress) as bar:
        for batch in _batches(loader, device_of(backbone)):
            evaluate_batch(plain, backbone, batch, metrics, generation)
            bar.update(batch["edit_inner"]["input_ids"].shape[0])
    return {**metrics.compute(), **(generation.compute() if generate else {})}


def weight_change(model: WeightEditedModel) -> float:
    """||W - W_0||_F / ||W_0||_F over all edited weights together: how far the folded edits moved them."""
    if model.original is None:
        return 0.0
    weights = model.backbone.editable_parameters()
    change = sum(float((weights[name].detach().float() - w.float()).pow(2).sum()) for name, w in model.original.items())
    return (change / model.unedited_squared_norm) ** 0.5


def curve_points(n_edits: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... below `n_edits`, then `n_edits`."""
    points, scale = [], 1
    while scale < n_edits:
        points += [k * scale for k in (1, 2, 5) if k * scale < n_edits]
        scale *= 10
    return points + [n_edits]


class Links:
    """Union-find: things linked directly or through others share one root."""

    def __init__(self) -> None:
        self.parent: dict[Hashable, Hashable] = {}

    def root(self, thing: Hashable) -> Hashable:
        self.parent.setdefault(thing, thing)
        while self.parent[thing] != thing:
            self.parent[thing] = self.parent[self.parent[thing]]
            thing = self.parent[thing]
        return thing

    def link(self, a: Hashable, b: Hashable) -> None:
        self.parent[self.root(a)] = self.root(b)


def facts(metas: Sequence[Mapping[str, Any] | None]) -> list[Hashable]:
    """The fact each record (its `meta`; None: a fact of its own) edits. A fact is a question about a subject:
    questions are the edit prompts linked by the records' own prompt/rephrase pairs; the subject is the
    record's `subject` when it gives one, else its images linked by their image/image_rephrase pairs (text
    records: none)."""
    questions, subjects = Links(), Links()
    for meta in filter(None, metas):
        questions.link(meta["prompt"], meta["rephrase"])
        if meta.get("subject") is None and meta.get("image") is not None:
            subjects.link(str(meta["image"]), str(meta.get("image_rephrase", meta["image"])))

    def fact(position: int, meta: Mapping[str, Any] | None) -> Hashable:
        if meta is None:
            return position
        subject = meta.get("subject")
        if subject is None and meta.get("image") is not None:
            subject = ("images", subjects.root(str(meta["image"])))
        return questions.root(meta["prompt"]), subject

    return [fact(position, meta) for position, meta in enumerate(metas)]


@dataclass(frozen=True)
class EditedFacts:
    """What a sequence of edits (their records' `meta`) changed on purpose: the questions of its text edits
    (prompt and rephrase) and, for its image edits, each (question, picture) pair of an edited question with
    a picture of its subject that the sequence's records show (`facts` links them)."""

    questions: frozenset[str] = frozenset()
    pictured: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def of(cls, metas: Sequence[Mapping[str, Any] | None]) -> EditedFacts:
        metas = [meta for meta in metas if meta]
        subjects = [subject for _, subject in facts(metas)]
        pictures: dict[Hashable, set[str]] = {}
        for subject, meta in zip(subjects, metas):
            shown = (meta.get("image"), meta.get("image_rephrase"))
            pictures.setdefault(subject, set()).update(str(picture) for picture in shown if picture is not None)
        questions, pictured = set(), set()
        for subject, meta in zip(subjects, metas):
            asked = (meta["prompt"], meta["rephrase"])
            if meta.get("image") is None:
                questions.update(asked)
            else:
                pictured.update((question, picture) for question in asked for picture in pictures[subject])
        return cls(frozenset(questions), frozenset(pictured))

    def asks(self, prompt: str, picture: str | None = None) -> bool:
        return prompt in self.questions if picture is None else (prompt, str(picture)) in self.pictured


def edited_inputs(meta: Mapping[str, Any], edited: EditedFacts) -> dict[str, int]:
    """How many of one record's locality inputs (its `meta`: `loc`, `loc_image`, `neighbors`) `edited` asks,
    per metric."""
    return {
        "t_locality": int("loc" in meta and edited.asks(meta["loc"])),
        "i_locality": int("loc_image" in meta and edited.asks(*meta["loc_image"])),
        "n_locality": sum(edited.asks(prompt) for prompt in meta.get("neighbors", ())),
    }


def without_edited_locality(batch: EditBatch, edited: EditedFacts) -> Iterator[EditBatch]:
    """`batch` without the locality inputs that `edited` asks. A locality input's answer must stay; when the
    sequence itself edited its fact, the answer is meant to change, and the locality metric would count the
    edit's success as a failure (a neighbour that is another record's edit prompt; an image-locality question
    that is another record's edit question on its picture). Neighbour rows are dropped; a record whose `loc`
    or `loc_image` input is edited is scored on its own without that sub-batch (those hold one row per
    record, in step with the edits)."""
    metas = batch.get("meta") or []
    if NEIGHBOR in batch:
        prompts = [prompt for meta in metas for prompt in meta.get("neighbors", ())]
        if len(prompts) != batch[NEIGHBOR]["input_ids"].shape[0]:
            raise ValueError(
                f"the batch has {batch[NEIGHBOR]['input_ids'].shape[0]} near-neighbour rows but its records' meta "
                f"names {len(prompts)} (meta['neighbors']: each record's neighbour prompts, as TextEditCollator "
                "writes them)"
            )
        keep = [not edited.asks(prompt) for prompt in prompts]
        if not all(keep):
            rows = torch.tensor(keep).nonzero().flatten().to(batch["neighbor_record"].device)
            rest = {key: value for key, value in batch.items() if key not in (NEIGHBOR, "neighbor_record")}
            if rows.numel():
                rest[NEIGHBOR] = sub_batch_rows(batch[NEIGHBOR], rows)
                rest["neighbor_record"] = batch["neighbor_record"][rows]
            # The metas name the rows that are left, so the batch can still be split into records.
            rest["meta"] = metas = [
                {**meta, "neighbors": [prompt for prompt in meta.get("neighbors", ()) if not edited.asks(prompt)]}
                for meta in metas
            ]
            batch = rest
    if not any(edited_inputs(meta, edited)[key] for meta in metas for key in LOCALITY_KEYS):
        yield batch
        return
    for record in record_batches(batch):
        counts = edited_inputs(record["meta"][0], edited)
        dropped = {LOCALITY_OF[key] for key in LOCALITY_KEYS if counts[key]}
        yield {key: value for key, value in record.items() if key not in dropped}


def in_force(metas: Sequence[Mapping[str, Any] | None]) -> list[bool]:
    """Whether each edit of a sequence (its record's `meta`) is still in force at the end: False when a later
    edit is of the same fact (`facts`)."""
    keys = facts(metas)
    latest = {key: position for position, key in enumerate(keys)}
    return [latest[key] == position for position, key in enumerate(keys)]


def evaluate_sequential(
    editor: Editor | nn.Module,
    backbone: Backbone,
    loader: Iterable[EditBatch],
    n_edits: int,
    hops: Sequence[str] = HOPS,
    probe: int | None = 10,
    progress: bool = True,
    groups: Sequence[str] = (),
    protocols: Sequence[Protocol] = ("kedit",),
) -> dict[str, Any]:
    """Edit the first `n_edits` records one after another, each on top of the previous edits.

    At 1, 2, 5, 10, ... edits, those of the first `probe` records edited so far (None: all of them) that are still
    in force are scored against their own targets (how Reliability of the earliest edits and Locality hold up as
    edits accumulate: `sequential.curve`, one array per headline metric against `n_edits`, and for weight editors
    `weight_change`, how far the edits moved the edited weights; a point where every tracked edit is superseded
    is left out). The report itself scores, on the
    final post-edit model under each of `protocols` and beside the unedited model, the edits in force: an
    edit superseded by a later edit of the same fact (`in_force`) is left out, since the model should now
    answer the later target. `sequential.all_edits` is the same report over all `n_edits` records, each
    against its own target; `sequential.edits_in_force` counts the scored ones. `loader` is iterated
    twice, or three times when some edit was superseded.
    """
    device = device_of(backbone)
    marks = set(curve_points(n_edits))
    session, earliest, curve, done = EditSession(editor_module(editor, backbone), backbone), [], {"n_edits": []}, 0
    metas = []
    try:
        with tqdm(total=n_edits, desc="sequential edits", disable=not progress) as bar:
            for record in loader_records(loader, device, n_edits):
                what = f"sequential edit {done + 1} ({_origin(record, done)})"
                session.add(record["edit_inner"], what, "stopped")
                metas.append(record["meta"][0] if "meta" in record else None)
                done += 1
                if probe is None or len(earliest) < probe:
                    earliest.append(record)
                tracked = [record for record, kept in zip(earliest, in_force(metas)) if kept] if done in marks else []
                if tracked:
                    report = score(session, tracked, EditMetrics(hops, protocols[:1]), EditedFacts.of(metas))
                    curve["n_edits"].append(done)
                    for key in headline(report):
                        curve.setdefault(key, []).append(report[key])
                    if isinstance(session.model, WeightEditedModel):
                        curve.setdefault("weight_change", []).append(weight_change(session.model))
                bar.update()
        if done < n_edits:
            raise ValueError(f"{n_edits} sequential edits asked for, but the data has only {done} records")

        def final_metrics() -> EditMetrics:
            return EditMetrics(hops, protocols, unedited=True, groups=groups)

        edited = EditedFacts.of(metas)
        all_edits = score(session, _batches(loader, device, n_edits), final_metrics(), edited)
        force = in_force(metas)
        final = (
            all_edits
            if all(force)
            else score(
                session,
                (record for record, kept in zip(loader_records(loader, device, n_edits), force) if kept),
                final_metrics(),
                edited,
            )
        )
    finally:
        session.restore()
    sequential = {
        "probe_edits": len(earliest),
        "curve": curve,
        "edits_in_force": sum(force),
        "locality_edited": {
            key: sum(edited_inputs(meta, edited)[key] for meta, kept in zip(metas, force) if meta and kept)
            for key in LOCALITY_OF
        },
        "all_edits": all_edits,
    }
    return {**final, "sequential": sequential}
