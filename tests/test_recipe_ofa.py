"""OFA-Net recipe: one shared ViT, per-sensor embeddings and MAE decoders, on real sample chips."""

from __future__ import annotations

import pytest
import torch

from chips import loss_before_after, real_chips, sample_bands
from earthray.models.decoders import patchify
from earthray.recipes import create_recipe
from earthray.recipes.ofa import masked_patch_mse
from earthray.sensors import get_sensor

SENSORS = ["s1_grd_db", "vhr_rgbn", "landsat7_etm", "s2_l1c"]


def _sensors():
    return [get_sensor(s).select(sample_bands(s)) for s in SENSORS]


def _batch(n: int = 4, size: int = 32) -> dict[str, torch.Tensor]:
    return {s: real_chips(s, None, size, n) for s in SENSORS}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_loss_terms_per_sensor_and_total():
    model = create_recipe("ofa", _sensors(), "tiny")
    out = model(_batch())
    assert set(out) == {f"recon/{s}" for s in SENSORS} | {"loss"}
    for v in out.values():
        assert v.shape == () and v.dtype == torch.float32 and torch.isfinite(v)
    assert torch.allclose(out["loss"], torch.stack([out[f"recon/{s}"] for s in SENSORS]).mean())


def test_every_parameter_gets_a_gradient():
    model = create_recipe("ofa", _sensors(), "tiny")
    model(_batch())["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_unpaired_batches_and_absent_rows():
    model = create_recipe("ofa", _sensors(), "tiny")
    only = model({"vhr_rgbn": real_chips("vhr_rgbn", None, 32, 4)})
    assert set(only) == {"recon/vhr_rgbn", "loss"}

    batch = _batch()
    batch["s2_l1c.present"] = torch.tensor([True, False, True, False])
    batch["s1_grd_db.present"] = torch.zeros(4, dtype=torch.bool)
    torch.manual_seed(1)
    ref = model(batch)
    assert "recon/s1_grd_db" not in ref
    batch["s2_l1c"] = batch["s2_l1c"].clone()
    batch["s2_l1c"][[1, 3]] = 100.0
    torch.manual_seed(1)
    assert torch.equal(model(batch)["recon/s2_l1c"], ref["recon/s2_l1c"])


def test_masked_patch_mse_ignores_visible_and_invalid_pixels():
    images = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 4, 8 * 8 * 3)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    valid[0, :4, :4] = False
    for norm_pix in (False, True):
        ref = masked_patch_mse(pred, images, mask, 8, valid, norm_pix)
        visible = images.clone()
        visible[0, :, :8, 8:] += 3.0
        visible[1, :, 8:, :] -= 2.0
        assert torch.equal(masked_patch_mse(pred, visible, mask, 8, valid, norm_pix), ref)
        masked = images.clone()
        masked[1, :, :8, 8:] += 3.0 * torch.randn(3, 8, 8)
        assert not torch.equal(masked_patch_mse(pred, masked, mask, 8, valid, norm_pix), ref)
    invalid = images.clone()
    invalid[0, :, :4, :4] = 50.0
    assert torch.equal(masked_patch_mse(pred, invalid, mask, 8, valid), masked_patch_mse(pred, images, mask, 8, valid))
    target = patchify(images, 8)
    expected = ((pred - target) ** 2)[mask].mean()
    assert torch.allclose(masked_patch_mse(pred, images, mask, 8), expected)


def test_chips_of_another_size_are_resized_and_encoded():
    model = create_recipe("ofa", _sensors(), "tiny").eval()
    batch = {"vhr_rgbn": real_chips("vhr_rgbn", None, 48, 2), "vhr_rgbn.valid": torch.ones(2, 48, 48, dtype=torch.bool)}
    assert torch.isfinite(model(batch)["loss"])
    feats = model.encode(batch)
    assert list(feats) == ["vhr_rgbn"]
    assert [tuple(f.shape) for f in feats["vhr_rgbn"]] == [(2, 48, 4, 4)] * 4
    again = model.encode(batch)["vhr_rgbn"]
    assert all(torch.equal(a, b) for a, b in zip(feats["vhr_rgbn"], again)), "encode must not mask"


def test_rejects_sensors_it_was_not_built_for():
    model = create_recipe("ofa", _sensors(), "tiny")
    with pytest.raises(KeyError, match="naip"):
        model({"naip": torch.randn(2, 4, 32, 32)})


def test_base_preset_matches_paper_size():
    paper_inputs = [
        "s1_grd",
        get_sensor("s2_l1c").select(["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B11", "B12"]),
        get_sensor("naip").select(["R", "G", "B"]),
        "gaofen2",
        "enmap",
    ]
    model = create_recipe("ofa", paper_inputs, "base", device="meta")
    vit_b = sum(p.numel() for p in model.encoder.parameters())
    assert abs(vit_b - 85.8e6) / 85.8e6 < 0.02, "base trunk should be ViT-B (85.8 M without patch embedding)"


def test_tiny_preset_learns_on_real_chips():
    model = create_recipe("ofa", _sensors(), "tiny")
    batch = _batch(n=8)

    before, after = loss_before_after(model, batch, steps=30)
    assert after["loss"] < 0.7 * before["loss"], (before["loss"], after["loss"])
