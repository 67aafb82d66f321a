"""Batch inference: windows/s through Ray Data + the actor pool against the bare model, and peak memory
for scenes 1x, 4x and 16x the size of the real Landsat 7 sample (it must stay flat).

    python benchmarks/batch_infer.py [--sizes 1 2 4] [--batch 32] [--actors 1]

Scenes: the real six-band Landsat 7 scene (489 x 443), tiled ``k`` x ``k`` (``k`` = 1, 2, 4: 1x, 4x, 16x the
area) with its georeferencing extended. Each size runs ``earthray.serve.infer`` in a fresh process with
its own local Ray, so peaks do not carry over; a sampler thread records the resident memory (RSS) of the
driver and, over all Ray worker processes (read tasks + model actor), the peak of their summed RSS, of
their summed PSS (shared pages, such as the object store's, split among the processes mapping them,
so a page counts once) and of how many there are. RSS sums count every mapped object-store page once
per process that touched it, so they grow with the scene even when no process holds more.
It also prints the workers' PSS at that peak by process title: ``ray::IDLE`` are the read-task workers,
``ray::MapWorker(...)`` the model actor.

Where the memory goes (2026-12-03, ``--sizes 1 4``): a read-task worker held about 600 MB of PSS,
because ``read_windows``'s module imported torch (about 480 MB of private memory per process in this
torch build) although reads need only rasterio and numpy; the 1x -> 16x rise (1675 -> 2448 MB) was one
more such worker. The input contract now lives in the torch-free ``earthray.serve.inputs``: a read
worker holds about 150 MB, and the workers' PSS is 1251 MB at 1x and 1628 MB at 16x (10 processes:
three read workers instead of one, as the pipeline fills, and the model actor +70 MB of queued
batches), with steady windows/s unchanged (1.53x bare at 16x). Per process, memory does not grow with
the scene; the number of read workers is bounded by the CPUs (``read_cpus`` each).

The bare model reads the same windows of the 1x scene in one process (``Predictor.forward``, batches of
``--batch``, one torch thread) with the same normalisation; its windows/s is the reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
L7 = ["B1", "B2", "B3", "B4", "B5", "B7"]
FILES = [str(ROOT / f"data/sample/landsat7_nc/lsat7_2000_{b}.tif") for b in (10, 20, 30, 40, 50, 70)]


def tiled_scene(path: Path, k: int) -> Path:
    from earthray.io import Grid, open_scene, write_raster

    with open_scene(FILES) as scene:
        data, valid = scene.read()
        grid = scene.grid
    data = np.tile(np.where(valid, data, np.float32(-99999)), (1, k, k))
    big = Grid(grid.crs, grid.transform, grid.width * k, grid.height * k)
    return write_raster(path, data, big, nodata=-99999, band_names=L7)


class Sampler(threading.Thread):
    """Peak RSS of this process; peak summed RSS and PSS, and peak count, of the Ray worker processes."""

    def __init__(self):
        super().__init__(daemon=True)
        self.driver = self.workers = self.workers_pss = self.processes = 0
        self.at_peak: dict[str, int] = {}
        """Summed PSS by process title at the sample where the workers' PSS peaked: which kind grew."""
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            rss = pss = count = 0
            kinds: dict[str, int] = {}
            for p in me.children(recursive=True):
                try:
                    if p.name().startswith("ray::") or "default_worker.py" in " ".join(p.cmdline()):
                        full = p.memory_full_info()
                        rss, pss, count = rss + full.rss, pss + full.pss, count + 1
                        title = p.cmdline()[0].split(" ")[0] if p.cmdline() else p.name()
                        kinds[title] = kinds.get(title, 0) + full.pss
                except psutil.Error:
                    pass
            if pss > self.workers_pss:
                self.at_peak = kinds
            self.workers = max(self.workers, rss)
            self.workers_pss = max(self.workers_pss, pss)
            self.processes = max(self.processes, count)
            time.sleep(0.2)


def run_one(bundle: str, scene: str, out: str, batch: int, actors: int) -> None:
    """One inference run (in its own process); prints JSON."""
    import ray

    from earthray.serve.infer import InferSpec, infer

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    sampler = Sampler()
    sampler.start()
    spec = InferSpec(model=bundle, scenes=[scene], output=out, batch_size=batch, actors=actors, actor_cpus=1,
                     read_cpus=0.5, cog=False)
    marks: list[tuple[float, int]] = []
    result = infer(spec, on_windows=lambda done, total: marks.append((time.perf_counter(), done)))
    sampler.stop.set()
    sampler.join()
    [r] = result.scenes
    assert r.status == "done", r
    # Past start-up: from the first quarter of the windows to the last. Output comes a read task at a time
    # (up to 256 windows), so a scene of a few tasks has too few marks for a rate: NaN, not a guess.
    total = marks[-1][1]
    (t0, n0), (t1, n1) = next(m for m in marks if m[1] >= total // 4), marks[-1]
    steady = (n1 - n0) / (t1 - t0) if len(marks) >= 8 and t1 > t0 else float("nan")
    print(json.dumps({"windows": result.windows, "seconds": result.seconds, "driver_rss": sampler.driver,
                      "workers_rss": sampler.workers, "workers_pss": sampler.workers_pss,
                      "processes": sampler.processes, "steady": steady,
                      "pss_at_peak": {k: v >> 20 for k, v in sorted(sampler.at_peak.items())}}))
    ray.shutdown()


def bare(bundle: str, scene: str, batch: int) -> dict:
    import torch
    from rasterio.windows import Window

    from earthray.io import open_scene
    from earthray.serve.inputs import prepare, tile_starts
    from earthray.serve.predictor import Predictor

    torch.set_num_threads(1)
    p = Predictor.load("bench", bundle, device="cpu")
    s = p.info.input_size
    start = time.perf_counter()
    n = 0
    with open_scene(scene) as sc:
        windows = [(r, c) for r in tile_starts(sc.grid.height, s, 0.25) for c in tile_starts(sc.grid.width, s, 0.25)]
        for i in range(0, len(windows), batch):
            images = []
            for r, c in windows[i:i + batch]:
                data, valid = sc.read(Window(c, r, s, s))
                images.append(prepare(p.info, data, valid, None, nan_is_nodata=True, require_valid=False))
            p.forward({k: np.stack([im[k] for im in images]) for k in images[0]})
            n += len(images)
    wall = time.perf_counter() - start
    return {"windows": n, "seconds": wall, "windows_per_s": n / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="tile factors (area x k^2)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(*args.one, args.batch, args.actors)
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_load import make_bundle

    with tempfile.TemporaryDirectory(prefix="infer-bench-") as tmp:
        tmp = Path(tmp)
        bundle = str(make_bundle(tmp / "bundle", "segmentation"))
        scenes = {k: str(tiled_scene(tmp / f"scene_x{k * k}.tif", k)) for k in args.sizes}
        base = bare(bundle, scenes[args.sizes[0]], args.batch)
        print(f"bare model (read + normalise + forward, 1 torch thread): {base['windows_per_s']:.1f} windows/s "
              f"over {base['windows']} windows of the {args.sizes[0] ** 2}x scene", flush=True)
        rows = []
        for k in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--one", bundle, scenes[k], str(tmp / f"out{k}"),
                                  "--batch", str(args.batch), "--actors", str(args.actors)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"run x{k * k} failed:\n{out.stderr[-3000:]}")
            rows.append((k, json.loads(out.stdout.strip().splitlines()[-1])))
            print(f"x{k * k} done", flush=True)
    print(f"\n{'scene':>6} {'pixels':>10} {'windows':>8} {'seconds':>8} {'win/s':>7} {'steady':>7} {'vs bare':>8} "
          f"{'driver peak MB':>15} {'workers RSS MB':>15} {'workers PSS MB':>15} {'workers':>8}")
    for k, r in rows:
        wps = r["windows"] / r["seconds"]
        print(f"{'x' + str(k * k):>6} {489 * 443 * k * k:>10} {r['windows']:>8} {r['seconds']:>8.1f} {wps:>7.1f} "
              f"{r['steady']:>7.1f} {r['steady'] / base['windows_per_s']:>8.2f} {r['driver_rss'] / 2**20:>15.0f} "
              f"{r['workers_rss'] / 2**20:>15.0f} {r['workers_pss'] / 2**20:>15.0f} {r['processes']:>8}")
    for k, r in rows:
        print(f"x{k * k} workers' PSS MB at their peak, by process: "
              + ", ".join(f"{name} {mb}" for name, mb in r["pss_at_peak"].items()))
    print("seconds and win/s include Ray start-up, Ray Data planning and the actor's model load; steady = windows/s "
          "over the last three quarters of the windows (nan: too few read tasks to time); vs bare = steady / bare. Workers = all Ray worker processes "
          "(peaks; PSS counts a shared page once).")


if __name__ == "__main__":
    main()
