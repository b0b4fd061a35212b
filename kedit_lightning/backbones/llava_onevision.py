"""LLaVA-OneVision (Li et al., 2024) on transformers' LlavaOnevisionForConditionalGeneration.

Layout: "USER: {visual}\\n{prompt} ASSISTANT:" (as LLaVA-1.5's, so the synthetic world's word tokenizer
covers it), a video (list of frames) as <video> placeholders, named views as one image each in the
order of their sorted names. Every image, view and frame is resized to `vision_config.image_size`
square pixels and read at that base resolution, without anyres tiles: an image is its (size / patch)^2
features and the image_newline (transformers' multi-image mode, here for single images too), a video is
its frames' features pooled 2 x 2 and one image_newline at the end (transformers' video mode). So a
row's placeholders follow from its kind and count of images or frames alone, for the full forward and
the prefix alike. A row's `pixel_values` are [M, 1 + C * size * size]: per image or frame its kind
(1.0 a video frame, 0.0 an image) then its pixels, NaN past the row's own M.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

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

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
DEFAULT_MAX_FRAMES = 8
PROMPT_FORMAT = PromptFormat(
    with_image="USER: {image}\n{prompt} ASSISTANT:", text_only="USER: {prompt} ASSISTANT:", image_token=IMAGE_TOKEN
)


def untiled(count: int) -> torch.Tensor:
    """`batch_num_images` that keeps `count` images at their base view: transformers tiles (anyres) only an
    image alone in its sample, and reads the count for nothing else (one sample of at least two images)."""
    return torch.tensor([max(count, 2)])


class LlavaOnevisionEncoder(RaggedVisualEncoder):
    """SubBatchEncoder for LLaVA-OneVision: per-row placeholders and base-view pixels for images, videos and views."""

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        model: LlavaOnevisionForConditionalGeneration,
        max_length: int | None,
    ) -> None:
        super().__init__(tokenizer, image_processor, PROMPT_FORMAT, max_length)
        config, vision = model.config, model.config.vision_config
        self.image_size = vision.image_size
        self.max_frames = DEFAULT_MAX_FRAMES
        grid = vision.image_size // vision.patch_size
        features = grid * grid - (config.vision_feature_select_strategy == "default")
        self.tokens_per_image = features + 1  # the image_newline after each image
        self.tokens_per_frame = math.ceil(grid / 2) ** 2  # 2 x 2 bilinear pooling (`apply_pooling`)

    def placeholders(self, visual: LoadedVisual | bool) -> str | None:
        if visual is False or visual is None:
            return None
        if visual is True or visual_kind(visual) != "video":
            count = 1 if visual is True else len(self.images(visual))
            return IMAGE_TOKEN * self.tokens_per_image * count
        return VIDEO_TOKEN * (self.tokens_per_frame * len(self.frames(visual)) + 1)

    def row_pixels(self, visual: LoadedVisual) -> torch.Tensor:
        images = self.images(visual)
        side = (self.image_size, self.image_size)
        rgb = [im.convert("RGB").resize(side, Image.Resampling.BICUBIC) for im in images]
        # Each square image comes back as its base view and the one tile equal to it: the base view is kept.
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"][:, 0]
        kind = torch.full((len(images), 1), float(visual_kind(visual) == "video"))
        return torch.cat([kind, pixels.flatten(1)], dim=1)


@register
class LlavaOnevisionBackbone(RaggedVisualBackbone):
    family: ClassVar[str] = "llava_onevision"
    language_model_prefix = "model.language_model."
    causal_lm_wrapper = False
    visual_inputs = frozenset({"image", "video", "views"})
    prompt_template: ClassVar[PromptFormat] = PROMPT_FORMAT

    def __init__(
        self,
        model: LlavaOnevisionForConditionalGeneration,
        tokenizer: Any,
        image_processor: Any | None = None,
        edit_params: Sequence[str] = (),
        max_length: int | None = None,
    ) -> None:
        config, vision = model.config, model.config.vision_config
        source = config.name_or_path or "llava_onevision config"
        for token, key in ((IMAGE_TOKEN, "image_token_index"), (VIDEO_TOKEN, "video_token_index")):
            check_image_token(tokenizer, token, getattr(config, key), source, key)
        check_vocab(tokenizer, config.text_config.vocab_size, source)
        size = vision.image_size
        image_processor = image_processor or LlavaOnevisionImageProcessorPil()
        # The base resolution only: a square image of that size then has one tile, itself.
        image_processor.size = {"height": size, "width": size}
        image_processor.image_grid_pinpoints = [[size, size]]
        edit_params = list(edit_params) or default_edit_params(
            config.text_config, self.language_model_prefix, causal_wrapper=False
        )
        super().__init__(model, LlavaOnevisionEncoder(tokenizer, image_processor, model, max_length), edit_params)
        self.image_token_id, self.video_token_id = config.image_token_index, config.video_token_index
        self.pixel_shape = (vision.num_channels, size, size)

    @property
    def language_config(self) -> Any:
        return self.model.config.text_config

    @classmethod
    def build_model(
        cls, config: Mapping[str, Any], dtype: torch.dtype | str = torch.float32
    ) -> LlavaOnevisionForConditionalGeneration:
        return LlavaOnevisionForConditionalGeneration._from_config(
            LlavaOnevisionConfig(**config), dtype=as_dtype(dtype)
        )

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
    ) -> LlavaOnevisionBackbone:
        tokenizer, image_processor = resolve_processor(processor, tokenizer, image_processor, cls.family)
        for token in (IMAGE_TOKEN, VIDEO_TOKEN):
            tokenizer = with_special_token(tokenizer, token)
        config = {**config, "text_config": fill_text_config(config.get("text_config"), tokenizer)}
        config.setdefault("image_token_index", tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        config.setdefault("video_token_index", tokenizer.convert_tokens_to_ids(VIDEO_TOKEN))
        return cls(cls.build_model(config, dtype), tokenizer, image_processor, edit_params, max_length)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        edit_params: Sequence[str] = (),
        dtype: torch.dtype = torch.float32,
        *,
        max_length: int | None = None,
    ) -> LlavaOnevisionBackbone:
        read_config_dict(path, cls.family, {"llava_onevision"})
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=as_dtype(dtype))
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path)
        return cls(model, load_tokenizer(path), image_processor, edit_params, max_length)

    # -- images and videos --------------------------------------------------------------------

    def rows(self, pixel_values: torch.Tensor) -> list[tuple[bool, torch.Tensor]]:
        """Per row of NaN-padded `pixel_values`: whether it is a video, and its images or frames [M, C, S, S]."""
        real = ~pixel_values[..., 0].isnan()
        frames = pixel_values[..., 1:].unflatten(-1, self.pixel_shape)
        return [(bool(row[0, 0] == 1), frame[keep]) for row, frame, keep in zip(pixel_values, frames, real)]

    def base_views(self, images: torch.Tensor) -> BaseModelOutputWithPooling:
        """transformers' image features of images [n, C, S, S] at their base view: per image [Q, H], newline last."""
        sizes = torch.tensor([list(images.shape[-2:])] * len(images), device=images.device)
        return self.model.model.get_image_features(
            pixel_values=images, image_sizes=sizes, batch_num_images=untiled(len(images))
        )

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, Q, H] from NaN-padded rows: each row's images (or video) as transformers reads them, zeros past them."""
        rows = self.rows(pixel_values)
        images = [frames for is_video, frames in rows if not is_video]
        units = iter(self.base_views(torch.cat(images)).pooler_output) if images else iter(())
        features = []
        for is_video, frames in rows:
            if is_video:
                features.append(self.model.model.get_video_features(frames.unsqueeze(0)).pooler_output[0])
            else:
                features.append(torch.cat([next(units) for _ in frames]))
        return pad_rows(features).nan_to_num(0.0)

    def model_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """transformers' own forward, given the base views of the images and each video's frames."""
        if pixel_values is None:
            reject_placeholders(input_ids, self.image_token_id, self.family)
            reject_placeholders(input_ids, self.video_token_id, self.family)
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        rows = self.rows(pixel_values)
        images = [frames for is_video, frames in rows if not is_video]
        encoded = {"image": self.base_views(torch.cat(images))} if images else {}
        videos = [self.model.model.get_video_features(f.unsqueeze(0)).pooler_output for v, f in rows if v]
        if videos:  # videos of other frame counts: one pooled sequence for the forward to scatter in order
            encoded["video"] = BaseModelOutputWithPooling(pooler_output=torch.cat(videos, dim=1))
        return self.model(input_ids=input_ids, attention_mask=attention_mask, mm_encoder_outputs=encoded).logits
