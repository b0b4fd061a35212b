"""Qwen2-VL (Wang et al., 2024) and Qwen2.5-VL (Bai et al., 2025) on transformers' own classes.

Layout: "USER: {visual}{prompt} ASSISTANT:" (as LLaVA's, so the synthetic world's word tokenizer
covers it; the Qwen chat markers are left out), each image as <|vision_start|> <|image_pad|> x
tokens <|vision_end|>, a video (list of frames) the same with <|video_pad|>, named views as one
image each in the order of their sorted names. Every
image and frame is resized to `vision_config.image_size` square pixels, so each has the same patch
grid and a row's placeholder runs say which grids its rows carry: the 3-D M-RoPE positions
(`get_rope_index`) are computed from the token ids alone, for the full forward and the prefix alike.
A row's `pixel_values` are its patches [P, D] in placeholder order, NaN past them (rows differ in P).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import (
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from data_modules.encoding import PromptFormat
from data_modules.visual import LoadedVisual, visual_kind
from kedit_lightning.backbones.base import register
from kedit_lightning.backbones.loading import (
    as_dtype,
    check_image_token,
    check_vocab,
    default_edit_params,
    fill_text_config,
    load_tokenizer,
    read_config_dict,
    reject_placeholders,
    resolve_processor,
    with_special_token,
)
from kedit_lightning.backbones.ragged import RaggedVisualBackbone, RaggedVisualEncoder, pad_rows

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
DEFAULT_IMAGE_SIZE = 448  # 16 x 16 patches of 28 px after merging: 256 tokens an image
DEFAULT_MAX_FRAMES = 8
MODELS: dict[str, tuple[type, type[PreTrainedModel]]] = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}
PROMPT_FORMAT = PromptFormat(
    with_image="USER: {image}{prompt} ASSISTANT:", text_only="USER: {prompt} ASSISTANT:", image_token=IMAGE_PAD
)


class Qwen2VLEncoder(RaggedVisualEncoder):
    """SubBatchEncoder for Qwen2-VL: per-row placeholders and patches for images, videos and views."""

    def __init__(
        self, tokenizer: Any, image_processor: Any, vision: Any, max_length: int | None, max_frames: int
    ) -> None:
        super().__init__(tokenizer, image_processor, PROMPT_FORMAT, max_length)
        self.image_size = vision.image_size
        self.temporal = vision.temporal_patch_size
        self.channels = vision.in_channels
        self.max_frames = max_frames
        grid = self.image_size // vision.patch_size
        self.patches_per_image = grid * grid
        self.tokens_per_image = self.patches_per_image // vision.spatial_merge_size**2

    def frames(self, frames: Sequence[Image.Image]) -> list[Image.Image]:
        """At most `max_frames` frames spread evenly, the last repeated to whole temporal patches."""
        frames = super().frames(frames)
        return frames + [frames[-1]] * (-len(frames) % self.temporal)

    def placeholders(self, visual: LoadedVisual | bool) -> str | None:
        if visual is False or visual is None:
            return None
        if visual is True or visual_kind(visual) != "video":
            count = 1 if visual is True else len(self.images(visual))
            return f"{VISION_START}{IMAGE_PAD * self.tokens_per_image}{VISION_END}" * count
        temporal_patches = len(self.frames(visual)) // self.temporal
        return f"{VISION_START}{VIDEO_PAD * self.tokens_per_image * temporal_patches}{VISION_END}"

    def patches(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[len(images), patches_per_image, D]: each image resized to the fixed size, through the image processor."""
        side = (self.image_size, self.image_size)
        rgb = [im.convert("RGB").resize(side, Image.Resampling.BICUBIC) for im in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        return pixels.view(len(images), self.patches_per_image, -1)

    def row_pixels(self, visual: LoadedVisual) -> torch.Tensor:
        images = self.images(visual)
        pixels = self.patches(images)
        if visual_kind(visual) != "video":
            return pixels.flatten(0, 1)
        # Each image patch holds its frame `temporal` times ([C, T, P, P] flattened); a video patch holds
        # `temporal` consecutive frames, as Qwen2VLVideoProcessor groups them (it needs torchvision).
        frames = pixels.unflatten(-1, (self.channels, self.temporal, -1))[:, :, :, 0]  # [F, n, C, P*P]
        grouped = frames.unflatten(0, (-1, self.temporal)).permute(0, 2, 3, 1, 4)  # [F / T, n, C, T, P*P]
        return grouped.flatten(2).flatten(0, 1)


@register
class Qwen2VLBackbone(RaggedVisualBackbone):
    family: ClassVar[str] = "qwen2_vl"
    language_model_prefix = "model.language_model."
    causal_lm_wrapper = False
    visual_inputs = frozenset({"image", "video", "views"})
    prompt_template: ClassVar[PromptFormat] = PROMPT_FORMAT

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        image_processor: Any | None = None,
        edit_params: Sequence[str] = (),
        max_length: int | None = None,
        max_frames: int = DEFAULT_MAX_FRAMES,
    ) -> None:
        config, vision = model.config, model.config.vision_config
        source = config.name_or_path or f"{config.model_type} config"
        vision.image_size = getattr(vision, "image_size", DEFAULT_IMAGE_SIZE)
        factor = vision.patch_size * vision.spatial_merge_size
        if vision.image_size % factor:
            raise ValueError(f"{source}: vision_config.image_size {vision.image_size} is not a multiple of {factor}")
        for token, key in ((IMAGE_PAD, "image_token_id"), (VIDEO_PAD, "video_token_id")):
            check_image_token(tokenizer, token, getattr(config, key), source, key)
        check_vocab(tokenizer, config.text_config.vocab_size, source)
        image_processor = image_processor or Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
        )
        # The processor must keep the fixed size as it is (its own resize keeps sizes within its pixel bounds).
        image_processor.size = {"shortest_edge": vision.image_size**2, "longest_edge": vision.image_size**2}
        edit_params = list(edit_params) or default_edit_params(
            config.text_config, self.language_model_prefix, causal_wrapper=False
        )
        encoder = Qwen2VLEncoder(tokenizer, image_processor, vision, max_length, max_frames)
        super().__init__(model, encoder, edit_params)
        self.image_token_id, self.video_token_id = config.image_token_id, config.video_token_id
        self.grid = vision.image_size // vision.patch_size
        self.merge = vision.spatial_merge_size

    @property
    def language_config(self) -> Any:
        return self.model.config.text_config

    @classmethod
    def build_model(cls, config: Mapping[str, Any], dtype: torch.dtype | str = torch.float32) -> PreTrainedModel:
        config_class, model_class = MODELS[config.get("model_type", "qwen2_vl")]
        return model_class._from_config(config_class(**config), dtype=as_dtype(dtype))

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        processor: str | None = None,
        edit_params: Sequence[str] = (),
        dtype: torch.dtype = torch.float32,
        *,
        tokenizer: Any | None = None,
        image_processor: Any | None = None,
        max_length: int | None = None,
    ) -> Qwen2VLBackbone:
        tokenizer, image_processor = resolve_processor(processor, tokenizer, image_processor, cls.family)
        for token in SPECIAL_TOKENS:
            tokenizer = with_special_token(tokenizer, token)
        config = {**config, "text_config": fill_text_config(config.get("text_config"), tokenizer)}
        for key, token in (
            ("image_token_id", IMAGE_PAD),
            ("video_token_id", VIDEO_PAD),
            ("vision_start_token_id", VISION_START),
            ("vision_end_token_id", VISION_END),
        ):
            config.setdefault(key, tokenizer.convert_tokens_to_ids(token))
        return cls(cls.build_model(config, dtype), tokenizer, image_processor, edit_params, max_length)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        edit_params: Sequence[str] = (),
        dtype: torch.dtype = torch.float32,
        *,
        max_length: int | None = None,
    ) -> Qwen2VLBackbone:
        model_type = read_config_dict(path, cls.family, set(MODELS))["model_type"]
        model = MODELS[model_type][1].from_pretrained(path, dtype=as_dtype(dtype))
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        return cls(model, load_tokenizer(path), image_processor, edit_params, max_length)

    # -- visual tokens: which grids a row's placeholders stand for --------------------------------

    def grids(self, input_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per row, its visual inputs in order as (modality: 1 image / 2 video, temporal patches)."""
        per_grid = self.grid * self.grid // self.merge**2
        kinds = self.token_types(input_ids).tolist()
        return [[(kind, len(list(run)) // per_grid) for kind, run in itertools.groupby(row) if kind] for row in kinds]

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T]: 0 text, 1 image placeholder, 2 video placeholder (transformers' `mm_token_type_ids`)."""
        return (input_ids == self.image_token_id).int() + 2 * (input_ids == self.video_token_id).int()

    def grid_tensor(self, grids: Sequence[tuple[int, int]], kind: int, device: torch.device) -> torch.Tensor | None:
        rows = [[t, self.grid, self.grid] for k, t in grids if k == kind]
        return torch.tensor(rows, dtype=torch.long, device=device) if rows else None

    def decoder_kwargs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        grids = [g for row in self.grids(input_ids) for g in row]
        if not grids:
            return {}
        positions, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=self.token_types(input_ids),
            image_grid_thw=self.grid_tensor(grids, 1, input_ids.device),
            video_grid_thw=self.grid_tensor(grids, 2, input_ids.device),
            attention_mask=attention_mask,
        )
        return {"position_ids": positions}

    # -- images -------------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, Q, H] from NaN-padded rows [N, P, D]: each row's patches through the vision tower as images of
        the fixed grid (a video's temporal patches read alike: attention stays within each), zeros past them."""
        real = ~pixel_values[..., 0].isnan()
        per_image = self.grid * self.grid
        counts = (real.sum(1) // per_image).tolist()
        grid = torch.tensor([[1, self.grid, self.grid]] * sum(counts), device=pixel_values.device)
        features = self.model.model.get_image_features(pixel_values=pixel_values[real], image_grid_thw=grid)
        units = list(features.pooler_output)
        rows = [torch.cat(units[start : start + n]) for start, n in zip(itertools.accumulate([0, *counts]), counts)]
        return pad_rows(rows).nan_to_num(0.0)

    def model_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """transformers' own forward: each row's patches split into its images and videos by its placeholders."""
        if pixel_values is None:
            reject_placeholders(input_ids, self.image_token_id, self.family)
            reject_placeholders(input_ids, self.video_token_id, self.family)
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        per_image = self.grid * self.grid
        images, videos, grids = [], [], []
        for row, row_grids in zip(pixel_values, self.grids(input_ids)):
            start = 0
            for kind, t in row_grids:
                (images if kind == 1 else videos).append(row[start : start + t * per_image])
                start += t * per_image
            grids.extend(row_grids)
        device = input_ids.device
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=torch.cat(images) if images else None,
            image_grid_thw=self.grid_tensor(grids, 1, device),
            pixel_values_videos=torch.cat(videos) if videos else None,
            video_grid_thw=self.grid_tensor(grids, 2, device),
            mm_token_type_ids=self.token_types(input_ids),
        ).logits
