"""What the families taking several images, frames or views a row share (Qwen2-VL, LLaVA-OneVision):
rows of other visual lengths in one NaN-padded `pixel_values`, each distinct row encoded once, and each
row's features written over its own image and video placeholders in order."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from data_modules.encoding import SubBatchEncoder
from data_modules.visual import LoadedVisual, visual_kind
from kedit_lightning.backbones.base import Backbone


def pad_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N, P, D] from rows [P_i, D] (or [n_i, P_i, D] blocks), NaN past each row's own entries."""
    rows = [r.unsqueeze(0) if r.dim() == 2 else r for r in rows]
    width = max(r.shape[1] for r in rows)
    return torch.cat([F.pad(r, (0, 0, 0, width - r.shape[1]), value=float("nan")) for r in rows])


class RaggedVisualEncoder(SubBatchEncoder, ABC):
    """SubBatchEncoder whose rows carry their own images, frames or views (`row_pixels`), NaN-padded."""

    max_frames: int

    def frames(self, frames: Sequence[Image.Image]) -> list[Image.Image]:
        """At most `max_frames` frames, spread evenly over the video."""
        if not frames:
            raise ValueError(f"{self.family}: a video with no frames")
        if len(frames) > self.max_frames:
            step = len(frames) / self.max_frames
            frames = [frames[int(i * step)] for i in range(self.max_frames)]
        return list(frames)

    def images(self, visual: LoadedVisual) -> list[Image.Image]:
        """The images of a row's visual input in placeholder order (a video's frames, views by name)."""
        kind = visual_kind(visual)
        if kind == "video":
            return self.frames(visual)
        return [visual[name] for name in sorted(visual)] if kind == "views" else [visual]

    @abstractmethod
    def row_pixels(self, visual: LoadedVisual) -> torch.Tensor:
        """[P, D]: one row's pixels, in placeholder order."""

    def pixel_values(self, visuals: Sequence[LoadedVisual]) -> torch.Tensor:
        return pad_rows([self.row_pixels(v) for v in visuals])


class RaggedVisualBackbone(Backbone):
    """A Backbone whose `image_features` maps NaN-padded rows to [N, Q, H] features, zeros past each row's own."""

    video_token_id: int

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # NaN never equals itself, so padding is compared as +inf (no pixel value is infinite either).
        flat = pixel_values.nan_to_num(torch.inf).flatten(1)
        unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
        unique = unique.masked_fill(unique.isinf(), float("nan")).view(-1, *pixel_values.shape[1:])
        return self.image_features(unique)[inverse]

    def encode_visual(self, pixel_values: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.encode_images(pad_rows(pixel_values))

    def input_embeddings(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        placeholders = (input_ids == self.image_token_id) | (input_ids == self.video_token_id)
        if image_features is None or not bool(placeholders.any()):
            return super().input_embeddings(input_ids, image_features)
        counts = placeholders.sum(1)
        counts = counts[counts > 0]
        if len(counts) != len(image_features) or int(counts.max()) > image_features.shape[1]:
            raise ValueError(
                f"{self.family}: rows with {counts.tolist()} visual placeholders for image features "
                f"{tuple(image_features.shape[:2])}"
            )
        kept = torch.arange(image_features.shape[1], device=counts.device) < counts.unsqueeze(1)
        embeds = self.model.get_input_embeddings()(input_ids)
        return embeds.masked_scatter(placeholders.unsqueeze(-1), image_features[kept].to(embeds.dtype))
