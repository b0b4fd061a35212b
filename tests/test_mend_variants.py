"""MEND's two variants: `reference-code` against the reference algorithm written out plainly here (per-row
Welford statistics, every residual layer clamped, the transformed update added), `paper` as before."""

import pytest
import torch
from oracle import capture_factors
from test_mend_editor import EDIT, edited, encode, make_backbone

from kedit_lightning.editors.mend import MEND
from kedit_lightning.modules import MENDModule


def perturbed(editor: MEND, seed: int = 0) -> MEND:
    """Non-identity transforms whose pre-activations are negative in places (so the clamps matter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in editor.named_parameters():
            if name.endswith(("up", "bias", "mode_shift")):
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return editor


def reference_transform(layers, x, delta, mode, seen):
    """The reference algorithm for one edited layer: update the running moments row by row with this
    layer's rows (`seen`: the rows seen before, a list, extended in place), normalise with them, then
    every low-rank residual layer with a clamp."""
    z_rows = torch.cat([x, delta], dim=1)
    seen.extend(z_rows)
    mean, s, k = seen[0].clone(), torch.zeros_like(seen[0]), 1
    for row in seen[1:]:
        k += 1
        new_mean = mean + (row - mean) / k
        s = s + (row - mean) * (row - new_mean)
        mean = new_mean
    z = (z_rows - mean) / ((s / (k - 1)).sqrt() + 1e-7)
    for layer in layers:
        pre = (layer.up @ (layer.down @ z.T)).T + layer.bias
        pre = pre * layer.mode_scale[mode] + layer.mode_shift[mode]
        z = z + pre.clamp(min=0)
    return z[:, : x.shape[1]], z[:, x.shape[1] :]


def test_reference_code_variant_matches_the_reference_algorithm_on_fixed_inputs():
    backbone = make_backbone("opt")
    editor = perturbed(MEND.for_backbone(backbone, rank=4, edit_lr=0.05, variant="reference-code")).train()
    batch = encode(backbone, EDIT[:1])
    weights = {n: w.detach() for n, w in backbone.editable_parameters().items()}
    factors = capture_factors(backbone, batch, weights, editor.param_names)
    seen = {key: [] for key in editor.transforms}
    expected = {}
    with torch.no_grad():
        for lr, name in zip(editor.edit_lrs, editor.param_names):  # model order, as the reference loops
            key, mode = editor.route[name]
            x, delta = reference_transform(editor.transforms[key].mlp.layers, *factors[name], mode, seen[key])
            expected[name] = weights[name] + lr * torch.einsum("bi,bj->ji", x, delta)
        got = edited(editor, backbone, batch)
    for name in editor.param_names:
        change = (expected[name] - weights[name]).abs().max().item()
        assert change > 1e-3  # the comparison is of a real edit
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5 * change)


def test_the_variants_differ_in_sign_and_last_layer_and_the_paper_one_is_a_descent_step():
    backbone = make_backbone("opt")
    batch = encode(backbone, EDIT[:1])
    paper = MEND.for_backbone(backbone, rank=4, edit_lr=0.05).eval()
    reference = MEND.for_backbone(backbone, rank=4, edit_lr=0.05, variant="reference-code").eval()
    reference.load_state_dict(paper.state_dict())
    before = backbone.editable_parameters()
    # Identity transforms and no statistics: the paper's edit is -lr * grad, the reference code's +lr * grad.
    for name, w in edited(paper, backbone, batch).items():
        torch.testing.assert_close(edited(reference, backbone, batch)[name] - before[name], before[name] - w)
    assert not paper.transforms["32x16"].mlp.layers[-1].activate
    assert reference.transforms["32x16"].mlp.layers[-1].activate


def test_the_variant_is_saved_in_the_config_and_rebuilt():
    backbone = make_backbone("opt")
    editor = MEND.for_backbone(backbone, rank=4, variant="reference-code")
    assert editor.config["variant"] == "reference-code"
    rebuilt = MEND.from_config(editor.config)
    assert rebuilt.adds_update and rebuilt.transforms["16x32"].with_pending
    legacy = {k: v for k, v in editor.config.items() if k != "variant"}  # artifacts exported before variants
    assert MEND.from_config(legacy).config["variant"] == "paper"


def test_an_unknown_variant_is_refused_in_one_line():
    with pytest.raises(ValueError, match="MEND variant must be one of paper, reference-code; got 'ref'"):
        MEND({"w": (4, 4)}, variant="ref")
    with pytest.raises(ValueError, match="model.variant must be one of paper, reference-code; got 'ref'"):
        MENDModule({"family": "text"}, variant="ref")
