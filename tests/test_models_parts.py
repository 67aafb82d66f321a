"""Shared model parts: patch embeddings, masks, Swin/ViT encoders, decoders, MoE."""

from __future__ import annotations

import math

import pytest
import torch

from chips import real_chips
from earthray.models.backbones import SwinEncoder, ViTEncoder
from earthray.models.decoders import MAEDecoder, SimMIMDecoder, patchify, unpatchify
from earthray.models.masking import random_masking, simmim_mask
from earthray.models.moe import MoEFFN, convert_swin_mlp_to_moe, moe_aux_loss
from earthray.models.patch_embed import MultiSensorPatchEmbed, SensorPatchEmbed


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_sensor_patch_embed_is_channels_last_grid_for_any_size():
    pe = SensorPatchEmbed(in_chans=4, embed_dim=24, patch_size=8)
    for h, w in [(32, 32), (48, 16)]:
        out = pe(torch.randn(2, 4, h, w))
        assert out.shape == (2, h // 8, w // 8, 24) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="bands"):
        pe(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        pe(torch.randn(2, 4, 30, 32))


def test_multi_sensor_patch_embed_routes_by_sensor():
    pe = MultiSensorPatchEmbed({"s1_grd": 2, "s1_grd_db": 2, "enmap": 224}, embed_dim=16, patch_size=4)
    assert pe(torch.randn(3, 224, 16, 16), "enmap").shape == (3, 4, 4, 16)
    x, y = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        pe.embeds["s1_grd"].proj.weight.zero_()
    assert torch.allclose(pe(x, "s1_grd"), pe(y, "s1_grd"))
    assert not torch.allclose(pe(x, "s1_grd_db"), pe(y, "s1_grd_db"))
    with pytest.raises(KeyError, match="naip"):
        pe(torch.randn(1, 4, 8, 8), "naip")


def test_simmim_mask_blocks_ratio_and_determinism():
    mask = simmim_mask(5, (48, 48), mask_patch=32, patch_size=4, ratio=0.6)
    assert mask.shape == (5, 48, 48) and mask.dtype == torch.bool
    blocks = mask.view(5, 6, 8, 6, 8)
    assert (blocks == blocks[:, :, :1, :, :1]).all(), "not constant over 32 px blocks"
    assert (blocks[:, :, 0, :, 0].flatten(1).sum(1) == math.ceil(36 * 0.6)).all()
    assert not torch.equal(mask[0], mask[1])
    a = simmim_mask(2, (16, 16), 16, 4, 0.5, generator=torch.Generator().manual_seed(3))
    b = simmim_mask(2, (16, 16), 16, 4, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"token grid \(10, 10\) is not divisible into 4x4-token mask blocks"):
        simmim_mask(1, (10, 10), 16, 4, 0.6)


def test_random_masking_keeps_exactly_the_unmasked_tokens():
    keep, mask, restore = random_masking(4, 49, 0.75)
    assert keep.shape == (4, 12) and keep.dtype == torch.long
    assert mask.shape == (4, 49) and mask.dtype == torch.bool and restore.shape == (4, 49)
    assert (mask.sum(1) == 49 - 12).all()
    assert not mask.gather(1, keep).any()
    tokens = torch.randn(4, 49, 3)
    kept = tokens.gather(1, keep[..., None].expand(-1, -1, 3))
    filler = torch.zeros(4, 49 - 12, 3)
    back = torch.cat([kept, filler], 1).gather(1, restore[..., None].expand(-1, -1, 3))
    assert torch.equal(back[~mask], tokens[~mask])
    assert (back[mask] == 0).all()


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("img,window", [(32, 4), (48, 6)])
def test_swin_encoder_shapes_for_small_images(v2, img, window):
    enc = SwinEncoder(img, 4, 16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=window, v2=v2)
    assert enc.out_dims == [16, 32, 64] and enc.out_strides == [4, 8, 16]
    feats = enc(torch.randn(2, img // 4, img // 4, 16))
    assert [tuple(f.shape) for f in feats] == [
        (2, img // s, img // s, d) for s, d in zip(enc.out_strides, enc.out_dims)
    ]
    with pytest.raises(ValueError, match="grid"):
        enc(torch.randn(2, img // 4 + 2, img // 4 + 2, 16))


def test_swin_mask_token_hides_masked_tokens():
    enc = SwinEncoder(32, 4, 16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    tokens = torch.randn(2, 8, 8, 16)
    mask = simmim_mask(2, (8, 8), 16, 4, 0.5)
    changed = tokens + 5.0 * mask[..., None]
    out, out_changed = enc(tokens, mask), enc(changed, mask)
    for a, b in zip(out, out_changed):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(enc(tokens)[-1], enc(changed)[-1])
    assert torch.allclose(enc(tokens, torch.zeros_like(mask))[-1], enc(tokens)[-1])


def test_vit_encoder_drops_tokens_after_adding_positions():
    enc = ViTEncoder(num_tokens=16, embed_dim=32, depth=4, num_heads=4).eval()
    tokens = torch.randn(2, 16, 32)
    keep, mask, _ = random_masking(2, 16, 0.75)
    out = enc(tokens, keep)
    assert out.shape == (2, 4, 32)
    dropped_changed = torch.where(mask[..., None], torch.randn_like(tokens), tokens)
    assert torch.allclose(enc(dropped_changed, keep), out, atol=1e-6)
    same_content = tokens[:, :1].expand(-1, 16, -1)
    moved = enc(same_content, torch.tensor([[0, 1], [5, 10]]))
    assert not torch.allclose(moved[0], moved[1], atol=1e-4), "positions are not added before dropping"
    assert enc(tokens).shape == (2, 16, 32)
    grids = enc.forward_grids(tokens)
    assert [tuple(g.shape) for g in grids] == [(2, 4, 4, 32)] * 4
    assert torch.allclose(grids[-1], enc(tokens).reshape(2, 4, 4, 32), atol=1e-6)


def test_patchify_layout_and_round_trip():
    img = torch.randn(2, 3, 16, 24)
    patches = patchify(img, 8)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    row, col = divmod(4, 3)
    block = img[:, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]
    assert torch.equal(patches[:, 4], block.permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(unpatchify(patches, 8, (2, 3), 3), img)


def test_simmim_decoder_returns_image_at_input_resolution():
    dec = SimMIMDecoder(in_dim=64, out_chans=13, stride=16)
    out = dec(torch.randn(2, 4, 4, 64))
    assert out.shape == (2, 13, 64, 64) and out.dtype == torch.float32


def test_mae_decoder_predicts_every_patch():
    keep, _, restore = random_masking(3, 16, 0.75)
    dec = MAEDecoder(embed_dim=48, decoder_dim=32, depth=1, num_heads=2, num_tokens=16, patch_size=8, out_chans=5)
    out = dec(torch.randn(3, keep.shape[1], 48), restore)
    assert out.shape == (3, 16, 8 * 8 * 5)


def _forced(moe: MoEFFN, expert: int) -> None:
    """Make every token of a positive input prefer ``expert``."""
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[expert] = 1.0


def test_moe_top1_capacity_drops_overflow_tokens():
    moe = MoEFFN(dim=8, hidden_dim=16, num_experts=4, capacity_factor=1.25)
    x = torch.rand(2, 32, 8) + 0.1
    _forced(moe, 2)
    out = moe(x)
    cap = moe.capacity(64)
    assert cap == 20
    assert moe.tokens_per_expert.tolist() == [0, 0, cap, 0]
    flat_out, flat_x = out.reshape(64, 8), x.reshape(64, 8)
    gate = moe.router(flat_x).softmax(-1)[:, 2:3]
    assert torch.allclose(flat_out[:cap], moe.experts[2](flat_x[:cap]) * gate[:cap], atol=1e-6)
    assert (flat_out[cap:] == 0).all(), "overflow tokens must pass through with zero expert output"


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_no_expert_exceeds_capacity(top_k):
    moe = MoEFFN(dim=8, hidden_dim=16, num_experts=4, capacity_factor=1.0, top_k=top_k)
    with torch.no_grad():
        moe.router.weight.mul_(50)
    moe(torch.randn(96, 8))
    assert moe.tokens_per_expert.max() <= moe.capacity(96)
    assert moe.tokens_per_expert.sum() <= 96 * top_k


def test_moe_aux_loss_rises_for_unbalanced_routing():
    moe = MoEFFN(dim=8, hidden_dim=16, num_experts=8)
    x = torch.rand(256, 8) + 0.1
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(8, 8))
    moe(torch.randn(256, 8))
    spread = moe.aux_loss.item()
    _forced(moe, 0)
    with torch.no_grad():
        moe.router.weight.mul_(20)
    moe(x)
    assert moe.tokens_per_expert[1:].sum() == 0
    assert moe.aux_loss.item() > 7.0 > 2.0 > spread
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_convert_swin_mlp_to_moe_every_other_block():
    enc = SwinEncoder(32, 4, 16, depths=[2, 4], num_heads=[2, 4], window_size=4)
    layers = convert_swin_mlp_to_moe(enc, every=2, num_experts=3)
    where = [(si, bi) for si, st in enumerate(enc.stages) for bi, b in enumerate(st.blocks)
             if isinstance(b.mlp, MoEFFN)]
    assert where == [(0, 1), (1, 1), (1, 3)] and len(layers) == 3
    feats = enc(torch.randn(2, 8, 8, 16))
    assert feats[-1].shape == (2, 4, 4, 32)
    assert torch.allclose(moe_aux_loss(enc), sum(m.aux_loss for m in layers))
    only = SwinEncoder(32, 4, 16, depths=[2, 4], num_heads=[2, 4], window_size=4)
    assert len(convert_swin_mlp_to_moe(only, every=2, stages=[1])) == 2


def test_swin_with_moe_learns_on_real_chips():
    """Every parameter of an MoE Swin + patch embed + SimMIM decoder gets a gradient."""
    x = real_chips("vhr_rgbn", None, 32, 4)
    pe = SensorPatchEmbed(4, 16, 4)
    enc = SwinEncoder(32, 4, 16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    layers = convert_swin_mlp_to_moe(enc, num_experts=2, capacity_factor=2.0)
    dec = SimMIMDecoder(32, 4, 8)
    mask = simmim_mask(4, (8, 8), 16, 4, 0.6)
    loss = (dec(enc(pe(x), mask)[-1]) - x).abs().mean() + 0.01 * moe_aux_loss(enc)
    loss.backward()
    assert all((m.tokens_per_expert > 0).all() for m in layers)
    for module in (pe, enc, dec):
        missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, missing
