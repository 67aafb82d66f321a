"""The MaRS and SkySense building blocks, each against what it promises (or a naive rewrite)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from earthray.models.contrastive import DINOHead, DINOLoss, cgcl_loss, cluster_assignment
from earthray.models.ema import ema_update_, frozen_copy
from earthray.models.geo_prototypes import GeoPrototypes, region_index, sinkhorn
from earthray.models.meta_attention import MetaModalityAttention
from earthray.models.temporal import TemporalFusion

# ----- Meta-Modality Attention --------------------------------------------------------------


def test_mma_keeps_shapes_and_intra_blocks_keep_modalities_apart():
    torch.manual_seed(0)
    mma = MetaModalityAttention(dim=16, depth=1, num_heads=2).eval()
    rgb, sar = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    out_rgb, out_sar = mma([rgb, sar])
    assert out_rgb.shape == rgb.shape and out_sar.shape == sar.shape
    assert out_rgb.dtype == torch.float32
    torch.testing.assert_close(mma([rgb, torch.randn_like(sar)])[0], out_rgb)


def test_mma_joint_blocks_mix_modalities_except_absent_ones():
    torch.manual_seed(0)
    mma = MetaModalityAttention(dim=16, depth=2, num_heads=2).eval()
    rgb, sar = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    other_sar = sar.clone()
    other_sar[1] = torch.randn(7, 16)
    # Without presence flags, sample 1's SAR reaches its optical tokens through the joint block.
    assert not torch.allclose(mma([rgb, sar])[0][1], mma([rgb, other_sar])[0][1])
    present = [torch.tensor([True, True]), torch.tensor([True, False])]
    torch.testing.assert_close(mma([rgb, other_sar], present)[0], mma([rgb, sar], present)[0])


# ----- temporal fusion ----------------------------------------------------------------------


def test_temporal_fusion_ignores_padded_dates_and_reads_day_of_year():
    torch.manual_seed(0)
    fusion = TemporalFusion(dim=16, depth=2, num_heads=2).eval()
    tokens = torch.randn(3, 6, 16)
    doy = torch.randint(1, 367, (3, 6))
    doy[:, 0] = 0  # the undated HR token
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[:, 4:] = False
    out = fusion(tokens, doy, valid)
    assert out.shape == (3, 16)

    padded_changed = tokens.clone()
    padded_changed[:, 4:] = torch.randn(3, 2, 16) * 10
    other_doy = doy.clone()
    other_doy[:, 4:] = 1
    torch.testing.assert_close(fusion(padded_changed, other_doy, valid), out)

    later = doy.clone()
    later[:, 1] = (doy[:, 1] + 100) % 366 + 1
    assert not torch.allclose(fusion(tokens, later, valid), out)

    (fusion(tokens, doy, valid) * torch.randn(3, 16)).sum().backward()
    rows_with_grad = set(fusion.date_embed.grad.abs().sum(dim=1).nonzero().flatten().tolist())
    assert rows_with_grad == set((doy[valid & (doy > 0)] - 1).tolist())


# ----- Sinkhorn, regions, geo prototypes ------------------------------------------------------


def test_sinkhorn_balances_columns_and_normalises_rows():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 60, 6, generator=g) * 0.2
    scores[..., 0] += 0.5  # every row prefers column 0
    assert (scores.argmax(dim=-1) == 0).all()
    q = sinkhorn(scores, epsilon=0.05, iterations=30)
    torch.testing.assert_close(q.sum(dim=-1), torch.ones(2, 60))
    torch.testing.assert_close(q.sum(dim=-2), torch.full((2, 6), 10.0), rtol=0.02, atol=0.0)
    assert (q >= 0).all()

    weight = torch.ones(2, 60)
    weight[:, 30:] = 0
    q = sinkhorn(scores, epsilon=0.05, iterations=30, row_weight=weight)
    assert (q[:, 30:] == 0).all()
    torch.testing.assert_close(q[:, :30].sum(dim=-1), torch.ones(2, 30))
    torch.testing.assert_close(q.sum(dim=-2), torch.full((2, 6), 5.0), rtol=0.02, atol=0.0)


def test_region_index_on_a_known_grid():
    lonlat = torch.tensor([[-180.0, -90.0], [179.9, 89.9], [0.0, 0.0], [180.0, 90.0], [-0.1, -0.1]])
    # 2 latitude rows x 4 longitude columns of 90 degrees each, row-major from (-90, -180).
    assert region_index(lonlat, (2, 4)).tolist() == [0, 7, 6, 4, 1]


def test_geo_prototypes_update_is_the_ema_of_assignment_weighted_means():
    torch.manual_seed(0)
    protos = GeoPrototypes((2, 4), num_prototypes=3, dim=8, momentum=0.9)
    assert not protos.prototypes.requires_grad
    before = protos.prototypes.detach().clone()
    features = torch.randn(2, 10, 8)
    region = protos.regions(torch.tensor([[10.0, 10.0], [20.0, 30.0]]))
    assert region.tolist() == [6, 6]

    assignment = protos.assign(features, region)
    per_sample = assignment.transpose(1, 2) @ features / assignment.sum(dim=1).unsqueeze(-1)
    expected = 0.9 * before[6] + 0.1 * per_sample.mean(dim=0)

    protos.collect(features, region)
    torch.testing.assert_close(protos.prototypes.detach(), before)  # nothing moves before step()
    protos.step()
    torch.testing.assert_close(protos.prototypes[6], expected)
    others = torch.arange(8) != 6
    torch.testing.assert_close(protos.prototypes[others], before[others])


def test_geo_context_attention_passes_gradients_to_features_only():
    torch.manual_seed(0)
    protos = GeoPrototypes((2, 4), num_prototypes=3, dim=8)
    features = torch.randn(2, 10, 8, requires_grad=True)
    region = torch.tensor([1, 6])
    context = protos.attend(features, region)
    assert context.shape == features.shape
    context.sum().backward()
    assert features.grad is not None and protos.prototypes.grad is None
    # Each output is a convex combination of its own region's prototypes.
    weights = torch.linalg.lstsq(protos.prototypes[1].T, context[0].detach().T).solution
    torch.testing.assert_close(weights.sum(dim=0), torch.ones(10), atol=1e-4, rtol=0)


# ----- EMA teacher ----------------------------------------------------------------------------


def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2))


def test_frozen_copy_holds_buffers_not_parameters_and_computes_the_same():
    student = _student()
    teacher = frozen_copy(student)
    assert list(teacher.parameters()) == []
    assert not any(m.training for m in teacher.modules())
    assert {n for n, _ in student.named_parameters()} == {n for n, _ in teacher.named_buffers()}
    assert set(teacher.state_dict()) == set(student.state_dict())
    x = torch.randn(3, 4)
    out = teacher(x)
    torch.testing.assert_close(out, student(x))
    assert not out.requires_grad

    tied = nn.ModuleDict({"a": nn.Linear(3, 3, bias=False), "b": nn.Linear(3, 3, bias=False)})
    tied["b"].weight = tied["a"].weight
    copy = frozen_copy(tied)
    assert copy["a"].weight is copy["b"].weight


def test_ema_update_moves_the_teacher_by_exactly_m_t_plus_one_minus_m_s():
    student = _student()
    teacher = frozen_copy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: teacher.get_buffer(n).clone() for n, _ in student.named_parameters()}
    ema_update_(teacher, student, 0.75)
    for name, s in student.named_parameters():
        assert torch.equal(teacher.get_buffer(name), 0.75 * before[name] + 0.25 * s.detach())
    ema_update_(teacher, student, 0.0)
    for name, s in student.named_parameters():
        assert torch.equal(teacher.get_buffer(name), s.detach())
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\], got 1.5"):
        ema_update_(teacher, student, 1.5)


# ----- contrastive losses -----------------------------------------------------------------------


def _naive_cgcl(z_a, z_b, temperatures, weights) -> dict[str, float]:
    """CGCL written out with loops over samples and patches, in float64 Python."""
    za, zb = z_a.double().tolist(), z_b.double().tolist()
    batch, tokens, dim = z_a.shape

    def cos(u, v):
        dot = sum(u[k] * v[k] for k in range(dim))
        return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(x * x for x in v)))

    def nce(positive, sims):
        return -sims[positive] + math.log(sum(math.exp(s) for s in sims))

    def mean_token(z, b):
        return [sum(z[b][i][k] for i in range(tokens)) / tokens for k in range(dim)]

    ga = [mean_token(za, b) for b in range(batch)]
    gb = [mean_token(zb, b) for b in range(batch)]
    t_patch, t_image, t_cross = temperatures

    patch_ab, patch_ba, cross_ab, cross_ba = [], [], [], []
    for b in range(batch):
        for i in range(tokens):
            patch_ab.append(nce(i, [cos(za[b][i], zb[b][j]) / t_patch for j in range(tokens)]))
            patch_ba.append(nce(i, [cos(zb[b][i], za[b][j]) / t_patch for j in range(tokens)]))
            cross_ab.append(nce(b, [cos(za[b][i], gb[c]) / t_cross for c in range(batch)]))
            cross_ba.append(nce(b, [cos(zb[b][i], ga[c]) / t_cross for c in range(batch)]))
    image_ab = [nce(b, [cos(ga[b], gb[c]) / t_image for c in range(batch)]) for b in range(batch)]
    image_ba = [nce(b, [cos(gb[b], ga[c]) / t_image for c in range(batch)]) for b in range(batch)]

    def mean(xs):
        return sum(xs) / len(xs)

    out = {
        "patch": 0.5 * (mean(patch_ab) + mean(patch_ba)),
        "image": 0.5 * (mean(image_ab) + mean(image_ba)),
        "cross": 0.5 * (mean(cross_ab) + mean(cross_ba)),
    }
    out["cgcl"] = weights[0] * out["patch"] + weights[1] * out["image"] + weights[2] * out["cross"]
    return out


def test_cgcl_equals_a_naive_loop_reference():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    z_b[0] = z_a[0] * 2  # one well-aligned pair, so the terms are far from chance
    temperatures, weights = (0.1, 0.05, 0.07), (0.5, 0.3, 0.2)
    got = cgcl_loss(z_a, z_b, temperatures, weights)
    want = _naive_cgcl(z_a, z_b, temperatures, weights)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].shape == () and got[key].dtype == torch.float32
        assert got[key].item() == pytest.approx(value, rel=1e-4), key


def test_dino_loss_matches_its_formula_and_centres_only_after_the_step():
    torch.manual_seed(0)
    loss = DINOLoss(5, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0])
    rows = -(torch.softmax(teacher / 0.04, dim=-1) * torch.log_softmax(student / 0.1, dim=-1)).sum(dim=-1)
    torch.testing.assert_close(loss(student, teacher, weight), rows[[0, 1, 3]].mean())

    changed = student.clone()
    changed[2] = 100.0
    torch.testing.assert_close(loss(changed, teacher, weight), rows[[0, 1, 3]].mean())
    assert torch.count_nonzero(loss.center) == 0

    loss.update_center()
    # Two forward calls queued the same rows twice; their mean is the batch centre.
    torch.testing.assert_close(loss.center, 0.1 * teacher[[0, 1, 3]].mean(dim=0))


def test_dino_centre_moves_to_a_collapsed_teacher_and_takes_the_collapse_out_of_the_target():
    """A teacher that puts every sample on one prototype: each step moves the centre (1 - m) of the way to
    its output, so the centred target goes from that prototype's one-hot (a student following the collapse
    pays nothing) to uniform (it pays the full cross-entropy to uniform): centring stops collapse."""
    m, steps = 0.9, 100
    loss = DINOLoss(5, student_temp=0.1, teacher_temp=0.04, center_momentum=m)
    collapsed = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    teacher = collapsed.repeat(8, 1)
    follower = (10 * collapsed).repeat(8, 1)  # a student on the same prototype
    assert loss(follower, teacher) < 1e-3
    for step in range(1, steps + 1):
        loss(follower, teacher)
        loss.update_center()
        torch.testing.assert_close(loss.center, (1 - m**step) * collapsed)
    to_uniform = -torch.log_softmax(follower[0] / 0.1, dim=-1).mean()
    torch.testing.assert_close(loss(follower, teacher), to_uniform, rtol=1e-3, atol=0)


def test_dino_head_scores_are_cosines_of_a_normalised_bottleneck_to_weight_normalised_prototypes():
    """DINO's head: the bottleneck feature is L2-normalised and the last layer is weight-normalised with its
    gain fixed to 1, so each score is the cosine to one prototype: neither the bottleneck's scale nor any
    prototype's length changes it, and a prototype along a sample's feature scores exactly 1 there."""
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=32, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(3, 7, 8)
    out = head(x)
    z = head.mlp(x).detach()
    assert out.shape == (3, 7, 32)
    torch.testing.assert_close(out, F.cosine_similarity(z[..., None, :], head.prototypes[None, None], dim=-1))
    with torch.no_grad():
        head.mlp[-1].weight.mul_(7.0)
        head.mlp[-1].bias.mul_(7.0)  # the bottleneck feature, 7 times as long
        head.prototypes.mul_(torch.rand(32, 1) * 10 + 0.1)  # every prototype a different length
    torch.testing.assert_close(head(x), out)
    with torch.no_grad():
        head.prototypes[5] = 3.0 * z[1, 2]
    out = head(x)
    torch.testing.assert_close(out[1, 2, 5], torch.tensor(1.0))
    assert out[1, 2].argmax() == 5 and out.abs().max() <= 1.0 + 1e-5


def test_dino_student_head_learns_the_teachers_assignments_on_fixed_inputs():
    """Self-distillation through the head: a student trained on fixed inputs toward a (different, frozen)
    teacher's sharpened distribution closes most of its excess cross-entropy and picks the teacher's
    prototype for almost every input."""
    torch.manual_seed(0)
    student = DINOHead(8, out_dim=16, hidden_dim=32, bottleneck_dim=8)
    teacher = DINOHead(8, out_dim=16, hidden_dim=32, bottleneck_dim=8).requires_grad_(False)
    loss = DINOLoss(16, student_temp=0.1, teacher_temp=0.04).eval()  # no centre: a fixed target
    x = torch.randn(64, 8)
    target = teacher(x)
    floor = -(torch.softmax(target / 0.04, -1) * torch.log_softmax(target / 0.04, -1)).sum(-1).mean()  # its entropy
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    first = loss(student(x), target).item()
    for _ in range(100):
        opt.zero_grad()
        loss(student(x), target).backward()
        opt.step()
    last = loss(student(x), target).item()
    assert last - floor < 0.05 * (first - floor), (first, last, float(floor))
    agree = (student(x).argmax(-1) == target.argmax(-1)).float().mean()
    assert agree >= 0.9, agree


def test_cluster_assignment_pools_each_object_from_its_own_cells():
    torch.manual_seed(0)
    features = torch.zeros(1, 16, 4)
    features[0, :8, 0] = 1.0
    features[0, 8:, 1] = 1.0
    features = features + 0.05 * torch.randn_like(features)
    weight = torch.ones(1, 16)
    weight[0, 7] = 0
    assign = cluster_assignment(features, num_clusters=2, weight=weight)
    assert assign.shape == (1, 16, 2)
    torch.testing.assert_close(assign.sum(dim=1), torch.ones(1, 2))
    assert (assign[0, 7] == 0).all()
    objects = assign.transpose(1, 2) @ features
    torch.testing.assert_close(objects[0], F.one_hot(torch.tensor([0, 1]), 4).float(), atol=0.1, rtol=0)
