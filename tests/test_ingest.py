"""The sample ingest, checked against direct rasterio/numpy computations on the same files."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import reproject

from earthray.config import ConfigError
from earthray.data import schema
from earthray.data.ingest import ingest
from earthray.data.manifest import load_manifest


def read_group(spec, manifest, group):
    tables = [pq.read_table(Path(spec.output) / f) for f in manifest["groups"][group]["files"]]
    import pyarrow as pa

    return pa.concat_tables(tables)


def expected_chips(path, size, stride, nodata, min_valid):
    """Windows whose valid fraction reaches the threshold, counted with plain numpy."""
    with rasterio.open(path) as ds:
        data = ds.read()
    nd = ds.nodata if ds.nodata is not None else nodata
    valid = np.all(data != nd, axis=0) & np.all(np.isfinite(data), axis=0)
    keep = []
    for r in range(0, valid.shape[0] - size + 1, stride):
        for c in range(0, valid.shape[1] - size + 1, stride):
            if valid[r:r + size, c:c + size].mean() >= min_valid:
                keep.append((r, c))
    return keep, data, valid


def test_counts_match_direct_computation(sample_spec, sample_manifest, sample_dir):
    m = sample_manifest
    assert m["schema_version"] == schema.SCHEMA_VERSION and not m["quarantine"]
    assert set(m["groups"]) == {"s1_grd_db", "s1_grd_db@series", "s2_l1c", "landsat8_oli_tirs", "vhr_rgbn",
                                "vhr_rgb+dem", "landsat7_etm+label", "s2_l2a+s1_grd_db+label", "s2_l2a+s1_grd_db+dem",
                                "s2_l2a_10m+s2_l2a@series+s1_grd_db@series+label",
                                "s2_l2a_10m+s2_l2a@series+s1_grd_db@series", "bigearthnet"}
    expected = 0
    for tif in sorted((sample_dir / "s1_camargue").glob("*.tif")):
        expected += len(expected_chips(tif, 32, 32, -99, 0.5)[0])
    assert m["groups"]["s1_grd_db"]["count"] == expected
    table = read_group(sample_spec, m, "s1_grd_db")
    assert table.num_rows == expected
    assert sum(g["count"] for g in m["groups"].values()) == m["counts"]["total"]
    assert sum(m["counts"]["by_split"].values()) == m["counts"]["total"]
    assert m["sensors"]["s1_grd_db"]["count"] == sum(g["present"].get("s1_grd_db", 0) for g in m["groups"].values())
    assert m["groups"]["s1_grd_db"]["present"]["s1_grd_db"] == expected


def test_stats_match_numpy_over_kept_chips(sample_manifest, sample_dir):
    values = []
    for tif in sorted((sample_dir / "s1_camargue").glob("*.tif")):
        keep, data, valid = expected_chips(tif, 32, 32, -99, 0.5)
        for r, c in keep:
            chip, ok = data[0, r:r + 32, c:c + 32], valid[r:r + 32, c:c + 32]
            values.append(chip[ok])
    series = sample_dir / "s1_camargue/S1_GRD_VV_France_Camargue_2017-01-01_2017-12-31"
    with rasterio.open(series) as ds:
        data = ds.read()
    for r in range(0, 48 - 16 + 1, 16):
        for c in range(0, 48 - 16 + 1, 16):
            chip = data[:, r:r + 16, c:c + 16]
            ok = chip != -99
            if ok.mean() >= 0.5:
                values.append(chip[ok])
    v = np.concatenate(values).astype(np.float64)
    groups = sample_manifest["groups"]
    merged = [groups[g]["stats"]["s1_grd_db"]["VV"] for g in ("s1_grd_db", "s1_grd_db@series")]
    count = sum(m["count"] for m in merged)
    mean = sum(m["mean"] * m["count"] for m in merged) / count
    var = sum((m["std"] ** 2 + (m["mean"] - mean) ** 2) * m["count"] for m in merged) / count
    assert count == v.size
    np.testing.assert_allclose(mean, v.mean(), rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(var), v.std(), rtol=1e-5)
    assert min(m["min"] for m in merged) == pytest.approx(v.min()) and max(m["max"] for m in merged) == pytest.approx(v.max())
    band = sample_manifest["sensors"]["s1_grd_db"]["bands"][0]  # every group's VV: more pixels, the same rule
    assert band["name"] == "VV" and band["stats"]["count"] == sum(
        g["stats"]["s1_grd_db"]["VV"]["count"] for g in groups.values() if "s1_grd_db" in g.get("stats", {}))


def test_s2_stats_are_reflectance_over_valid_pixels(sample_spec, sample_manifest):
    s2 = sample_manifest["sensors"]["s2_l1c"]
    assert [b["name"] for b in s2["bands"]][:4] == ["B01", "B02", "B03", "B04"]
    table = read_group(sample_spec, sample_manifest, "s2_l1c")
    chips = schema.read_tensor(table, "s2_l1c").astype(np.float64) * 1e-4
    valid = schema.read_tensor(table, "s2_l1c.valid").astype(bool)
    b8 = chips[:, 7][valid]
    np.testing.assert_allclose(s2["bands"][7]["stats"]["mean"], b8.mean(), rtol=1e-6)
    assert 0 < s2["bands"][7]["stats"]["mean"] < 1


def test_colocated_group_is_warped_onto_reference_grid(sample_spec, sample_manifest, sample_dir):
    table = read_group(sample_spec, sample_manifest, "vhr_rgb+dem")
    rgb = schema.read_tensor(table, "vhr_rgb")
    dem = schema.read_tensor(table, "dem")
    assert rgb.shape[1:] == (3, 32, 32) and dem.shape[1:] == (1, 32, 32) and dem.dtype == np.float32
    present = np.asarray(table["dem.present"])
    assert 0 < present.sum() < len(present)  # the DEM covers only part of the RGB scene
    assert not dem[~present].any()
    with rasterio.open(sample_dir / "rmnp_rgb_dem/rmnp-rgb.tif") as r, \
            rasterio.open(sample_dir / "rmnp_rgb_dem/rmnp-dem.tif") as d:
        warped = np.full((r.height, r.width), 65535, np.uint16)
        reproject(d.read(1), warped, src_transform=d.transform, src_crs=d.crs, src_nodata=65535,
                  dst_transform=r.transform, dst_crs=r.crs, dst_nodata=65535, resampling=Resampling.bilinear)
        rgb_direct = r.read()
    rows, cols = table["row"].to_numpy(), table["col"].to_numpy()
    i = int(np.flatnonzero(present)[0])
    ok = schema.read_tensor(table, "dem.valid")[i].astype(bool)
    direct = warped[rows[i]:rows[i] + 32, cols[i]:cols[i] + 32].astype(np.float32)
    np.testing.assert_allclose(dem[i, 0][ok], direct[ok], atol=1.0)
    rgb_ok = schema.read_tensor(table, "vhr_rgb.valid")[i].astype(bool)
    expect = rgb_direct[:, rows[i]:rows[i] + 32, cols[i]:cols[i] + 32]
    np.testing.assert_array_equal(rgb_ok, (expect != 255).all(axis=0))
    np.testing.assert_array_equal(rgb[i][:, rgb_ok], expect[:, rgb_ok])


def test_time_series_rows_carry_all_dates(sample_spec, sample_manifest):
    table = read_group(sample_spec, sample_manifest, "s1_grd_db@series")
    series = schema.read_tensor(table, "s1_grd_db")
    assert all(s.shape == (160, 1, 16, 16) for s in series)
    dates = table["s1_grd_db.dates"].to_pylist()[0]
    assert len(dates) == 160 and dates == sorted(dates) and dates[0].isoformat() == "2017-01-01T05:52:10"
    assert schema.read_tensor(table, "s1_grd_db.valid")[0].shape == (160, 16, 16)


def test_labels_aligned_with_image(sample_spec, sample_manifest, sample_dir):
    group = sample_manifest["groups"]["landsat7_etm+label"]
    assert group["label"]["classes"] == ["developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"] and group["label"]["ignore_index"] == -1
    table = read_group(sample_spec, sample_manifest, "landsat7_etm+label")
    labels = schema.read_tensor(table, "label")
    with rasterio.open(sample_dir / "landsat7_nc/lsat7_2000_10.tif") as img, \
            rasterio.open(sample_dir / "landsat7_nc/strata.tif") as lab:
        direct = np.full((img.height, img.width), -99999, np.float32)
        reproject(lab.read(1), direct, src_transform=lab.transform, src_crs=lab.crs, src_nodata=-99999,
                  dst_transform=img.transform, dst_crs=img.crs, dst_nodata=-99999, resampling=Resampling.nearest)
        band1 = img.read(1)
    direct = np.where(direct == -99999, -1, direct - 1)
    rows, cols = table["row"].to_numpy(), table["col"].to_numpy()
    agree = [(labels[i] == direct[r:r + 32, c:c + 32]).mean() for i, (r, c) in enumerate(zip(rows, cols))]
    assert np.mean(agree) > 0.99
    assert set(np.unique(labels)) <= set(range(-1, 7)) and len(np.unique(labels)) >= 5
    chips = schema.read_tensor(table, "landsat7_etm")
    ok = schema.read_tensor(table, "landsat7_etm.valid").astype(bool)
    i = int(np.argmax(ok.mean(axis=(1, 2))))
    direct_b1 = band1[rows[i]:rows[i] + 32, cols[i]:cols[i] + 32]
    assert ok[i].mean() > 0.9 and chips.dtype == np.uint8
    np.testing.assert_array_equal(chips[i, 0][ok[i]], direct_b1[ok[i]])


def test_spatial_blocks_keep_neighbours_together(sample_spec, sample_manifest):
    table = read_group(sample_spec, sample_manifest, "vhr_rgbn")
    xs, ys, splits = table["x"].to_numpy(), table["y"].to_numpy(), table["split"].to_pylist()
    block = 4 * 32 * 5.0
    by_block = {}
    for x, y, s in zip(xs, ys, splits):
        by_block.setdefault((np.floor(x / block), np.floor(y / block)), set()).add(s)
    assert all(len(s) == 1 for s in by_block.values())
    assert set(splits) == {"train", "val", "test"}
    lon, lat = table["lon"].to_numpy(), table["lat"].to_numpy()
    assert np.all((-75 < lon) & (lon < -71) & (17 < lat) & (lat < 21))  # Haiti


def test_rerun_is_idempotent_and_resumes(sample_spec, sample_manifest):
    out = Path(sample_spec.output)
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = ingest(sample_spec)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == files
    assert again["counts"] == sample_manifest["counts"]

    # an interruption: one scene's shard and state gone, a torn state file and a half-written shard left behind
    victim = next(s for s in sample_manifest["scenes"] if s["group"] == "vhr_rgbn")
    (out / victim["file"]).unlink()
    (out / "_state" / f"{victim['key']}.json").write_text('{"key": "trunc')
    (out / f"{victim['file']}.1234.tmp").write_bytes(b"PAR1 half written")
    resumed = ingest(sample_spec)
    assert resumed["counts"] == sample_manifest["counts"]
    redone = {p for p, t in files.items() if p.stat().st_mtime_ns != t}
    assert redone == {out / victim["file"]}
    ids = Counter()
    for g in resumed["groups"]:
        for f in resumed["groups"][g]["files"]:
            ids.update(pq.read_table(out / f, columns=["sample_id"])["sample_id"].to_pylist())
    assert ids and max(ids.values()) == 1
    assert load_manifest(out)["counts"] == resumed["counts"]


def test_different_spec_into_same_output_is_refused_then_replaced(sample_spec, ray_session, tmp_path):
    spec = sample_spec.model_copy(deep=True)
    spec.output = str(tmp_path / "out")
    spec.inputs = [i for i in spec.inputs if i.name == "rgbn_haiti"]
    first = ingest(spec)
    spec.chip_size = 64
    with pytest.raises(ConfigError, match="different settings"):
        ingest(spec)
    assert load_manifest(spec.output)["counts"] == first["counts"]  # nothing damaged
    replaced = ingest(spec, overwrite=True)
    assert replaced["groups"]["vhr_rgbn"]["chip_size"] == 64
    assert len(list((tmp_path / "out").rglob("*.parquet"))) == 1
    assert json.loads((tmp_path / "out/manifest.json").read_text())["counts"] == replaced["counts"]
