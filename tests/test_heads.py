"""Task heads on real recipe features: shapes, missing sensors, and that they can fit real labels."""

import pytest
import torch
import torch.nn.functional as F

from chips import real_chips, real_land_cover
from earthray.models.heads import ClassificationHead, FPNHead, fuse_sensors
from earthray.recipes import create_recipe


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_fuse_sensors_drops_absent_modalities():
    a, b = torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), 3.0)
    fused = fuse_sensors({"a": [a], "b": [b]}, {"a": torch.tensor([True, False]), "b": torch.tensor([True, True])})
    assert torch.allclose(fused[0][0], torch.full((3, 4, 4), 2.0))  # both present: mean
    assert torch.allclose(fused[0][1], torch.full((3, 4, 4), 3.0))  # a missing: b alone


@pytest.mark.parametrize("recipe,sensors,kw", [
    ("ofa", ["vhr_rgbn"], {}),
    ("msgfm", ["vhr_rgbn"], {"img_size": 32}),
])
def test_heads_on_recipe_features(recipe, sensors, kw):
    model = create_recipe(recipe, sensors, "tiny", **kw).eval()
    x = real_chips("vhr_rgbn", None, 32, 4)
    with torch.no_grad():
        feats = fuse_sensors(model.encode({"vhr_rgbn": x}))
    dims = [f.shape[1] for f in feats]
    assert ClassificationHead(dims, 7)(feats).shape == (4, 7)
    assert FPNHead(dims, 7)(feats, size=(32, 32)).shape == (4, 7, 32, 32)
    assert FPNHead(dims, 1)(feats, size=(32, 32)).shape == (4, 1, 32, 32)


def test_fpn_head_fits_real_land_cover_labels():
    """On real Landsat 7 chips and the reprojected strata labels, a frozen tiny encoder + FPN head learns."""
    from earthray.sensors import get_sensor

    xs, ys = real_land_cover()
    sensor = get_sensor("landsat7_etm").select(["B1", "B2", "B3", "B4", "B5", "B7"])
    encoder = create_recipe("ofa", [sensor], "tiny").eval()
    with torch.no_grad():
        feats = fuse_sensors(encoder.encode({"landsat7_etm": xs}))
    head = FPNHead([f.shape[1] for f in feats], 7)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        return F.cross_entropy(head(feats, size=(32, 32)), ys, ignore_index=-1)

    before = loss().item()
    for _ in range(40):
        step = loss()
        opt.zero_grad()
        step.backward()
        opt.step()
    assert loss().item() < 0.8 * before
