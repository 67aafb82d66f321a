"""The ``skysense`` recipe on real chips: VHR RGB (RMNP), a Sentinel-2 L1C date (T55HFA) and a
Sentinel-1 VV time series (Camargue, dates from the ENVI band names).

The three modalities come from different places (the sample set has no co-located
triple); lon/lat are the Sentinel-1 chips' centres. Sentinel-2 has one real date, padded
to two, and one Sentinel-1 series is padded, so the padding paths see real data.
"""

from __future__ import annotations

import re
from datetime import datetime

import numpy as np
import pytest
import rasterio
import torch
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from chips import SAMPLE, loss_at, loss_before_after, real_chips, sample_bands, sgd_steps
from earthray.recipes import count_parameters, create_recipe, resolve_config
from earthray.recipes.skysense import assign_roles
from earthray.sensors import get_sensor

HR, MS, SAR = "vhr_rgb", "s2_l1c", "s1_grd_db"
S1_SERIES = SAMPLE / "s1_camargue" / "S1_GRD_VV_France_Camargue_2017-01-01_2017-12-31"
S2_DOY = datetime(2020, 10, 11).timetuple().tm_yday


def _sensors():
    return [get_sensor(HR), get_sensor(MS).select(sample_bands(MS)), get_sensor(SAR).select(["VV"])]


def s1_series(size: int, n: int, band_indexes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` windows of the S1 time series: (n, T, 1, size, size) normalised, doy (n, T), lonlat (n, 2)."""
    sensor = get_sensor(SAR).select(["VV"])
    with rasterio.open(S1_SERIES) as ds:
        dates = [re.search(r"_(\d{8})T", ds.descriptions[i - 1]).group(1) for i in band_indexes]
        doy = [datetime.strptime(d, "%Y%m%d").timetuple().tm_yday for d in dates]
        chips, centres = [], []
        for row in range(0, ds.height - size + 1, size):
            for col in range(0, ds.width - size + 1, size):
                if len(chips) == n:
                    break
                a = ds.read(band_indexes, window=Window(col, row, size, size))
                valid = np.isfinite(a) & (a != ds.nodata)
                chips.append(np.where(valid[:, None], sensor.normalise(a[:, None]), 0.0))
                centres.append(ds.xy(row + size // 2, col + size // 2))
        lon, lat = warp_transform(ds.crs, "EPSG:4326", [c[0] for c in centres], [c[1] for c in centres])
    x = torch.from_numpy(np.stack(chips).astype(np.float32))
    return x, torch.tensor([doy] * n, dtype=torch.long), torch.tensor(list(zip(lon, lat)), dtype=torch.float32)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    s1, s1_doy, lonlat = s1_series(16, 4, [1, 41, 81, 121])
    s1_tmask = torch.ones(4, 4, dtype=torch.bool)
    s1_tmask[3, 3] = False
    s2 = real_chips(MS, None, 16, 4)
    return {
        HR: real_chips(HR, None, 64, 4),
        MS: torch.stack([s2, torch.zeros_like(s2)], dim=1),
        f"{MS}.doy": torch.tensor([[S2_DOY, 0]] * 4),
        f"{MS}.tmask": torch.tensor([[True, False]] * 4),
        SAR: s1,
        f"{SAR}.doy": s1_doy,
        f"{SAR}.tmask": s1_tmask,
        "lonlat": lonlat,
    }


def _model(**overrides):
    torch.manual_seed(0)
    return create_recipe("skysense", _sensors(), "tiny", **overrides)


def _without(batch, sensor):
    return {k: v for k, v in batch.items() if k != sensor and not k.startswith(f"{sensor}.")}


def test_real_batch_is_what_it_claims(batch):
    assert batch[SAR].shape == (4, 4, 1, 16, 16) and batch[MS].shape == (4, 2, 12, 16, 16)
    assert batch[f"{SAR}.doy"][0].tolist() == sorted(batch[f"{SAR}.doy"][0].tolist())
    lon, lat = batch["lonlat"][0].tolist()
    assert 4.0 < lon < 5.5 and 43.0 < lat < 44.0  # the Camargue


def test_roles_follow_kind_and_resolution():
    assert assign_roles(_sensors()) == {"hr": HR, "ms": MS, "sar": SAR}
    with pytest.raises(ValueError, match="one hr"):
        assign_roles([get_sensor("vhr_rgb"), get_sensor("naip")])
    with pytest.raises(ValueError, match="elevation"):
        assign_roles([get_sensor("dem")])


def test_named_roles_override_the_gsd_rule():
    """Sentinel-2's 10 m bands standing in for the HR view, as a co-located S1/S2 set needs."""
    s2_10m = get_sensor("s2_l2a_10m")
    s1 = get_sensor(SAR).select(["VV"])
    assert assign_roles([s2_10m, s1]) == {"ms": "s2_l2a_10m", "sar": SAR}
    assert assign_roles([s2_10m, s1], {"hr": "s2_l2a_10m"}) == {"hr": "s2_l2a_10m", "sar": SAR}
    # a named role frees the rule's slot: two 10 m optical sensors, one named hr, the other ms by GSD
    both = [s2_10m, get_sensor(MS).select(sample_bands(MS)), s1]
    assert assign_roles(both, {"hr": "s2_l2a_10m", "ms": None}) == {"hr": "s2_l2a_10m", "ms": MS, "sar": SAR}
    with pytest.raises(ValueError, match="one ms"):
        assign_roles(both)
    with pytest.raises(ValueError, match="hr_sensor 'naip' is not among"):
        assign_roles(both, {"hr": "naip"})
    with pytest.raises(ValueError, match="two roles"):
        assign_roles(both, {"hr": MS, "ms": MS})

    model = create_recipe("skysense", [s2_10m, s1], "tiny", hr_sensor="s2_l2a_10m", hr_img_size=32)
    assert model.roles == {"hr": "s2_l2a_10m", "sar": SAR}
    assert type(model.student.spatial["s2_l2a_10m"]).__name__ == "SwinEncoder"
    chips = real_chips("s2_l1c", ["B02", "B03", "B04", "B08"], 32, 2)
    out = loss_at(model, {"s2_l2a_10m": chips, SAR: real_chips(SAR, ["VV"], 16, 2)[:, None]})
    assert torch.isfinite(out["loss"]) and "mgcl_s2_l2a_10m" in out


def test_loss_dict_names_shapes_and_dtypes(batch):
    out = loss_at(_model(), batch)
    assert set(out) == {f"mgcl_{s}" for s in (HR, MS, SAR, "fusion")} | {"mgcl", "align", "loss"}
    for name, value in out.items():
        assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value), name
    torch.testing.assert_close(out["loss"], out["mgcl"] + out["align"])


def test_gradients_reach_the_student_and_never_the_teacher_or_prototypes(batch):
    model = _model().train()
    assert list(model.teacher.parameters()) == []
    assert not any(m.training for m in model.teacher.modules())
    assert "prototypes" in dict(model.prototypes.named_buffers())  # never partitioned by ZeRO-3
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    protos_before = model.prototypes.prototypes.detach().clone()
    sgd_steps(model, batch)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"student.spatial.{HR}.mask_token"}
    for name, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert torch.equal(model.prototypes.prototypes, protos_before)


def test_step_end_moves_teacher_by_ema_and_prototypes_of_seen_regions(batch):
    model = _model(teacher_momentum=0.75)
    optimiser = torch.optim.SGD(model.trainable_parameters(), lr=0.05)
    loss_at(model, batch)["loss"].backward()
    optimiser.step()
    teacher = {n: model.teacher.get_buffer(n).clone() for n, _ in model.student.named_parameters()}
    protos = model.prototypes.prototypes.detach().clone()
    center = model.dino["fusion"]["img"].center.clone()
    model.on_step_end(0)
    for name, s in model.student.named_parameters():
        assert torch.equal(model.teacher.get_buffer(name), 0.75 * teacher[name] + 0.25 * s.detach()), name
    seen = model.prototypes.regions(batch["lonlat"]).unique()
    moved = (model.prototypes.prototypes != protos).flatten(1).any(dim=1)
    assert moved.nonzero().flatten().tolist() == seen.tolist()
    assert not torch.equal(model.dino["fusion"]["img"].center, center)


def test_declared_state_is_what_the_step_end_hook_moves(batch):
    """``stateful_tensors`` names every state-dict entry the hook changes and nothing else."""
    model = _model()
    state = model.stateful_tensors()
    assert {k.split(".")[0] for k in state} == {"teacher", "prototypes", "dino"}
    everything = model.state_dict(keep_vars=True)
    assert all(everything[k] is v for k, v in state.items())
    optimiser = torch.optim.SGD(model.trainable_parameters(), lr=0.05)
    loss_at(model, batch)["loss"].backward()
    optimiser.step()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    held = model.held_bytes()
    model.on_step_end(1)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= set(state) and "prototypes.prototypes" in changed
    assert any(k.startswith("teacher.") for k in changed) and any(k.endswith(".center") for k in changed)
    assert model.held_bytes() < held  # the queued prototype updates are spent


def test_prototype_queue_holds_one_sum_per_region_however_many_micro_batches(batch):
    """Gradient accumulation collects many times before one step: the queue must not grow with it."""
    model = _model().train()
    queue = model.prototypes
    per_region = queue.prototypes[0].numel() * 4 + 8 + 4  # a float32 sum, an int64 region id, a float32 count
    regions = queue.regions(batch["lonlat"]).unique().numel()
    for i in range(1, 6):
        loss_at(model, batch, seed=i)
        assert queue.held_bytes() == regions * per_region, i
    single = _model().train()
    loss_at(single, batch, seed=1)
    initial = single.prototypes.prototypes.clone()
    single.prototypes.step()
    # five identical collections move the prototypes exactly as one does (a mean, not a sum)
    repeated = _model().train()
    for _ in range(5):
        loss_at(repeated, batch, seed=1)
    repeated.prototypes.step()
    torch.testing.assert_close(repeated.prototypes.prototypes, single.prototypes.prototypes)
    assert not torch.equal(initial, single.prototypes.prototypes)
    assert repeated.prototypes.held_bytes() == 0


def test_padded_dates_change_nothing(batch):
    model = _model()
    garbled = dict(batch)
    garbled[MS] = batch[MS].clone()
    garbled[MS][:, 1] = 7.0
    garbled[SAR] = batch[SAR].clone()
    garbled[SAR][3, 3] = -7.0
    expected, got = loss_at(model, batch), loss_at(model, garbled)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    model.eval()
    for name, maps in model.encode(batch).items():
        for a, b in zip(maps, model.encode(garbled)[name]):
            torch.testing.assert_close(a, b)


def test_encode_shapes_with_every_modality(batch):
    model = _model().eval()
    feats = model.encode(batch)
    assert set(feats) == {HR, MS, SAR, "fusion", "fusion_geo"}
    assert [tuple(f.shape) for f in feats[HR]] == [(4, 16, 16, 16), (4, 32, 8, 8), (4, 64, 4, 4)]
    assert [tuple(f.shape) for f in feats[MS]] == [(4, 2, 32, 4, 4)]
    assert [tuple(f.shape) for f in feats[SAR]] == [(4, 4, 32, 4, 4)]
    assert (feats[MS][0][:, 1] == 0).all()  # the padded date
    assert tuple(feats["fusion"][0].shape) == (4, 32, 4, 4)
    assert tuple(feats["fusion_geo"][0].shape) == (4, 64, 4, 4)
    torch.testing.assert_close(feats["fusion_geo"][0][:, :32], feats["fusion"][0])


@pytest.mark.parametrize("missing", [HR, MS, SAR])
def test_any_modality_may_be_missing(batch, missing):
    model = _model()
    out = loss_at(model, _without(batch, missing))
    assert f"mgcl_{missing}" not in out and torch.isfinite(out["loss"])

    model.eval()
    full = model.encode(batch)
    dropped = model.encode(_without(batch, missing))
    assert set(dropped) == {HR, MS, SAR, "fusion", "fusion_geo"} - {missing}
    for name in {HR, MS, SAR} - {missing}:
        torch.testing.assert_close(dropped[name][-1], full[name][-1])
    assert torch.isfinite(dropped["fusion"][0]).all()
    assert not torch.allclose(dropped["fusion"][0], full["fusion"][0])

    absent = {**batch, f"{missing}.present": torch.zeros(4, dtype=torch.bool)}
    torch.testing.assert_close(model.encode(absent)["fusion"][0], dropped["fusion"][0])


def test_encode_works_with_one_modality_and_no_location(batch):
    model = _model().eval()
    only = {SAR: batch[SAR], f"{SAR}.doy": batch[f"{SAR}.doy"], f"{SAR}.tmask": batch[f"{SAR}.tmask"]}
    feats = model.encode(only)
    assert set(feats) == {SAR, "fusion"}
    assert torch.isfinite(feats["fusion"][0]).all()


def test_downstream_weights_are_the_ema_teacher(batch):
    model = _model()
    optimiser = torch.optim.SGD(model.trainable_parameters(), lr=0.05)
    loss_at(model, batch)["loss"].backward()
    optimiser.step()
    model.on_step_end(1)
    student = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    assert model.prepare_downstream() == "ema_teacher"
    differs = 0
    for name, p in model.student.named_parameters():
        assert torch.equal(p, model.teacher.get_buffer(name)), name
        differs += not torch.equal(p, student[name])
    assert differs > 0


def test_huge_preset_is_the_papers_2_06_billion_parameters():
    config = resolve_config("skysense", "huge")
    swin_h, vit_l = (352, (2, 2, 18, 2)), (1024, 24)
    assert (config.hr_embed_dim, config.hr_depths) == swin_h and (config.ts_embed_dim, config.ts_depth) == vit_l
    assert config.region_grid[0] * config.region_grid[1] == 4096 and config.num_prototypes == 100
    n = count_parameters("skysense", _sensors(), "huge", comparable=True)
    assert abs(n - 2.06e9) / 2.06e9 < 0.10, n
    protos = 4096 * 100 * config.dim
    assert n == count_parameters("skysense", _sensors(), "huge") + protos  # the prototypes are a buffer


def test_tiny_preset_lowers_the_loss_on_a_fixed_batch_of_real_chips(batch):
    """Before/after on the same augmented views (same seed)."""
    model = _model()
    before, after = loss_before_after(model, batch)
    summary = {k: (round(before[k].item(), 3), round(after[k].item(), 3)) for k in before}
    assert after["loss"] < 0.7 * before["loss"], summary
    assert after["mgcl"] < 0.8 * before["mgcl"] and after["align"] < 0.6 * before["align"], summary
