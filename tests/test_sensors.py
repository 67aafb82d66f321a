import numpy as np
import pytest
from typer.testing import CliRunner

from earthray.cli import app
from earthray.config import ConfigError
from earthray.sensors import default_catalogue, get_sensor, load_catalogue

REQUIRED = {
    "s1_grd": ["VV", "VH"], "s1_grd_db": ["VV", "VH"],
    "s2_l1c": ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"],
    "landsat5_tm": 7, "landsat7_etm": 9, "landsat8_oli_tirs": 11, "naip": ["R", "G", "B", "NIR"],
    "gaofen2": 4, "enmap": 224, "vhr_rgb": 3, "vhr_sar_x": 1, "dem": 1, "worldview3": 8, "s2_l2a": 12,
}


@pytest.mark.parametrize("name,bands", REQUIRED.items())
def test_builtin_sensors(name, bands):
    s = get_sensor(name)
    if isinstance(bands, list):
        assert s.band_names == bands
    else:
        assert len(s.bands) == bands
    for b in s.bands:
        assert b.gsd > 0 and b.std > 0
        assert (b.wavelength is not None) if s.kind == "optical" else True
        assert (b.polarisation is not None) if s.kind == "sar" else True
    np.dtype(s.dtype)


def test_enmap_wavelengths_span_vnir_to_swir():
    wl = [b.wavelength for b in get_sensor("enmap").bands]
    assert len(set(b.name for b in get_sensor("enmap").bands)) == 224
    assert 400 < wl[0] < 450 and 2400 < wl[-1] < 2500


def test_aliases_and_s2_gsd():
    assert get_sensor("sentinel2_l1c") is get_sensor("s2_l1c")
    s2 = get_sensor("s2_l1c")
    assert {b.name: b.gsd for b in s2.bands}["B01"] == 60 and s2.gsd == 10


def test_value_transforms_and_normalise():
    linear = get_sensor("s1_grd")
    x = np.array([[[0.1, 1.0]], [[0.01, 0.001]]], np.float32)  # (C=2, 1, 2)
    db = linear.transform.apply(x)
    np.testing.assert_allclose(db[0, 0], [-10.0, 0.0], atol=1e-5)
    z = linear.normalise(x)
    np.testing.assert_allclose(z[1, 0, 0], (-20.0 - (-20.0)) / 5.5, atol=1e-5)
    s2 = get_sensor("s2_l1c").select(["B04"])
    np.testing.assert_allclose(s2.normalise(np.full((1, 2, 2), 1370, np.uint16)), 0.0, atol=1e-3)


def test_select_unknown_band_names_sensor():
    with pytest.raises(ValueError, match="s2_l1c.*B99"):
        get_sensor("s2_l1c").select(["B02", "B99"])


def test_user_catalogue_adds_and_overrides(tmp_path, monkeypatch):
    path = tmp_path / "mine.yaml"
    path.write_text("""
sensors:
  planetscope:
    kind: optical
    dtype: uint16
    nodata: 0
    bands:
      - {name: B, wavelength: 490, gsd: 3}
      - {name: NIR, wavelength: 865, gsd: 3}
  landsat7_etm:
    extends: landsat7_etm
    dtype: float32
""")
    cat = load_catalogue(path)
    assert cat["planetscope"].band_names == ["B", "NIR"]
    assert cat["landsat7_etm"].dtype == "float32" and len(cat["landsat7_etm"].bands) == 9
    monkeypatch.setenv("EARTHRAY_SENSORS", str(path))
    assert "planetscope" in load_catalogue()
    assert "planetscope" not in default_catalogue()


@pytest.mark.parametrize("body,field,value", [
    ("kind: radar\n    dtype: uint8\n    bands: [{name: A, gsd: 1}]", "kind", "'radar'"),
    ("kind: optical\n    dtype: uint8\n    bands: [{name: A, wavelength: abc, gsd: 1}]", "bands.0.wavelength", "'abc'"),
    ("kind: optical\n    dtype: int77\n    bands: [{name: A, wavelength: 500, gsd: 1}]", "dtype", "int77"),
    ("kind: sar\n    dtype: float32\n    bands: [{name: A, gsd: 1}]", "(top level)", "polarisation"),
])
def test_invalid_catalogue_names_file_field_value(tmp_path, body, field, value):
    path = tmp_path / "bad.yaml"
    path.write_text(f"sensors:\n  thing:\n    {body}\n")
    with pytest.raises(ConfigError) as e:
        load_catalogue(path)
    msg = str(e.value)
    assert str(path) in msg and "sensors.thing" in msg and field in msg and value in msg


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("sensors:\n  a: [1, 2\n  b: 3\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML: line \d+"):
        load_catalogue(path)


def test_cli_lists_and_shows():
    runner = CliRunner()
    out = runner.invoke(app, ["sensors"], terminal_width=200)
    assert out.exit_code == 0
    for name in REQUIRED:
        assert name in out.output
    out = runner.invoke(app, ["sensors", "show", "enmap"], terminal_width=200)
    assert out.exit_code == 0 and "V001" in out.output and "S133" in out.output
    out = runner.invoke(app, ["sensors", "show", "nosuch"])
    assert out.exit_code == 2 and "unknown sensor 'nosuch'" in out.output
