"""The sample ingest's co-located groups from real cubes and GeoTIFF pairs, checked against direct reads."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from earthray.data import schema
from earthray.data.ingest import ingest
from earthray.data.pipeline import GroupReader, decode
from earthray.data.spec import load_spec
from test_cube import CLEAR, LABELS, MONTHLY, S1, S2_10, S2_20, dates, raw

PAIRS = "s2_l2a+s1_grd_db+label"
SERIES = "s2_l2a_10m+s2_l2a@series+s1_grd_db@series+label"
CT = {1110: "winter_wheat", 1200: "maize", 1500: "barley", 1510: "barley", 2130: "vegetables", 5100: "potatoes",
      7900: "legumes", 8100: "sugar_beet", 9120: "grassland"}


def table(spec, manifest, group, input_name=None) -> pa.Table:
    t = pa.concat_tables([pq.read_table(Path(spec.output) / f) for f in manifest["groups"][group]["files"]])
    if input_name:
        t = t.filter(pa.compute.equal(t["input"], input_name))
    return t


def test_s2_dates_pair_with_the_nearest_s1_date_within_three_days(sample_spec, sample_manifest):
    t = table(sample_spec, sample_manifest, PAIRS, "flanders_a_pairs")
    s2_dates, s1_dates = dates(S2_10), dates(S1)
    s2_day = t["s2_l2a.date"].to_pylist()
    s1_day = t["s1_grd_db.date"].to_pylist()
    present = t["s1_grd_db.present"].to_pylist()
    for a, b, here in zip(s2_day, s1_day, present):
        nearest = min(s1_dates, key=lambda d: abs(d - a))
        assert here == (abs(nearest - a) <= timedelta(days=3))
        assert (b == nearest) if here else b is None
    assert set(s2_day) <= set(s2_dates) and sum(present) > 0.9 * len(present)
    g = sample_manifest["groups"][PAIRS]
    assert g["kind"] == "paired" and g["pair_within_days"] == 3
    whole = table(sample_spec, sample_manifest, PAIRS)
    assert g["present"] == {"s2_l2a": whole.num_rows, "s1_grd_db": sum(whole["s1_grd_db.present"].to_pylist())}
    assert g["present"]["s1_grd_db"] < whole.num_rows  # some S2 dates have no S1 date near enough: kept, S1 absent
    ids = whole["sample_id"].to_pylist()
    assert len(set(ids)) == len(ids)


def test_pair_chips_hold_the_files_values_losslessly(sample_spec, sample_manifest):
    t = table(sample_spec, sample_manifest, PAIRS, "flanders_a_pairs")
    s2 = schema.read_tensor(t, "s2_l2a")
    ok = schema.read_tensor(t, "s2_l2a.valid").astype(bool)
    s1 = schema.read_tensor(t, "s1_grd_db")
    rows, cols = t["row"].to_numpy(), t["col"].to_numpy()
    b02, vv, scl = raw(S2_10, "B02"), raw(S1, "VV"), raw(S2_20, "SCL")
    s2_dates, s1_dates = dates(S2_10), dates(S1)
    for i in range(0, t.num_rows, 37):
        step = s2_dates.index(t["s2_l2a.date"][i].as_py())
        r, c = rows[i], cols[i]
        direct = b02[step, r:r + 32, c:c + 32]
        clear = np.isin(np.repeat(np.repeat(scl[step], 2, 0), 2, 1)[r:r + 32, c:c + 32], CLEAR) & (direct != 0)
        np.testing.assert_array_equal(ok[i], clear & ok[i])  # no cloud or fill pixel is valid
        np.testing.assert_array_equal(s2[i, 0][ok[i]], direct[ok[i]])  # uint16 DN in, uint16 DN stored
        assert ok[i].mean() >= 0.5
        if t["s1_grd_db.present"][i].as_py():
            s1_step = s1_dates.index(t["s1_grd_db.date"][i].as_py())
            source = vv[s1_step, r // 2:(r + 32) // 2, c // 2:(c + 32) // 2] * 1e-4  # the 20 m pixels under the chip
            assert abs(s1[i, 0].mean() - source.mean()) < 0.5  # dB, bilinear onto 10 m keeps the mean


def test_label_layers_map_legend_codes_to_classes(sample_spec, sample_manifest):
    g = sample_manifest["groups"][PAIRS]
    assert list(g["labels"]) == ["crop_type", "land_cover"] and g["label"]["name"] == "crop_type"
    assert g["labels"]["crop_type"]["classes"] == list(dict.fromkeys(CT.values()))
    assert g["labels"]["land_cover"]["column"] == "label.land_cover"
    assert g["labels"]["crop_type"]["unmapped"] == {}
    t = table(sample_spec, sample_manifest, PAIRS, "flanders_a_pairs")
    ct = raw(LABELS, "CT").astype(int)
    classes = g["labels"]["crop_type"]["classes"]
    expect = np.full(ct.shape, -1)
    for code, name in CT.items():
        expect[ct == code] = classes.index(name)
    labels = schema.read_tensor(t, "label.crop_type")
    for i, (r, c) in enumerate(zip(t["row"].to_numpy(), t["col"].to_numpy())):
        np.testing.assert_array_equal(labels[i], expect[r:r + 32, c:c + 32])
    counts = g["labels"]["crop_type"]["counts"]
    assert counts["maize"] > 0 and sum(counts.values()) == sum(
        int((schema.read_tensor(table(sample_spec, sample_manifest, PAIRS), "label.crop_type") == k).sum())
        for k in range(len(classes)))


def test_a_held_out_place_is_one_split(sample_spec, sample_manifest):
    for group in (PAIRS, SERIES):
        t = table(sample_spec, sample_manifest, group)
        by_input = {}
        for inp, split in zip(t["input"].to_pylist(), t["split"].to_pylist()):
            by_input.setdefault(inp, set()).add(split)
        assert {k: v for k, v in by_input.items()} == {k: {"test" if "_b_" in k else "train"} for k in by_input}
        assert len(by_input) == 2


def test_skysense_groups_hold_an_hr_view_and_both_series(sample_spec, sample_manifest):
    g = sample_manifest["groups"][SERIES]
    assert g["sensors"] == ["s2_l2a_10m", "s2_l2a", "s1_grd_db"] and g["kind"] == "timeseries"
    t = table(sample_spec, sample_manifest, SERIES, "flanders_a_series")
    s2 = schema.read_tensor(t, "s2_l2a")
    s1 = schema.read_tensor(t, "s1_grd_db")
    assert all(x.shape == (118, 9, 16, 16) for x in s2) and all(x.shape == (159, 2, 16, 16) for x in s1)
    assert t["s2_l2a.dates"].to_pylist()[0] == dates(S2_10)
    scl = raw(S2_20, "SCL")
    clearest = dates(S2_10)[int(np.argmax(np.isin(scl, CLEAR).mean(axis=(1, 2))))]
    assert set(t["s2_l2a_10m.date"].to_pylist()) == {clearest}
    hr = schema.read_tensor(t, "s2_l2a_10m")
    step = dates(S2_10).index(clearest)
    r, c = t["row"][0].as_py(), t["col"][0].as_py()
    np.testing.assert_array_equal(hr[0, 3], raw(S2_10, "B08")[step, r:r + 16, c:c + 16])
    # the reader delivers every sensor of the group in the recipe layout, with the chosen label layer
    reader = GroupReader.from_manifest(sample_manifest, SERIES, max_dates=8, label="land_cover")
    batch = decode(t.select(reader.columns), reader)
    assert batch["s2_l2a"].shape == (t.num_rows, 8, 9, 16, 16) and batch["s2_l2a_10m"].shape == (t.num_rows, 4, 16, 16)
    assert batch["s1_grd_db.tmask"].all() and batch["label"].shape == (t.num_rows, 16, 16)
    lc = np.asarray(raw(LABELS, "LC"), int)[r:r + 16, c:c + 16]
    names = g["labels"]["land_cover"]["classes"]
    codes = {11: "annual_cropland", 13: "grassland", 60: "built_up", 99: "not_cropland"}
    np.testing.assert_array_equal(batch["label"][0], np.vectorize(lambda v: names.index(codes[v]))(lc))


def test_monthly_cube_s1_amplitude_becomes_db_and_empty_months_are_absent(sample_spec, sample_manifest):
    t = table(sample_spec, sample_manifest, "s2_l2a+s1_grd_db+dem")
    months = {d.month for d in t["s2_l2a.date"].to_pylist()}
    assert months == set(range(1, 13)) - {12, 1}  # the cube's S2 is 65535 in December and January
    assert t["s1_grd_db.present"].to_pylist() == [True] * t.num_rows and t["dem.present"].to_pylist()[0]
    s1 = schema.read_tensor(t, "s1_grd_db")
    dn = raw(MONTHLY, "S1-SIGMA0-VV").view(np.uint16).astype(np.float64)
    step = [d.month for d in dates_of(MONTHLY)].index(t["s1_grd_db.date"][0].as_py().month)
    r, c = t["row"][0].as_py(), t["col"][0].as_py()
    np.testing.assert_allclose(s1[0, 0], 20 * np.log10(dn[step, r:r + 32, c:c + 32]) - 83, atol=1e-4)


def dates_of(path):
    import xarray as xr

    with xr.open_dataset(path) as ds:
        return [d.astype("datetime64[s]").item() for d in ds["t"].values]


def test_bigearthnet_pairs_by_patch_id_with_scene_multilabels(sample_spec, sample_manifest, sample_dir):
    g = sample_manifest["groups"]["bigearthnet"]
    assert g["labels"]["corine"]["kind"] == "scene" and g["tensors"]["label.corine"]["shape"] == [10]
    t = table(sample_spec, sample_manifest, "bigearthnet")
    classes = g["labels"]["corine"]["classes"]
    scenes = [s for s in sample_manifest["scenes"] if s["group"] == "bigearthnet"]
    assert len(scenes) == 6 and all(s["chips"] == 25 for s in scenes)
    labels = schema.read_tensor(t, "label.corine")
    for scene, vector in zip(t["scene"].to_pylist(), labels):
        folder = Path(scene).parent
        meta = json.loads(next(folder.glob("*_labels_metadata.json")).read_text())
        assert sorted(np.flatnonzero(vector)) == sorted(classes.index(n) for n in meta["labels"])
    ids = {s.split("/")[0] for s in t["sample_id"].to_pylist()}
    assert ids == {"bigearthnet"}
    # the S1 chip came from the S1 patch of the same id: its date is the S1 folder's
    s1_dates = {d.strftime("%Y%m%d") for d in t["s1_grd_db.date"].to_pylist()}
    s1_folders = {p.name.split("_")[4][:8] for p in (sample_dir / "bigearthnet/BigEarthNet-S1-Example").iterdir()}
    assert s1_dates == s1_folders
    assert set(t["split"].to_pylist()) == {"train", "test"}
    by_scene = {}
    for s, split in zip(t["scene"].to_pylist(), t["split"].to_pylist()):
        by_scene.setdefault(s, set()).add(split)
    assert all(len(v) == 1 for v in by_scene.values())  # a patch is one place


def test_bad_cubes_and_pairs_are_quarantined_by_name(ray_session, tmp_path, sample_dir):
    (tmp_path / "notes.nc").write_text("not a cube\n")
    spec = {
        "output": str(tmp_path / "out"), "chip_size": 16,
        "inputs": [
            {"name": "wrong_variable", "sensors": {"s1_grd_db": {"path": S1, "bands": {"VV": "HH", "VH": "VH"},
                                                                 "time_series": True}}},
            {"name": "not_a_band", "sensors": {"s2_l2a": {"path": S2_20, "bands": {"B05": "sunZenithAngles"},
                                                          "time_series": True}}},
            {"name": "not_a_cube", "sensors": {"s1_grd_db": {"path": str(tmp_path / "notes.nc"),
                                                             "bands": ["VV", "VH"], "time_series": True}}},
            {"name": "no_partner", "group": "ben",
             "sensors": {"s2_l2a": {"path": str(sample_dir / "bigearthnet/BigEarthNet-S2-Example/S2*_{p:\\d+_\\d+}/"
                                                             "*_B02.tif"), "bands": ["B02"]},
                         "s1_grd_db": {"path": str(sample_dir / "bigearthnet/missing/S1*_{p}/*_VV.tif"),
                                       "bands": ["VV"]}}},
            {"name": "good", "sensors": {"s1_grd_db": {"path": S1, "bands": ["VV", "VH"], "time_series": True}}},
        ],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    manifest = ingest(load_spec(path))
    reasons = {}
    for q in manifest["quarantine"]:
        reasons.setdefault(q["input"], []).append(q["reason"])
    assert "no variable 'HH' (for band VV)" in reasons["wrong_variable"][0]
    assert "variables VH ('timestamp', 'y', 'x'), VV ('timestamp', 'y', 'x')" in reasons["wrong_variable"][0]
    assert "'sunZenithAngles' has dims ('timestamp',), no x/y axes" in reasons["not_a_band"][0]
    assert "notes.nc: not a readable netCDF or Zarr cube" in reasons["not_a_cube"][0]
    assert len(reasons["no_partner"]) == 6 and all("missing/S1*_" in r for r in reasons["no_partner"])
    assert all("\n" not in r and "Traceback" not in r for rs in reasons.values() for r in rs)
    assert manifest["groups"]["s1_grd_db@series"]["count"] == 4  # the good cube, 2 x 2 chips of 16 px at 20 m


@pytest.mark.parametrize("edit, fragment", [
    ({"pair_within_days": 3}, "pair_within_days pairs time series"),
    ({"sensors": {"s1_grd_db": {"path": S1, "time_series": True, "date": "clearest"}}}, "cannot be combined"),
    ({"label": {"path": LABELS, "scene": LABELS}}, "exactly one of 'path'"),
    ({"label": {"scene": LABELS}}, "per-scene labels need 'classes'"),
])
def test_invalid_multisensor_specs_name_the_field(tmp_path, edit, fragment):
    from earthray.config import ConfigError

    inp = {"name": "x", "sensors": {"s1_grd_db": {"path": S1, "bands": ["VV"]}}} | edit
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "inputs": [inp]}))
    with pytest.raises(ConfigError, match=fragment):
        load_spec(path)


def test_paired_and_multilabel_groups_decode_for_training(sample_manifest, sample_spec):
    pairs = table(sample_spec, sample_manifest, PAIRS)
    reader = GroupReader.from_manifest(sample_manifest, PAIRS, label="land_cover")
    batch = decode(pairs.slice(0, 16).select(reader.columns), reader)
    assert batch["s2_l2a"].shape == (16, 9, 32, 32) and batch["s1_grd_db"].shape == (16, 2, 32, 32)
    assert batch["label"].shape == (16, 32, 32) and batch["label"].max() < 4
    np.testing.assert_array_equal(batch["label"], schema.read_tensor(pairs.slice(0, 16), "label.land_cover"))
    ben = table(sample_spec, sample_manifest, "bigearthnet")
    reader = GroupReader.from_manifest(sample_manifest, "bigearthnet")
    batch = decode(ben.slice(0, 8).select(reader.columns), reader)
    assert batch["label"].shape == (8, 10) and set(np.unique(batch["label"])) <= {0, 1}
    with pytest.raises(KeyError, match="no label layer 'crop'; layers: corine"):
        GroupReader.from_manifest(sample_manifest, "bigearthnet", label="crop")
