"""The ``mars`` recipe on real chips: optical from the RMNP RGB scene, SAR from Sentinel-1 VV (dB).

The two come from different places (the sample set has no VHR SAR-optical pair), which
does not matter for what is tested here: shapes, masking, gradients, missing modalities
and that training on a fixed batch lowers the loss.
"""

from __future__ import annotations

import pytest
import torch

import earthray.recipes.mars as mars_module
from chips import loss_at, loss_before_after, real_chips, sgd_steps
from earthray.recipes import create_recipe
from earthray.sensors import get_sensor

OPTICAL, SAR = "vhr_rgb", "s1_grd_db"


def _sensors():
    return [get_sensor(OPTICAL), get_sensor(SAR).select(["VV"])]


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return {OPTICAL: real_chips(OPTICAL, None, 64, 4), SAR: real_chips(SAR, ["VV"], 64, 4)}


def _model(**overrides):
    torch.manual_seed(0)
    return create_recipe("mars", _sensors(), "tiny", **overrides)


def test_loss_dict_names_shapes_and_dtypes(batch):
    out = loss_at(_model(), batch)
    assert set(out) == {
        f"mim_{OPTICAL}", f"mim_{SAR}", "cgcl", "cgcl_patch", "cgcl_image", "cgcl_cross", "distill", "loss",
    }
    for name, value in out.items():
        assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value), name
    assert "distill" not in loss_at(_model(teacher_weight=0.0), batch)


def test_sensor_roles_come_from_sensor_kinds():
    model = _model()
    assert (model.optical, model.sar) == (OPTICAL, SAR)
    assert model.decoders[OPTICAL].out_chans == 3 and model.decoders[SAR].out_chans == 1
    with pytest.raises(ValueError, match="sar"):
        create_recipe("mars", ["vhr_rgb", "dem"], "tiny")


def test_gradients_reach_every_trainable_parameter_and_never_the_teacher(batch):
    model = _model().train()
    assert list(model.teacher.parameters()) == []
    assert not any(m.training for m in model.teacher.modules())
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    sgd_steps(model, batch)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for name, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name


def test_masked_image_loss_counts_only_masked_pixels(batch, monkeypatch):
    masks, recons = [], {}
    real_mask = mars_module.simmim_mask

    def recording(*args, **kwargs):
        masks.append(real_mask(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(mars_module, "simmim_mask", recording)
    model = _model()
    for name in (OPTICAL, SAR):
        model.decoders[name].register_forward_hook(lambda mod, args, out, name=name: recons.__setitem__(name, out))
    out = loss_at(model, batch)
    patch = model.config.patch_size
    for mask, name in zip(masks, (OPTICAL, SAR)):
        assert mask.dtype == torch.bool
        assert mask.float().mean().item() == pytest.approx(0.6, abs=0.1)
        pixels = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
        error = (recons[name] - batch[name]).abs().mean(dim=1)
        torch.testing.assert_close(out[f"mim_{name}"], error[pixels].mean())
        assert not torch.isclose(error[pixels].mean(), error.mean())


def test_absent_or_invalid_sar_changes_no_loss(batch):
    model = _model()
    present = torch.tensor([True, True, True, False])
    base = {**batch, f"{SAR}.present": present}
    garbled = {**base, SAR: batch[SAR].clone()}
    garbled[SAR][3] = 50.0
    expected, got = loss_at(model, base), loss_at(model, garbled)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])

    nothing_valid = {**batch, f"{SAR}.valid": torch.zeros(4, 64, 64, dtype=torch.bool)}
    assert loss_at(model, nothing_valid)[f"mim_{SAR}"].item() == 0.0


def test_encode_gives_unmasked_stages_per_modality_even_alone(batch):
    model = _model().eval()
    feats = model.encode(batch)
    assert set(feats) == {OPTICAL, SAR}
    strides = model.encoders[OPTICAL].out_strides
    dims = model.encoders[OPTICAL].out_dims
    for name in (OPTICAL, SAR):
        assert [tuple(f.shape) for f in feats[name]] == [(4, d, 64 // s, 64 // s) for d, s in zip(dims, strides)]
    alone = model.encode({SAR: batch[SAR]})
    assert set(alone) == {SAR}
    for a, b in zip(alone[SAR], feats[SAR]):
        torch.testing.assert_close(a, b)


def test_base_encoders_are_swinv2_base_sized():
    """The paper gives MaRS's backbones (SwinV2-B, 88 M parameters in the SwinV2 paper), not a total."""
    model = create_recipe("mars", _sensors(), "base", device="meta")
    assert model.config.img_size == 512 and model.config.mask_ratio == 0.6
    for name in (OPTICAL, SAR):
        n = sum(p.numel() for p in [*model.encoders[name].parameters(), *model.embed[name].parameters()])
        assert abs(n - 88e6) / 88e6 < 0.10, (name, n)


def test_tiny_preset_lowers_the_loss_on_a_fixed_batch_of_real_chips(batch):
    """Before/after on the same masks (same seed). The chips are unpaired, so CGCL can only
    fall to chance; reconstruction and distillation must really improve."""
    model = _model()
    before, after = loss_before_after(model, batch)
    summary = {k: (round(before[k].item(), 3), round(after[k].item(), 3)) for k in before}
    assert after["loss"] < 0.85 * before["loss"], summary
    for name in (f"mim_{OPTICAL}", f"mim_{SAR}"):
        assert after[name] < 0.92 * before[name], summary
    assert after["distill"] < 0.8 * before["distill"], summary
