"""msGFM recipe: shared MoE Swin, per-sensor SimMIM decoders, cross-sensor targets, on real sample chips.

The RMNP RGB + DEM chips are a real co-registered pair (the paper pairs RGB and DSM the
same way); Sentinel-1 and Sentinel-2 chips come from other places, so in the mixed batch
they sit on rows of their own (``.present``), as a flat batch of sample groups would hold them.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import save_file

import earthray.recipes.msgfm as msgfm_module
from chips import loss_before_after, real_chip_group, real_chips, sample_bands
from earthray.models.moe import MoEFFN
from earthray.models.pretrained import WeightsError
from earthray.recipes import count_parameters, create_recipe
from earthray.recipes.msgfm import MsGFM
from earthray.sensors import get_sensor

SENSORS = ["vhr_rgb", "dem", "s1_grd_db", "s2_l1c"]
SIZE = 64


def _sensors():
    return [get_sensor(s).select(sample_bands(s)) for s in SENSORS]


def _pair(n: int) -> dict[str, torch.Tensor]:
    return real_chip_group({"vhr_rgb": None, "dem": None}, SIZE, n)


def _mixed_batch(n_pair: int = 4, n_single: int = 4) -> dict[str, torch.Tensor]:
    """Rows [pair | S1 only | S2 only]; absent rows hold zeros, as a pipeline's nulls would."""
    rows = n_pair + 2 * n_single
    pair = _pair(n_pair)
    singles = {"s1_grd_db": real_chips("s1_grd_db", None, SIZE, n_single),
               "s2_l1c": real_chips("s2_l1c", None, SIZE, n_single)}
    spans = {"vhr_rgb": (0, n_pair), "dem": (0, n_pair),
             "s1_grd_db": (n_pair, n_pair + n_single), "s2_l1c": (n_pair + n_single, rows)}
    batch = {}
    for s, (a, b) in spans.items():
        x = (pair | singles)[s]
        full = torch.zeros(rows, *x.shape[1:])
        full[a:b] = x
        present = torch.zeros(rows, dtype=torch.bool)
        present[a:b] = True
        batch[s], batch[f"{s}.present"] = full, present
    return batch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def masks(monkeypatch):
    """The SimMIM masks the recipe draws, in order (the first is the first sensor's)."""
    drawn = []

    def spy(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    real = msgfm_module.simmim_mask
    monkeypatch.setattr(msgfm_module, "simmim_mask", spy)
    return drawn


def _pixels(mask: torch.Tensor, patch: int = 4) -> torch.Tensor:
    return mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2)


def test_loss_terms_on_a_mixed_batch():
    model = create_recipe("msgfm", _sensors(), "tiny")
    out = model(_mixed_batch())
    assert set(out) == {f"recon/{s}" for s in SENSORS} | {"moe_aux", "loss"}
    for v in out.values():
        assert v.shape == () and v.dtype == torch.float32 and torch.isfinite(v)
    recon = torch.stack([out[f"recon/{s}"] for s in SENSORS]).mean()
    assert torch.allclose(out["loss"], recon + 0.01 * out["moe_aux"])


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A real timm Swin of the tiny teacher's widths at timm's own 224 px / window 7 (random weights:
    no downloads here), with its classifier, as a user would save it."""
    torch.manual_seed(21)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                              **MsGFM.presets["tiny"]["teacher_kwargs"])
    path = tmp_path_factory.mktemp("gfm") / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path), model.state_dict()


def test_distillation_teacher_comes_from_a_local_timm_file(teacher_file, tmp_path):
    path, state = teacher_file
    model = create_recipe("msgfm", _sensors(), "tiny", distill=True, teacher_weights=path)
    loaded = model.teacher.state_dict()
    tables = [k for k in loaded if k.endswith("relative_position_bias_table")]
    assert tables and all(loaded[k].shape != state[k].shape for k in tables)  # resized from window 7 to 4
    same = [k for k in loaded if k not in tables]
    assert same and all(torch.equal(loaded[k], state[k]) for k in same)
    assert not any(k.startswith("head.") for k in loaded)
    assert model.stateful_tensors() == {}

    with pytest.raises(ValueError, match="distill needs a teacher's weights"):
        create_recipe("msgfm", _sensors(), "tiny", distill=True)
    bad = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if k != "layers.0.blocks.1.mlp.fc1.weight"}, str(bad))
    with pytest.raises(WeightsError, match="partial.safetensors: lacks 'layers.0.blocks.1.mlp.fc1.weight'"):
        create_recipe("msgfm", _sensors(), "tiny", distill=True, teacher_weights=str(bad))


def test_gradients_reach_all_trainable_parameters_and_never_the_teacher(teacher_file):
    model = create_recipe("msgfm", _sensors(), "tiny", distill=True, teacher_weights=teacher_file[0])
    model.train()
    assert not model.teacher.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    out = model(_mixed_batch())  # 4 rows per sensor: enough tokens that every expert of every MoE layer gets some
    assert "distill" in out and out["distill"] > 0
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing
    assert len(model.moe_layers) == 3 and all(isinstance(m, MoEFFN) for m in model.moe_layers)


def _gradient_order(cross_sensor_ratio: float) -> list[str]:
    """The order in which parameters receive their gradients, with every token routed to expert 0."""
    torch.manual_seed(0)
    model = create_recipe("msgfm", ["vhr_rgb", "dem"], "tiny", cross_sensor_ratio=cross_sensor_ratio)
    for moe in model.moe_layers:
        moe.router = torch.nn.Linear(moe.router.in_features, moe.num_experts)
        torch.nn.init.zeros_(moe.router.weight)
        torch.nn.init.constant_(moe.router.bias, 0.0)
        moe.router.bias.data[0] = 10.0
    order: list[str] = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: order.append(name))
    torch.manual_seed(1)
    model(_pair(2))["loss"].backward()
    assert all(m.tokens_per_expert[1:].sum() == 0 for m in model.moe_layers)
    assert set(order) == {n for n, p in model.named_parameters() if p.requires_grad}
    return order


def test_routing_and_draws_never_change_which_parameters_get_gradients_or_when():
    """DeepSpeed reduces gradients across ranks parameter by parameter as they arrive: experts left
    without tokens and decoders no row was drawn for must still get their (zero) gradient, at the
    same point of the backward pass, or the ranks' reductions stop matching."""
    assert _gradient_order(0.0) == _gradient_order(1.0)


def test_masks_differ_between_sensors_and_follow_the_ratio(masks):
    model = create_recipe("msgfm", ["vhr_rgb", "dem"], "tiny")
    model(_pair(4))
    rgb, dem = masks
    assert rgb.shape == dem.shape == (4, 16, 16)
    assert not torch.equal(rgb, dem)
    blocks = math.ceil(16 * 0.6)
    assert (rgb.flatten(1).sum(1) == blocks * 16).all() and (dem.flatten(1).sum(1) == blocks * 16).all()


def test_cross_sensor_reconstruction_scores_only_masked_pixels_of_the_partner(masks):
    model = create_recipe("msgfm", ["vhr_rgb", "dem"], "tiny", cross_sensor_ratio=1.0)
    batch = _pair(4)
    batch["dem.valid"] = torch.ones(4, SIZE, SIZE, dtype=torch.bool)

    def rgb_term(b) -> torch.Tensor:
        torch.manual_seed(5)
        with torch.no_grad():
            return model(b)["recon/vhr_rgb"]

    ref = rgb_term(batch)
    rgb_mask = _pixels(masks[0])
    outside = dict(batch, dem=torch.where(rgb_mask[:, None], batch["dem"], batch["dem"] + 7.0))
    assert torch.equal(rgb_term(outside), ref), "unmasked pixels of the target must not count"
    inside = dict(batch, dem=torch.where(rgb_mask[:, None], batch["dem"] + 7.0, batch["dem"]))
    assert not torch.allclose(rgb_term(inside), ref), "with ratio 1 the RGB rows must reconstruct the DEM"
    first_two = (torch.arange(4) < 2)[:, None, None]
    valid = dict(batch, **{"dem.valid": ~(rgb_mask & first_two)})
    changed = dict(valid, dem=torch.where((rgb_mask & first_two)[:, None], batch["dem"] + 7.0, batch["dem"]))
    assert torch.equal(rgb_term(changed), rgb_term(valid)), "invalid target pixels must not count"

    partial = dict(batch, **{"dem.present": torch.tensor([True, False, False, False])})
    rows_1_3 = (torch.arange(4) > 0)[:, None, None]
    changed = dict(partial, dem=torch.where((rgb_mask & rows_1_3)[:, None], batch["dem"] + 7.0, batch["dem"]))
    assert torch.equal(rgb_term(changed), rgb_term(partial)), "rows without a partner must reconstruct themselves"


def test_without_cross_ratio_each_sensor_reconstructs_itself():
    model = create_recipe("msgfm", ["vhr_rgb", "dem"], "tiny", cross_sensor_ratio=0.0)
    batch = _pair(4)
    torch.manual_seed(5)
    ref = model(batch)["recon/vhr_rgb"]
    torch.manual_seed(5)
    changed = model(dict(batch, dem=batch["dem"] + 7.0))["recon/vhr_rgb"]
    assert torch.equal(changed, ref)


def test_cross_sensor_ratio_is_a_per_row_probability():
    """Each of the 24 RGB rows (all with a DEM partner) reconstructs the DEM with probability 0.5, drawn row by
    row: seeded draws, so the bounds below hold on every run. Over 5 batches the count is Binomial(120, 0.5),
    within 4 standard deviations (about 22) of 60, and no batch goes all one way (as one draw per batch would)."""
    model = create_recipe("msgfm", ["vhr_rgb", "dem"], "tiny", cross_sensor_ratio=0.5)
    rows = {}
    for name, dec in model.decoders.items():
        dec.register_forward_hook(lambda m, inp, out, name=name: rows.setdefault(name, []).append(inp[0].shape[0]))
    pair = _pair(8)
    batch = {s: x.repeat(3, 1, 1, 1) for s, x in pair.items()}
    crossed = []
    for seed in range(5):
        rows.clear()
        torch.manual_seed(seed)
        with torch.no_grad():
            model(batch)
        own_rgb, cross_from_rgb = rows["vhr_rgb"][0], rows["dem"][0]
        assert own_rgb + cross_from_rgb == 24
        crossed.append(cross_from_rgb)
    assert all(0 < n < 24 for n in crossed), crossed
    assert abs(sum(crossed) - 60) <= 4 * math.sqrt(120 * 0.5 * 0.5), crossed


def test_swin_v2_variant_trains():
    model = create_recipe("msgfm", ["vhr_rgb", "dem"], "tiny", v2=True)
    out = model(_pair(2))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert model.encoder.stages[0].blocks[0].norm1.weight.grad is not None


def test_encode_is_unmasked_multiscale_and_checks_size():
    model = create_recipe("msgfm", _sensors(), "tiny").eval()
    batch = _pair(2)
    feats = model.encode(batch)
    assert [tuple(f.shape) for f in feats["dem"]] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4)]
    again = model.encode(batch)
    assert all(torch.equal(a, b) for a, b in zip(feats["vhr_rgb"], again["vhr_rgb"]))
    with pytest.raises(ValueError, match="64"):
        model({"vhr_rgb": torch.randn(2, 3, 32, 32)})


def test_base_preset_is_the_papers_configuration_and_size():
    paper_inputs = ["vhr_rgb", "s2_l1c", "s1_grd", "dem"]
    model = create_recipe("msgfm", paper_inputs, "base", device="meta")
    c = model.config
    assert (c.img_size, c.window_size, c.mask_patch, c.mask_ratio) == (192, 6, 32, 0.6)
    assert (c.num_experts, c.top_k, c.capacity_factor, c.aux_weight) == (8, 1, 1.25, 0.01)
    where = [(si, bi) for si, st in enumerate(model.encoder.stages) for bi, b in enumerate(st.blocks)
             if isinstance(b.mlp, MoEFFN)]
    assert where == [(2, b) for b in range(1, 18, 2)]
    assert all(len(m.experts) == 8 for m in model.moe_layers)

    active = count_parameters("msgfm", paper_inputs, "base", comparable=True)
    assert abs(active - MsGFM.paper_params["base"]) / MsGFM.paper_params["base"] < 0.10
    experts = sum(p.numel() for m in model.moe_layers for e in m.experts for p in e.parameters())
    assert count_parameters("msgfm", paper_inputs, "base") > active + 0.8 * experts  # all 8 experts are stored


def test_tiny_preset_learns_on_real_chips():
    model = create_recipe("msgfm", _sensors(), "tiny")
    batch = _mixed_batch()

    before, after = loss_before_after(model, batch, steps=20)
    assert after["loss"] < 0.7 * before["loss"], (before["loss"], after["loss"])
