"""The ``mars`` recipe on real chips: optical from the RMNP RGB scene, SAR from Sentinel-1 VV (dB).

The two come from different places (the sample set has no VHR SAR-optical pair), which
does not matter for what is tested here: shapes, masking, gradients, missing modalities,
initial and teacher weights from real timm SwinV2 files, and that training on a fixed
batch lowers the loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import earthray.recipes.mars as mars_module
from chips import loss_at, loss_before_after, real_chips, sgd_steps
from earthray.bundle import load_bundle, save_bundle
from earthray.models.pretrained import WeightsError
from earthray.recipes import create_recipe
from earthray.sensors import get_sensor

OPTICAL, SAR = "vhr_rgb", "s1_grd_db"
TINY_SWINV2 = dict(img_size=64, embed_dim=16, depths=(1, 1, 1), num_heads=(1, 2, 4))
"""A timm SwinV2 of the MaRS tiny preset's widths (window 8 where the preset uses 4: SwinV2's
position bias does not depend on the window)."""


def swinv2_file(path: Path, seed: int, **overrides) -> dict[str, torch.Tensor]:
    """A real timm SwinV2 (random weights: no downloads here) saved as safetensors; returns its state dict."""
    torch.manual_seed(seed)
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, **{**TINY_SWINV2, **overrides})
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """Two different SwinV2 files: one for the encoders, one for the teacher."""
    d = tmp_path_factory.mktemp("swinv2")
    return {name: (d / f"{name}.safetensors", swinv2_file(d / f"{name}.safetensors", seed))
            for name, seed in (("init", 11), ("teacher", 12))}


@pytest.fixture(scope="module")
def teacher_file(weights) -> str:
    return str(weights["teacher"][0])


def _sensors():
    return [get_sensor(OPTICAL), get_sensor(SAR).select(["VV"])]


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return {OPTICAL: real_chips(OPTICAL, None, 64, 4), SAR: real_chips(SAR, ["VV"], 64, 4)}


def _model(**overrides):
    torch.manual_seed(0)
    return create_recipe("mars", _sensors(), "tiny", **overrides)


def test_loss_dict_names_shapes_and_dtypes(batch, teacher_file):
    out = loss_at(_model(teacher_weights=teacher_file), batch)
    assert set(out) == {
        f"mim_{OPTICAL}", f"mim_{SAR}", "cgcl", "cgcl_patch", "cgcl_image", "cgcl_cross", "distill", "loss",
    }
    for name, value in out.items():
        assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value), name
    assert "distill" not in loss_at(_model(teacher_weights=teacher_file, teacher_weight=0.0), batch)


def test_no_teacher_without_teacher_weights(batch):
    """A frozen copy of the random initialisation would only pull the student toward its own random features."""
    for model in (_model(), _model(teacher_weight=2.0)):
        assert not hasattr(model, "teacher") and not hasattr(model, "distill")
        assert not any(k.startswith(("teacher.", "distill.")) for k in model.state_dict())
        assert "distill" not in loss_at(model, batch)
        assert model.stateful_tensors() == {}  # a frozen teacher never changes: no step-end state


def test_encoders_and_teacher_start_from_the_timm_files(weights, teacher_file):
    init_path, init = weights["init"]
    teacher = weights["teacher"][1]
    model = _model(init_weights=str(init_path), teacher_weights=teacher_file)
    fresh = _model()
    mirrored = {"teacher.embed": f"embed.{OPTICAL}", "teacher.encoder": f"encoders.{OPTICAL}"}
    for branch, file in [(f"embed.{OPTICAL}", init), (f"encoders.{OPTICAL}", init), (f"embed.{SAR}", init),
                         (f"encoders.{SAR}", init), ("teacher.embed", teacher), ("teacher.encoder", teacher)]:
        mine = {k[len(branch) + 1:]: v for k, v in model.state_dict().items() if k.startswith(branch + ".")}
        assert mine, branch
        for key, value in mine.items():
            timm_key = "patch_embed." + key if "embed" in branch.split(".") else key.replace("stages.", "layers.", 1)
            if key == "mask_token":  # SimMIM's own: timm has none, so it keeps its initial value
                assert timm_key not in file
                continue
            if branch == f"embed.{SAR}" and key == "proj.weight":  # 1 SAR band from the 3 RGB kernels
                expected = file[timm_key].sum(dim=1, keepdim=True)
            else:
                expected = file[timm_key]
            assert torch.equal(value, expected), (branch, key)
            if key.endswith("weight") and value.dim() >= 2:  # random matrices differ from a fresh build's
                assert not torch.equal(value, fresh.state_dict()[f"{mirrored.get(branch, branch)}.{key}"]), key
    key = "stages.0.blocks.0.attn.qkv.weight"
    assert not torch.equal(model.teacher.encoder.get_buffer(key), model.encoders[OPTICAL].get_parameter(key))


def test_patch_kernel_is_spread_over_other_band_counts(weights):
    """Six bands from an RGB kernel: each gets the RGB sum over 6, so a flat image responds as a flat RGB one."""
    init_path, init = weights["init"]
    six = get_sensor("landsat7_etm").select(["B1", "B2", "B3", "B4", "B5", "B7"])
    torch.manual_seed(0)
    model = create_recipe("mars", [six, get_sensor(SAR).select(["VV"])], "tiny", init_weights=str(init_path))
    kernel = model.embed[six.name].proj.weight
    rgb = init["patch_embed.proj.weight"]
    assert kernel.shape == (16, 6, 4, 4)
    torch.testing.assert_close(kernel, (rgb.sum(1, keepdim=True) / 6).repeat(1, 6, 1, 1))
    flat = torch.full((1, 6, 4, 4), 0.7)
    torch.testing.assert_close(torch.nn.functional.conv2d(flat, kernel),
                               torch.nn.functional.conv2d(torch.full((1, 3, 4, 4), 0.7), rgb))


def test_a_file_that_does_not_fit_is_a_clear_error(tmp_path, weights):
    init_path, init = weights["init"]
    wide = tmp_path / "wide.safetensors"
    swinv2_file(wide, 0, embed_dim=32)
    with pytest.raises(WeightsError, match=r"wide.safetensors: 'patch_embed.proj.weight' has shape \(32, 3, 4, 4\)"):
        _model(init_weights=str(wide))
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in init.items() if k != "layers.1.blocks.0.attn.qkv.weight"}, str(missing))
    with pytest.raises(WeightsError, match=r"missing.safetensors: lacks 'layers.1.blocks.0.attn.qkv.weight'"):
        _model(teacher_weights=str(missing))
    deeper = tmp_path / "deeper.safetensors"
    swinv2_file(deeper, 0, depths=(1, 1, 2), num_classes=10)  # the classifier is ignored, the extra block is not
    with pytest.raises(WeightsError, match=r"deeper.safetensors: 'layers.2.blocks.1.[a-z_.0-9]+' has no place"):
        _model(init_weights=str(deeper))
    garbage = tmp_path / "model.pth"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match=r"model.pth: not a safetensors file"):
        _model(init_weights=str(garbage))
    with pytest.raises(WeightsError, match=r"nowhere.safetensors: no such weights file"):
        _model(init_weights=str(tmp_path / "nowhere.safetensors"))


def test_a_bundle_rebuilds_without_the_weight_files(tmp_path, weights, batch):
    """The bundle holds every weight: loading it never reads (or needs) the initial-weight files."""
    init = tmp_path / "init.safetensors"
    teacher = tmp_path / "teacher.safetensors"
    swinv2_file(init, 1)
    swinv2_file(teacher, 2)
    model = _model(init_weights=str(init), teacher_weights=str(teacher))
    sensors = _sensors()
    save_bundle(tmp_path / "b", model, recipe="mars", preset="tiny", config=model.config, sensors=sensors,
                normalisation={s.name: {"mean": [0.0] * len(s.bands), "std": [1.0] * len(s.bands)} for s in sensors},
                input_size=64)
    init.unlink()
    teacher.unlink()
    loaded = load_bundle(tmp_path / "b").model
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_sensor_roles_come_from_sensor_kinds():
    model = _model()
    assert (model.optical, model.sar) == (OPTICAL, SAR)
    assert model.decoders[OPTICAL].out_chans == 3 and model.decoders[SAR].out_chans == 1
    with pytest.raises(ValueError, match="sar"):
        create_recipe("mars", ["vhr_rgb", "dem"], "tiny")


def test_gradients_reach_every_trainable_parameter_and_never_the_teacher(batch, teacher_file):
    model = _model(teacher_weights=teacher_file).train()
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


def test_tiny_preset_lowers_the_loss_on_a_fixed_batch_of_real_chips(batch, teacher_file):
    """Before/after on the same masks (same seed). The chips are unpaired, so CGCL can only
    fall to chance; reconstruction and distillation must really improve."""
    model = _model(teacher_weights=teacher_file)
    before, after = loss_before_after(model, batch)
    summary = {k: (round(before[k].item(), 3), round(after[k].item(), 3)) for k in before}
    assert after["loss"] < 0.85 * before["loss"], summary
    for name in (f"mim_{OPTICAL}", f"mim_{SAR}"):
        assert after[name] < 0.92 * before[name], summary
    assert after["distill"] < 0.8 * before["distill"], summary
