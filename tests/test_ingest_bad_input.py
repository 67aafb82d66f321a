"""Broken inputs are quarantined with a one-line reason; the rest of the ingest completes."""

import shutil

import numpy as np
import pytest
import rasterio
import yaml
from typer.testing import CliRunner

from earthray.cli import EXIT_CONFIG, EXIT_QUARANTINE, app
from earthray.config import ConfigError
from earthray.data.ingest import ingest
from earthray.data.spec import load_spec

S1 = "s1_camargue/S1A__IW___D_20170309T054356_VV_grd_mli_geo_norm_db.tif"


@pytest.fixture
def broken_spec(tmp_path, sample_dir):
    d = tmp_path / "in"
    d.mkdir()
    good = d / "good.tif"
    shutil.copy(sample_dir / S1, good)
    data = (sample_dir / S1).read_bytes()
    (d / "truncated.tif").write_bytes(data[: len(data) // 2])
    (d / "notes.tif").write_text("this is not a raster\n")
    with rasterio.open(good) as src:
        profile = src.profile
        pixels = src.read()
    nocrs = profile | {"crs": None, "transform": rasterio.Affine.identity()}
    with rasterio.open(d / "nocrs.tif", "w", **nocrs) as dst:
        dst.write(pixels)
    far = profile | {"transform": rasterio.Affine(20, 0, 100000, 0, -20, 1000000)}  # same CRS, 3800 km away
    with rasterio.open(d / "far_label.tif", "w", **far) as dst:
        dst.write(np.ones_like(pixels))
    spec = {
        "output": str(tmp_path / "out"),
        "chip_size": 32,
        "inputs": [
            {"name": "good", "sensors": {"s1_grd_db": {"path": str(good), "bands": ["VV"]}}},
            {"name": "truncated", "sensors": {"s1_grd_db": {"path": str(d / "truncated.tif"), "bands": ["VV"]}}},
            {"name": "notraster", "sensors": {"s1_grd_db": {"path": str(d / "notes.tif"), "bands": ["VV"]}}},
            {"name": "wrongbands", "sensors": {"vhr_rgb": {"path": str(sample_dir / "rmnp_rgb_dem/rmnp-dem.tif")}}},
            {"name": "nocrs", "group": "s1_nocrs", "sensors": {"s1_grd_db": {"path": str(d / "nocrs.tif"), "bands": ["VV"]}}},
            {"name": "farlabel", "sensors": {"s1_grd_db": {"path": str(good), "bands": ["VV"]}},
             "label": {"path": str(d / "far_label.tif")}},
        ],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


EXPECTED = {
    "truncated": "truncated.tif",
    "notraster": "notes.tif: cannot open",
    "wrongbands": "has 1 bands but sensor vhr_rgb expects 3",
    "nocrs": "has no CRS",
    "farlabel": "label raster does not overlap",
}


def test_each_broken_input_is_quarantined_and_the_rest_completes(ray_session, broken_spec):
    manifest = ingest(load_spec(broken_spec))
    reasons = {q["input"]: q["reason"] for q in manifest["quarantine"]}
    assert set(reasons) == set(EXPECTED)
    for name, fragment in EXPECTED.items():
        assert fragment in reasons[name], reasons[name]
        assert "\n" not in reasons[name]
    assert manifest["groups"]["s1_grd_db"]["count"] == (268 // 32) * (217 // 32)  # the good scene, whole
    assert len(manifest["groups"]["s1_grd_db"]["files"]) == 1
    assert not list((broken_spec.parent / "out").rglob("*.tmp"))


def test_cli_exit_status_says_something_was_quarantined(ray_session, broken_spec):
    result = CliRunner().invoke(app, ["ingest", str(broken_spec)], terminal_width=200)
    assert result.exit_code == EXIT_QUARANTINE, result.output
    assert "quarantined truncated" in result.output and "good" in result.output


@pytest.mark.parametrize("edit,fragment", [
    (lambda s: s.update(chip_size="big"), "chip_size: Input should be a valid integer"),
    (lambda s: s.update(chipsize=32), "chipsize: Extra inputs are not permitted"),
    (lambda s: s["inputs"][0]["sensors"]["s1_grd_db"].update(stack=["a.tif"]),
     "inputs.0.sensors.s1_grd_db: Value error, give exactly one of 'path' or 'stack'"),
    (lambda s: s.update(split={"train": 0.9, "val": 0.2, "test": 0.1}), "split: Value error, train + val + test must be 1"),
    (lambda s: s["inputs"][0].update(sensors={"sentinel9": {"path": "x.tif"}}), "inputs.good.sensors: unknown sensor 'sentinel9'"),
    (lambda s: s["inputs"][3]["sensors"]["vhr_rgb"].update(bands=["HH"]),
     "inputs.wrongbands.sensors.vhr_rgb.bands: sensor 'vhr_rgb' has no bands ['HH']"),
    (lambda s: s["inputs"][0]["sensors"]["s1_grd_db"].update(bands=["VH"]),
     "inputs 'good' and 'truncated' both write group 's1_grd_db' but differ in bands ([['VH']] vs [['VV']])"),
    (lambda s: s["inputs"][0]["sensors"]["s1_grd_db"].update(path="/nowhere/*.tif"), "no files match '/nowhere/*.tif'"),
])
def test_invalid_spec_names_the_field(ray_session, broken_spec, edit, fragment):
    spec = yaml.safe_load(broken_spec.read_text())
    edit(spec)
    broken_spec.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as e:
        ingest(load_spec(broken_spec))
    assert fragment in str(e.value)
    assert not (broken_spec.parent / "out" / "manifest.json").exists()
    result = CliRunner().invoke(app, ["ingest", str(broken_spec)], terminal_width=300)
    assert result.exit_code == EXIT_CONFIG and fragment in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_invalid_yaml_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: x\ninputs:\n  - name: a\n   sensors: {}\n")
    result = CliRunner().invoke(app, ["ingest", str(bad)], terminal_width=200)
    assert result.exit_code == EXIT_CONFIG
    assert "invalid YAML: line 4" in result.output and "Traceback" not in result.output
