"""Ray Data pipelines over the real sample shards: row counts, decoding checked against an
independent decode of the Parquet bytes, normalisation, time series, labels; interleaving
of per-group streams; co-registered augmentation.

Each ``read_group`` execution costs a second or two on 2 shared cores, so module fixtures
run each dataset once and several tests look at the result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from earthray.data import schema
from earthray.data.augment import flip_rotate
from earthray.data.pipeline import GroupReader, decode, interleave
from earthray.data.stream import read_group
from earthray.sensors import ValueTransform, get_sensor

SPLITS = ("train", "val", "test")
SERIES = "s1_grd_db@series"
INTERLEAVED = {"s2_l1c": 16, "landsat7_etm+label": 32}  # group -> its own batch size


# --------------------------------------------------------------------------------------------- helpers


def _collect(batches) -> dict[str, np.ndarray]:
    """Concatenate a stream of numpy/torch batches into one dict (empty dict for no rows)."""
    parts: dict[str, list] = {}
    for b in batches:
        for k, v in b.items():
            parts.setdefault(k, []).append(v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _by_lonlat(lonlat: np.ndarray) -> dict[tuple, int]:
    index = {(float(lon), float(lat)): i for i, (lon, lat) in enumerate(lonlat)}
    assert len(index) == len(lonlat), "chip centres must be unique to match rows"
    return index


def _table(root: Path, manifest: dict, group: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(root / f) for f in manifest["groups"][group]["files"]])


def _hand_norm(manifest: dict, group: str, sensor: str) -> tuple[ValueTransform, np.ndarray, np.ndarray]:
    """The catalogue's value transform, and the manifest's band stats in the group's band order."""
    transform = get_sensor(sensor).transform
    assert transform.model_dump() == manifest["sensors"][sensor]["transform"]
    stats = {b["name"]: b["stats"] for b in manifest["sensors"][sensor]["bands"]}
    bands = manifest["groups"][group]["bands"][sensor]
    return (transform, np.array([stats[b]["mean"] for b in bands], np.float64),
            np.array([stats[b]["std"] for b in bands], np.float64))


def _hand_chip(table: pa.Table, i: int, column: str, spec: dict) -> np.ndarray:
    """One row's raw bytes -> array, straight from the manifest's dtype and shape."""
    return np.frombuffer(table[column][i].as_py(), np.dtype(spec["dtype"])).reshape(spec["shape"])


@pytest.fixture(scope="module")
def root(sample_spec) -> Path:
    return Path(sample_spec.output)


@pytest.fixture(scope="module")
def rgbn(sample_manifest, root) -> dict[str, dict[str, np.ndarray]]:
    """vhr_rgbn, one dataset per split (the only group with that sensor, so its stats are this data's)."""
    return {split: _collect(read_group(root, "vhr_rgbn", split, manifest=sample_manifest)
                            .iter_batches(batch_size=4096, batch_format="numpy"))
            for split in SPLITS}


@pytest.fixture(scope="module")
def rgb_dem(sample_manifest, root) -> dict[str, np.ndarray]:
    """The co-located RGB + DEM group, all splits (the DEM is absent from some rows)."""
    return read_group(root, "vhr_rgb+dem", manifest=sample_manifest).take_batch(1000, batch_format="numpy")


@pytest.fixture(scope="module")
def series(sample_manifest, root) -> dict[str, np.ndarray]:
    ds = read_group(root, SERIES, max_dates=16, seed=0, manifest=sample_manifest)
    return _collect(ds.iter_torch_batches(batch_size=4))


# ------------------------------------------------------------------------------------------ row counts


def test_split_row_counts(sample_manifest, root, rgbn):
    groups = sample_manifest["groups"]
    assert {s: len(rgbn[s]["lonlat"]) for s in SPLITS} == groups["vhr_rgbn"]["by_split"]
    assert sum(groups["vhr_rgbn"]["by_split"].values()) == groups["vhr_rgbn"]["count"]

    # A split a group has no rows in streams nothing (and does not fail).
    assert "val" not in groups["s2_l1c"]["by_split"]
    assert read_group(root, "s2_l1c", "val", manifest=sample_manifest).count() == 0

    with pytest.raises(KeyError, match="no group"):
        read_group(root, "nope", manifest=sample_manifest)


@pytest.fixture(scope="module")
def interleaved(sample_manifest, root):
    """msGFM's heterogeneous batches over two real groups (Sentinel-2 and the labelled Landsat 7),
    each streamed at its own batch size: [(group, batch), ...] as ``interleave`` yields them."""
    streams = {g: read_group(root, g, "train", manifest=sample_manifest).iter_batches(batch_size=n)
               for g, n in INTERLEAVED.items()}
    return list(interleave(streams))



def test_interleave_real_streams_keeps_each_group_batch_size(sample_manifest, interleaved):
    seen: dict[str, list[int]] = {g: [] for g in INTERLEAVED}
    for group, batch in interleaved:
        seen[group].append(len(batch["lonlat"]))
        sensor = group.split("+")[0]
        assert {"lonlat", sensor, f"{sensor}.valid", f"{sensor}.present"} <= set(batch)
    for g, n in INTERLEAVED.items():
        assert sum(seen[g]) == sample_manifest["groups"][g]["by_split"]["train"]  # every row, once
        assert all(b == n for b in seen[g][:-1]) and 0 < seen[g][-1] <= n
    order = [g for g, _ in interleaved]
    assert order[:2] == list(INTERLEAVED)  # each round visits every group still streaming
    assert order[: 2 * min(len(v) for v in seen.values())] == list(INTERLEAVED) * min(len(v) for v in seen.values())


# ------------------------------------------------------------------------------------ decode and stats


def test_decode_matches_an_independent_decode(sample_manifest, root, rgb_dem):
    group = "vhr_rgb+dem"
    g = sample_manifest["groups"][group]
    table = _table(root, sample_manifest, group)
    got = rgb_dem
    assert len(got["lonlat"]) == table.num_rows == g["count"]
    index = _by_lonlat(got["lonlat"])

    checked_invalid = checked_absent = 0
    for sensor in g["sensors"]:
        transform, mean, std = _hand_norm(sample_manifest, group, sensor)
        spec, vspec = g["tensors"][sensor], g["tensors"][f"{sensor}.valid"]
        assert got[sensor].dtype == np.float32 and got[sensor].shape[1:] == tuple(spec["shape"])
        for i in range(table.num_rows):
            j = index[(float(np.float32(table["lon"][i].as_py())), float(np.float32(table["lat"][i].as_py())))]
            raw = _hand_chip(table, i, sensor, spec)
            valid = _hand_chip(table, i, f"{sensor}.valid", vspec).astype(bool)
            phys = transform.apply(raw).astype(np.float64)
            want = np.where(valid, (phys - mean[:, None, None]) / std[:, None, None], 0.0)
            np.testing.assert_allclose(got[sensor][j], want, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(got[f"{sensor}.valid"][j], valid)
            present = table[f"{sensor}.present"][i].as_py()
            assert got[f"{sensor}.present"][j] == present
            checked_invalid += int((~valid).sum())
            if not present:
                checked_absent += 1
                assert not valid.any() and not got[sensor][j].any()
    assert checked_invalid > 0 and checked_absent > 0  # the invalid and the absent paths were exercised
    assert np.isfinite(got["dem"]).all() and np.isfinite(got["vhr_rgb"]).all()


def test_invalid_pixels_are_zero_even_when_nodata_is_nan(sample_manifest, root):
    """A float sensor whose nodata is NaN (or that overflows) must still give 0 at invalid pixels:
    multiplying by the mask would leave NaN * 0 = NaN in the batch."""
    group, sensor = "vhr_rgb+dem", "dem"
    table = _table(root, sample_manifest, group).slice(0, 40)
    reader = GroupReader.from_manifest(sample_manifest, group)
    field = table.schema.field(sensor)
    raw = schema.read_tensor(table, sensor).copy()
    valid = schema.read_tensor(table, f"{sensor}.valid").astype(bool)
    assert (~valid).any()
    invalid = np.broadcast_to(~valid[:, None], raw.shape)
    raw[invalid] = np.nan
    raw[tuple(np.argwhere(invalid)[-1])] = np.inf
    nan_table = table.set_column(table.schema.get_field_index(sensor), field, schema.tensor_array(raw, field))
    out = decode(nan_table, reader)
    assert np.isfinite(out[sensor]).all()
    assert not out[sensor][invalid].any()
    assert out[sensor].dtype == np.float32
    np.testing.assert_array_equal(out[sensor][~invalid], decode(table, reader)[sensor][~invalid])


def test_decode_of_no_rows(sample_manifest, root):
    table = _table(root, sample_manifest, "landsat7_etm+label").slice(0, 0)
    out = decode(table, GroupReader.from_manifest(sample_manifest, "landsat7_etm+label"))
    assert out["landsat7_etm"].shape == (0, 6, 32, 32) and out["label"].shape == (0, 32, 32)


def test_normalised_bands_have_zero_mean_unit_std(sample_manifest, rgbn):
    """The manifest's stats are over every valid pixel of every split of this sensor, so over all
    splits the decoded bands are standardised exactly; one split alone only roughly."""
    assert sample_manifest["sensors"]["vhr_rgbn"]["count"] == sample_manifest["groups"]["vhr_rgbn"]["count"]

    def moments(parts):
        x = np.concatenate([p["vhr_rgbn"] for p in parts]).astype(np.float64)
        valid = np.concatenate([p["vhr_rgbn.valid"] for p in parts])
        assert not x.transpose(1, 0, 2, 3)[:, ~valid].any()  # invalid pixels are exactly 0
        bands = x.transpose(1, 0, 2, 3)[:, valid]  # (C, valid pixels)
        return bands.mean(axis=1), bands.std(axis=1)

    mean, std = moments(list(rgbn.values()))
    np.testing.assert_allclose(mean, 0.0, atol=1e-3)
    np.testing.assert_allclose(std, 1.0, atol=1e-3)
    mean, std = moments([rgbn["train"]])
    assert (np.abs(mean) < 0.5).all() and ((std > 0.5) & (std < 2.0)).all(), (mean, std)


# --------------------------------------------------------------------------------------------- series


def test_time_series_batches(sample_manifest, root, series):
    g = sample_manifest["groups"][SERIES]
    table = _table(root, sample_manifest, SERIES)
    n, k = table.num_rows, 16
    assert series["s1_grd_db"].shape == (n, k, 1, 16, 16) and n == g["count"]
    assert series["s1_grd_db.valid"].shape == (n, k, 16, 16)
    assert series["s1_grd_db.doy"].dtype == np.int64 and series["s1_grd_db.tmask"].dtype == bool
    assert series["s1_grd_db.tmask"].all()  # 160 dates > 16: no padding
    doy = series["s1_grd_db.doy"]
    assert ((doy >= 1) & (doy <= 366)).all()
    assert (np.diff(doy, axis=1) >= 0).all()  # a sorted subset (the series lies within one year)

    transform, mean, std = _hand_norm(sample_manifest, SERIES, "s1_grd_db")
    index = _by_lonlat(series["lonlat"])
    for i in range(n):
        j = index[(float(np.float32(table["lon"][i].as_py())), float(np.float32(table["lat"][i].as_py())))]
        row = table["s1_grd_db"][i].as_py()
        raw = np.frombuffer(row["data"], np.float32).reshape(row["shape"])
        vrow = table["s1_grd_db.valid"][i].as_py()
        ok = np.frombuffer(vrow["data"], np.uint8).reshape(vrow["shape"]).astype(bool)
        dates = [d.timetuple().tm_yday for d in table["s1_grd_db.dates"][i].as_py()]
        want = np.where(ok[:, None], (transform.apply(raw).astype(np.float64) - mean[0]) / std[0], 0.0)
        used = -1
        for t in range(k):
            # Some days hold two passes: the date is one of those with this day of year, after the last one used.
            candidates = [c for c, d in enumerate(dates) if d == doy[j, t] and c > used]
            match = [c for c in candidates if np.allclose(series["s1_grd_db"][j, t], want[c], rtol=1e-5, atol=1e-5)
                     and (series["s1_grd_db.valid"][j, t] == ok[c]).all()]
            assert match, (i, t)
            used = match[0]


def test_date_subsets_depend_on_sample_and_seed_only(sample_manifest, root, series):
    """The workers' subsets (seed 0) are reproduced here, in another process, from another slice of
    the rows; another seed picks other dates."""
    table = _table(root, sample_manifest, SERIES)
    index = _by_lonlat(series["lonlat"])

    def doys(seed: int, start: int = 0) -> dict[tuple, np.ndarray]:
        part = table.slice(start)
        out = decode(part, GroupReader.from_manifest(sample_manifest, SERIES, max_dates=16, seed=seed))
        return {(float(a), float(b)): out["s1_grd_db.doy"][i] for i, (a, b) in enumerate(out["lonlat"])}

    here, shifted, other = doys(0), doys(0, start=3), doys(1)
    for key, i in index.items():
        np.testing.assert_array_equal(here[key], series["s1_grd_db.doy"][i])
    for key, d in shifted.items():
        np.testing.assert_array_equal(d, here[key])
    assert sum(not np.array_equal(other[key], here[key]) for key in here) >= len(here) - 1
    # Different samples of one seed get different subsets too.
    assert len({tuple(d) for d in here.values()}) > 1


def test_short_series_are_padded(sample_manifest, root):
    table = _table(root, sample_manifest, SERIES).slice(0, 2)
    out = decode(table, GroupReader.from_manifest(sample_manifest, SERIES, max_dates=200))
    dates = [[d.timetuple().tm_yday for d in row] for row in table["s1_grd_db.dates"].to_pylist()]
    t = len(dates[0])
    assert out["s1_grd_db"].shape == (2, 200, 1, 16, 16)
    assert out["s1_grd_db.tmask"][:, :t].all() and not out["s1_grd_db.tmask"][:, t:].any()
    np.testing.assert_array_equal(out["s1_grd_db.doy"][:, :t], dates)  # every date, in order
    assert not out["s1_grd_db.doy"][:, t:].any()
    assert not out["s1_grd_db"][:, t:].any() and not out["s1_grd_db.valid"][:, t:].any()


# --------------------------------------------------------------------------------------------- labels


def test_labels(sample_manifest, root, interleaved):
    group = "landsat7_etm+label"
    g = sample_manifest["groups"][group]
    got = _collect(b for name, b in interleaved if name == group)
    assert got["label"].dtype == np.int64 and got["label"].shape == (g["by_split"]["train"], 32, 32)
    assert torch.as_tensor(got["label"]).dtype == torch.int64
    n_classes = len(g["label"]["classes"])
    assert got["label"].min() >= -1 and got["label"].max() < n_classes

    table = _table(root, sample_manifest, group)
    index = _by_lonlat(got["lonlat"])
    train = [i for i in range(table.num_rows) if table["split"][i].as_py() == "train"]
    assert len(train) == len(index)
    for i in train:
        j = index[(float(np.float32(table["lon"][i].as_py())), float(np.float32(table["lat"][i].as_py())))]
        np.testing.assert_array_equal(got["label"][j], _hand_chip(table, i, "label", g["tensors"]["label"]))

    # Unlabelled pixels (-1 in the shard) stay -1 after decoding. The sample's strata cover every
    # pixel, so mark some unlabelled in a copy of real rows.
    part = table.slice(0, 4)
    labels = schema.read_tensor(part, "label").copy()
    labels[1, :5, :7] = -1
    field = part.schema.field("label")
    part = part.set_column(part.schema.get_field_index("label"), field, schema.tensor_array(labels, field))
    out = decode(part, GroupReader.from_manifest(sample_manifest, group))["label"]
    assert out.dtype == np.int64
    assert (out[1, :5, :7] == -1).all() and (out[labels != -1] >= 0).all()
    np.testing.assert_array_equal(out, labels)


# ------------------------------------------------------------------------------------------ interleave


def test_interleave_round_robin_until_all_exhausted():
    def batches(n_batches: int, size: int, tag: str) -> list[dict]:
        return [{"x": np.full((size, 2), i), "tag": tag} for i in range(n_batches)]

    inputs = {"a": batches(3, 4, "a"), "b": batches(1, 2, "b"), "empty": [], "c": batches(5, 1, "c")}
    out = list(interleave(inputs))
    assert [name for name, _ in out] == ["a", "b", "c", "a", "c", "a", "c", "c", "c"]
    for name, items in inputs.items():
        mine = [b for n, b in out if n == name]
        assert len(mine) == len(items)
        assert all(x is y for x, y in zip(mine, items))  # each batch as given: its group's size, in order
    assert list(interleave({})) == []


# --------------------------------------------------------------------------------------------- augment


def _dihedral(img: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square, for the last two axes."""
    rots = [np.rot90(img, r, axes=(-2, -1)) for r in range(4)]
    return rots + [np.flip(r, axis=-1) for r in rots]


def _aug_batch(n: int = 16, size: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(n, 3, size, size, generator=g)
    return {
        "opt": img,
        "opt.valid": img[:, 0] > 0,
        "sar": img[:, :1].clone(),  # a second view of the same place
        "sar.valid": img[:, 0] > 0,
        "ts": img[:, None].repeat(1, 4, 1, 1, 1),  # a series of the same image
        "ts.valid": (img[:, 0] > 0)[:, None].repeat(1, 4, 1, 1),
        "ts.doy": torch.arange(4).repeat(n, 1),
        "label": (img[:, 1] * 3).round().long().clamp(-1, 5),
        "lonlat": torch.randn(n, 2, generator=g),
        "opt.present": torch.ones(n, dtype=torch.bool),
    }


def test_flip_rotate_moves_every_view_together():
    batch = _aug_batch()
    out = flip_rotate(batch, ["opt", "sar", "ts"], torch.Generator().manual_seed(3))
    img = out["opt"]
    assert not torch.equal(img, batch["opt"])
    torch.testing.assert_close(out["sar"], img[:, :1], rtol=0, atol=0)
    assert torch.equal(out["opt.valid"], img[:, 0] > 0) and torch.equal(out["sar.valid"], img[:, 0] > 0)
    assert out["opt.valid"].dtype == torch.bool
    assert torch.equal(out["ts"], img[:, None].repeat(1, 4, 1, 1, 1))
    assert torch.equal(out["ts.valid"], (img[:, 0] > 0)[:, None].repeat(1, 4, 1, 1))
    assert torch.equal(out["label"], (img[:, 1] * 3).round().long().clamp(-1, 5))
    for key in ("ts.doy", "lonlat", "opt.present"):
        assert out[key] is batch[key]
    # Each sample is one of the 8 symmetries of its input.
    for i in range(len(img)):
        assert any(np.array_equal(img[i].numpy(), v) for v in _dihedral(batch["opt"][i].numpy()))


def test_flip_rotate_is_reproducible_and_reaches_all_eight_variants():
    batch = _aug_batch()
    a = flip_rotate(batch, ["opt"], torch.Generator().manual_seed(11))
    b = flip_rotate(batch, ["opt"], torch.Generator().manual_seed(11))
    c = flip_rotate(batch, ["opt"], torch.Generator().manual_seed(12))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["opt"], c["opt"])

    seen = set()
    for seed in range(4):
        out = flip_rotate(batch, ["opt"], torch.Generator().manual_seed(seed))
        for i in range(len(out["opt"])):
            variants = _dihedral(batch["opt"][i].numpy())
            seen.add(next(v for v, x in enumerate(variants) if np.array_equal(out["opt"][i].numpy(), x)))
    assert seen == set(range(8))


def test_flip_rotate_edge_cases():
    batch = {"opt": torch.zeros(0, 3, 8, 8), "label": torch.zeros(0, 8, 8, dtype=torch.long)}
    out = flip_rotate(batch, ["opt"], torch.Generator().manual_seed(0))
    assert out["opt"].shape == (0, 3, 8, 8)
    classification = {"opt": torch.randn(2, 3, 8, 8), "label": torch.tensor([1, 2])}
    assert flip_rotate(classification, ["opt"], torch.Generator())["label"] is classification["label"]
    with pytest.raises(ValueError, match="opt"):
        flip_rotate({"opt": torch.zeros(2, 3, 8, 6)}, ["opt"], torch.Generator())


def test_epoch_cache_replays_every_row_once_in_a_new_order_per_epoch():
    from earthray.train.loop import EpochCache

    rows = torch.arange(43)  # 5 full batches of 8 and a remainder, as a drop_last stream never yields

    def stream():
        return ({"x": rows[i:i + 8], "y": -rows[i:i + 8]} for i in range(0, 40, 8))

    cache = EpochCache(1)
    assert torch.equal(torch.cat([b["x"] for b in cache("g", stream, seed=1)]), rows[:40])  # first epoch: streamed
    epoch = [b for b in cache("g", stream, seed=1)]
    assert all(len(b["x"]) == 8 and torch.equal(b["y"], -b["x"]) for b in epoch)
    one = torch.cat([b["x"] for b in epoch])
    assert sorted(one.tolist()) == list(range(40)) and not torch.equal(one, rows[:40])
    assert torch.equal(one, torch.cat([b["x"] for b in cache("g", stream, seed=1)]))  # repeatable
    assert not torch.equal(one, torch.cat([b["x"] for b in cache("g", stream, seed=2)]))
    assert torch.equal(torch.cat([b["x"] for b in cache("g", stream)]), rows[:40])  # held-out: stream order
