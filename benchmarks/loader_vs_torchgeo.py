"""Chip loading: earthray's shard streaming against TorchGeo's GeoTIFF sampling, same scene, same cores, one run.

    python benchmarks/loader_vs_torchgeo.py [--samples 2000] [--warmup 2000] [--passes 5] [--batch 16] [--cpus 2]
    python benchmarks/loader_vs_torchgeo.py --quick      # a smoke run: a few hundred samples

Needs TorchGeo (the ``bench`` extra: ``pip install -e '.[bench]'``).

Both sides deliver 3 x 192 x 192 float32 chips of the bundled real Landsat 8 scene
(``data/sample/landsat8_parana``, bands B2, B3, B4 as three one-band GeoTIFFs) in batches of
``--batch``, on ``--cpus`` cores:

* earthray: the scene is ingested once (not timed) into Parquet shards, chip size 192, the
  default row-group size, with a stride small enough that the shards hold at least as many
  distinct chips as are read (chips overlap, as TorchGeo's random windows do). Timed:
  ``stream = open_group(root, group)`` then ``stream.dataset.iter_torch_batches(batch_size=...,
  collate_fn=stream.collate)`` on a local Ray started with ``num_cpus=--cpus``: Ray Data reads
  row groups as stored (uint16) in its tasks; each batch is decoded and normalised to float32 in
  the iterator's prefetch thread. ``--decode-in-ray-data`` times the older path instead
  (``read_group``: decode in a Ray Data ``map_batches`` stage, float32 through the object store).
* TorchGeo: a ``RasterDataset`` over the same three band files (``separate_files``), a
  ``RandomGeoSampler(size=192, length=...)`` and ``DataLoader(num_workers=--cpus,
  collate_fn=stack_samples)``: each sample is a windowed read of the GeoTIFFs, cast to float32
  (no normalisation). Ray is shut down before this side runs.

Each side makes a warm-up pass of ``--warmup`` samples (worker processes, imports, page cache),
then ``--passes`` timed passes of ``--samples`` samples each, each from creating the iterator to its last batch: the
start-up of a pass (Ray Data's executor; the DataLoader's worker processes) is inside it, and so
nothing is read ahead before the clock starts (timing only the tail of one long pass would let
Ray Data's read-ahead fill its buffers untimed). The time to the first batch is shown beside it.
Reported: samples/s and MB/s (bytes of the float32 image tensors delivered, 1 MB = 1e6 bytes)
of each side's median pass, the range over passes, and the ratio of the medians earthray / TorchGeo.
One pass of 2000 samples is 2-7 s here and single passes spread by up to 2x on this shared
machine (812 to 1324 samples/s for earthray in one session), hence the median of several.

Where earthray's time went (py-spy, 2 CPUs): before ``ShardSource`` moved to ``data/shards.py``, every
Ray Data read worker imported torch through ``data/stream.py`` (seconds per worker, 8 workers at
``num_cpus=0.25``), inside the timed pass whenever Ray started a fresh worker: 588 samples/s; without
it about 750-1300. What remains is Parquet decoding of the uint16 row groups in the read tasks
(pyarrow, about a third), the consumer's decode + normalise to float32 in the collate (numpy,
about a third) and Ray Data's executor and object-store transfers.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import rasterio

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "data/sample/landsat8_parana"
BANDS = ["B2", "B3", "B4"]
CHIP = 192
SENSOR = "landsat8_oli_tirs"
INSTALL = "pip install -e '.[bench]'"


def _stride(width: int, height: int, chip: int, needed: int) -> int:
    """The largest stride whose chip grid over the scene holds ``needed`` chips (1 if none does)."""
    for s in range(max(width, height), 0, -1):
        if ((width - chip) // s + 1) * ((height - chip) // s + 1) >= needed:
            return s
    return 1


def _median_pass(make: Callable[[], Iterable[dict]], key: str, passes: int) -> tuple[float, float, int, int, float, float]:
    """The median of ``passes`` timed passes, and the fastest and slowest pass's seconds."""
    runs = sorted((_timed(make(), key) for _ in range(passes)), key=lambda r: r[0])
    return (*runs[len(runs) // 2], runs[0][0], runs[-1][0])


def _timed(batches: Iterable[dict], key: str) -> tuple[float, float, int, int]:
    """One whole pass, from creating its iterator to its last batch: (seconds, seconds to the first
    batch, samples, bytes of the ``key`` tensors)."""
    start = time.perf_counter()
    first, samples, nbytes = None, 0, 0
    for batch in batches:
        x = batch[key]
        first = first or time.perf_counter() - start
        samples += x.shape[0]
        nbytes += x.numel() * x.element_size()
    return time.perf_counter() - start, first or 0.0, samples, nbytes


def earthray_side(work: Path, cpus: int, batch: int, warmup: int, timed: int, passes: int,
                  in_ray_data: bool = False) -> tuple[float, float, int, int, float, float, str]:
    import ray

    from earthray.compat import loopback_only_local_ray
    from earthray.data.ingest import ingest
    from earthray.data.spec import IngestSpec
    from earthray.data.stream import open_group
    from earthray.runtime import ensure_ray

    files = [str(next(SCENE.glob(f"*_{b}.TIF"))) for b in BANDS]
    with rasterio.open(files[0]) as src:
        width, height = src.width, src.height
    stride = _stride(width, height, CHIP, max(warmup, timed) * batch)
    loopback_only_local_ray()  # as ensure_ray starts a local Ray: on 127.0.0.1 only
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ensure_ray()  # joins the Ray just started; quiets Ray Data's progress output
    try:
        root = work / "shards"
        manifest = ingest(IngestSpec(output=str(root), chip_size=CHIP, stride=stride, min_valid_fraction=0.0, inputs=[
            {"name": "landsat8_parana", "sensors": {SENSOR: {"stack": files, "bands": BANDS}}}]))
        group = next(iter(manifest["groups"]))
        chips = manifest["counts"]["total"]
        if chips < timed * batch:
            raise SystemExit(f"the shards hold {chips} chips, fewer than the {timed * batch} to be read")
        stream = open_group(root, group)

        def batches(k: int):
            if in_ray_data:
                return stream.decoded().limit(k * batch).iter_torch_batches(batch_size=batch)
            return stream.dataset.limit(k * batch).iter_torch_batches(batch_size=batch, collate_fn=stream.collate)

        _timed(batches(warmup), SENSOR)  # warm-up pass
        measured = _median_pass(lambda: batches(timed), SENSOR, passes)
    finally:
        ray.shutdown()
    note = (f"earthray: {chips} chips of {CHIP} px (stride {stride}) ingested from a {width}x{height} scene, "
            f"group {group!r}")
    return (*measured, note)


def torchgeo_side(cpus: int, batch: int, warmup: int, timed: int, passes: int) -> tuple[float, float, int, int, float, float, str]:
    import torch
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import RandomGeoSampler

    class Landsat8L1(RasterDataset):
        """Landsat 8 Collection 1 Level-1 scenes, one GeoTIFF per band (``..._RT_B2.TIF``)."""

        filename_glob = f"LC08_*_{BANDS[0]}.TIF"  # one file per scene; the other bands via the band group
        filename_regex = r"""
            ^LC08_(?P<level>[A-Z0-9]{4})
            _(?P<wrs>\d{6})
            _(?P<date>\d{8})
            _\d{8}_\d{2}_(?P<category>[A-Z0-9]{2})
            _(?P<band>B\d+)
            \.TIF$
        """
        date_format = "%Y%m%d"
        separate_files = True
        all_bands = tuple(BANDS)
        rgb_bands = ("B4", "B3", "B2")

    torch.manual_seed(0)
    ds = Landsat8L1(paths=str(SCENE), bands=BANDS)

    def loader(samples: int) -> DataLoader:
        sampler = RandomGeoSampler(ds, size=CHIP, length=samples)
        return DataLoader(ds, sampler=sampler, batch_size=batch, num_workers=cpus, collate_fn=stack_samples)

    _timed(loader(warmup * batch), "image")  # warm-up pass
    measured = _median_pass(lambda: loader(timed * batch), "image", passes)
    return (*measured, f"TorchGeo: random {CHIP} px windows of {', '.join(ds.files)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="timed samples per side (rounded up to whole batches)")
    ap.add_argument("--warmup", type=int, default=2000, help="samples consumed before timing starts (a pass as long as the timed one starts every Ray worker process the timed pass uses)")
    ap.add_argument("--passes", type=int, default=5, help="timed passes per side; the median is reported")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2, help="Ray's num_cpus; the DataLoader's num_workers")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 320 samples after 32")
    ap.add_argument("--decode-in-ray-data", action="store_true",
                    help="earthray decodes in a Ray Data map_batches stage (the path before decode-on-consumer)")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.warmup, args.passes = 320, 32, 1
    try:
        import torchgeo  # noqa: F401
    except ImportError:
        print(f"TorchGeo is not installed; install the bench extra: {INSTALL}", file=sys.stderr)
        sys.exit(2)

    warmup, timed = math.ceil(args.warmup / args.batch), math.ceil(args.samples / args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        name = "earthray decode in Ray Data" if args.decode_in_ray_data else "earthray open_group"
        rows = {name: earthray_side(Path(tmp), args.cpus, args.batch, warmup, timed, args.passes,
                                   args.decode_in_ray_data)}
    rows["TorchGeo RasterDataset"] = torchgeo_side(args.cpus, args.batch, warmup, timed, args.passes)

    for *_, note in rows.values():
        print(note)
    print(f"{timed * args.batch} samples per timed pass, median of {args.passes} passes per side "
          f"(after a warm-up pass of {warmup * args.batch}), "
          f"batch {args.batch}, {args.cpus} CPUs; 3x{CHIP}x{CHIP} float32 chips")
    print(f"{'':26}{'seconds':>10}{'1st batch s':>13}{'samples/s':>12}{'MB/s':>10}{'range samples/s':>18}")
    rates = {}
    for name, (secs, first, n, nbytes, fastest, slowest, _) in rows.items():
        rates[name] = n / secs
        spread = f"{n / slowest:.0f}-{n / fastest:.0f}"
        print(f"{name:26}{secs:10.2f}{first:13.2f}{n / secs:12.1f}{nbytes / 1e6 / secs:10.1f}{spread:>18}")
    er, tg = rates.values()
    print(f"ratio earthray / TorchGeo: {er / tg:.2f}")


if __name__ == "__main__":
    main()
