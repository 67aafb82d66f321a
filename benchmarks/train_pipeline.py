"""Training throughput: the full Ray Train + Ray Data path against a bare PyTorch loop, in one run.

    python benchmarks/train_pipeline.py [--steps 150] [--batch 32] [--workers 2] [--tiles 4] [--accum 1]

Both sides train the same tiny OFA model with the same per-worker batch size, one torch
thread each. The bare loop feeds in-memory tensors in one process. The platform path
ingests a real scene (the bundled VHR RGBN sample tiled ``--tiles`` times each way) and
trains on it through Ray Data (read, decode, normalise) into Ray Train workers (DDP).
Reported: samples/s in steady state (the first logging interval, with start-up, is left
out), per worker, the ratio to the bare loop, and the fraction of step time spent waiting
for data. Targets: per worker >= 0.85 of the one-thread bare loop; in total, >= 0.85 of a bare loop
given the same cores (``--workers`` torch threads, the workers' batches together); data wait < 10 %.

Where the time goes (py-spy on the one Train worker in steady state, ``--workers 1 --steps 1500``):
the training thread is busy 92 % of the time, 79 % of it in the model's forward, backward, gradient
clipping and AdamW (the same math as the bare loop, which therefore clips too), about 3 % in the
random flips and rotations (``augment``) and the rest in the loop's bookkeeping; the Ray worker's
main thread and Ray Data's iterator threads take about 6 % of samples between them (the GIL they hold
is time the training thread waits). Data wait stays near 1.5 %: batches arrive decoded before the step
asks for them. The first logging interval also pays for importing MLflow's SQL store in the worker
(about 2 s), which is why it is left out.

At 2 workers the script also times a bare DDP loop: the same step in 2 processes (one thread each, gloo,
the platform's DDP settings, in-memory tensors, no Ray). That separates what data parallelism costs on
these cores from what the platform adds. Measured on 2026-12-03 (2 cores; ``--workers 2``):

    --batch 32:  2-thread loop 2994, bare DDP 2470 (0.83), platform 2164 (0.72; 0.88 of bare DDP)
    --batch 128: 2-thread loop 5432, bare DDP 5146 (0.95), platform 4610 (0.85; 0.90 of bare DDP)
    --accum 4 --steps 150 (batch 32, one allreduce per 4 micro-batches): 2-thread loop 3909,
                 bare DDP 3699 (0.95), platform 3325 (0.85; 0.90); while every micro-batch still
                 allreduced (before ``no_sync``): platform 2949 (0.78) beside 3771 / 3730

A gloo allreduce costs 1.3-1.9 ms here whatever its size (4 KB or the tiny model's 0.6 MB; 4 MB takes
4-5 ms) while a TCP round trip on loopback takes 24 us, and each rank waits for the slower one at every
step: ``top`` shows each worker 68-74 % busy. At batch 32 a step is about 18 ms of compute, so that fixed
cost caps any 2-process data-parallel loop near 0.8 of one process with 2 threads; at batch 128 it is
amortised and the target is met. ``find_unused_parameters`` made no measurable difference (2 x 3 runs
of the bare DDP loop alternated). In the platform's training thread (py-spy, batch 32): backward 48 %
(the allreduce wait included), forward 25 %, AdamW and the scheduler 13 %, the random flips 5 %, gradient
clipping 4 %, rank 0's MLflow write 2.5 % (6 ms every ``log_every`` steps, which the other rank waited
for at its next allreduce; it now runs on MLflow's logging thread), the next batch 0.6 %. The rest of
the gap to bare DDP is Ray's own threads in each worker sharing the two cores.

    python benchmarks/train_pipeline.py --gpu [--jobs ofa,mars,skysense] [--steps 20] [--batch N] [--peak-tflops 989]

On a machine with a GPU: the model, batch, precision and strategy of ``jobs/pretrain-ofa-base.yaml``
(OFA-Net base, DDP's step by hand, bf16 autocast), ``jobs/pretrain-mars-base.yaml`` (MaRS base through
the platform's ``DeepSpeedStrategy``, ZeRO-2, bf16; random init, so no teacher) and
``jobs/pretrain-skysense-huge.yaml`` (SkySense huge, 2.06 B parameters, ZeRO-3 with CPU offload, bf16),
each in one process on synthetic inputs at the model's sizes. Reported per job: steps/s, samples/s,
peak GPU memory (does it fit) and model FLOPs utilisation (FLOPs of one step counted by torch's
FlopCounterMode, against the accelerator's dense bf16 peak; 989 TFLOP/s for an H100/H200 SXM).
``--device cpu --preset tiny --steps 3 --batch 2`` runs the same code on the CPU (a smoke run: it
passes for all three, 2026-12-03); no GPU figures exist yet (no device has been lent).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bare_model(steps: int, batch: int, threads: int):
    """The tiny OFA model, AdamW and in-memory batches the bare baselines train on."""
    from earthray.recipes import create_recipe

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_recipe("ofa", ["vhr_rgbn"], "tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randn(steps + 5, batch, 4, 32, 32)
    valid = torch.ones(batch, 32, 32, dtype=torch.bool)  # the pipeline's batches carry masks; same work here
    return model, opt, data, valid


def _bare_steps(model, opt, data, valid, first: int, n: int, accum: int, ddp=None) -> None:
    """``n`` micro-batches by hand: forward, backward, and every ``accum`` of them the spec's default
    gradient clipping and AdamW; under DDP the micro-batches before a step's last skip the allreduce."""
    import contextlib

    from earthray.train.spec import OptimSpec

    clip = OptimSpec().clip_grad
    for i in range(first, first + n):
        last = (i + 1) % accum == 0
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            loss = (ddp or model)({"vhr_rgbn": data[i % len(data)], "vhr_rgbn.valid": valid})["loss"]
        (loss / accum).backward()
        if last:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()


def bare_loop(steps: int, batch: int, threads: int = 1, accum: int = 1) -> list[float]:
    model, opt, data, valid = _bare_model(steps, batch, threads)
    _bare_steps(model, opt, data, valid, 0, 5, accum)  # warm-up
    rates = []
    for _ in range(3):  # one short timing swings by 20 % on a shared machine
        start = time.perf_counter()
        _bare_steps(model, opt, data, valid, 5, steps, accum)
        rates.append(steps * batch / (time.perf_counter() - start))
    return rates


def _ddp_rank(rank: int, world: int, port: int, steps: int, batch: int, accum: int, rates) -> None:
    import torch.distributed as dist

    from earthray.train.strategy import DDP_OPTIONS

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, opt, data, valid = _bare_model(steps, batch, 1)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **DDP_OPTIONS)
    _bare_steps(model, opt, data, valid, 0, 5, accum, ddp)
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        _bare_steps(model, opt, data, valid, 5, steps, accum, ddp)
        rates.put((rank, steps * batch / (time.perf_counter() - start)))
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_ddp(steps: int, batch: int, world: int, accum: int = 1) -> list[float]:
    """The same step in ``world`` processes (one thread each) under DDP over gloo: no Ray, no data path."""
    import torch.multiprocessing as mp

    port = _free_port()
    ctx = mp.get_context("spawn")
    rates = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, world, port, steps, batch, accum, rates)) for r in range(world)]
    for p in procs:
        p.start()
    got = [rates.get(timeout=600) for _ in range(3 * world)]
    for p in procs:
        p.join()
    per_rank = [[rate for r, rate in got if r == rank] for rank in range(world)]
    return [sum(timing) for timing in zip(*per_rank)]


GPU_JOBS = {"ofa": "pretrain-ofa-base.yaml", "mars": "pretrain-mars-base.yaml", "skysense": "pretrain-skysense-huge.yaml"}
"""The job files whose model, batch, precision and strategy ``--gpu`` runs (OFA-Net base, MaRS base, SkySense huge)."""


def synthetic_batch(model, sensors: list[str], batch: int, dates: int, device: str) -> dict[str, torch.Tensor]:
    """Random inputs in the batch layout (``earthray.data.batch``) at the sizes the model's config sets:
    SkySense's time-series roles get ``dates`` dates at ``ts_img_size``, everything else one image."""
    c = model.config
    series = {getattr(model, "roles", {}).get(r) for r in ("ms", "sar")} - {None}
    out: dict[str, torch.Tensor] = {}
    for name in sensors:
        bands = len(model.sensors[name].bands)
        if name in series:
            out[name] = torch.randn(batch, dates, bands, c.ts_img_size, c.ts_img_size)
            out[f"{name}.doy"] = torch.randint(1, 366, (batch, dates))
        else:
            size = getattr(c, "img_size", None) or c.hr_img_size
            out[name] = torch.randn(batch, bands, size, size)
    if series:
        out["lonlat"] = torch.rand(batch, 2) * torch.tensor([360.0, 180.0]) - torch.tensor([180.0, 90.0])
    return {k: v.to(device) for k, v in out.items()}


def gpu_variant(recipe: str, steps: int, batch: int | None, peak_tflops: float, device: str, preset: str | None) -> None:
    """One job file's model at its preset and precision, one process: a DDP job's step by hand (AdamW,
    autocast), a DeepSpeed job's through the platform's ``DeepSpeedStrategy`` (its ZeRO stage and offload)."""
    import os

    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from earthray.config import read_yaml
    from earthray.recipes import create_recipe
    from earthray.recipes.base import paper_inputs
    from earthray.train.spec import PretrainSpec
    from earthray.train.strategy import DeepSpeedStrategy

    job = read_yaml(ROOT / "jobs" / GPU_JOBS[recipe])
    group, job_batch = next(iter(job["data"]["groups"].items()))
    batch = batch or job_batch
    job["data"]["groups"] = {group: batch}
    job["preset"] = preset or job["preset"]
    job["workers"] = {**job.get("workers", {}), "use_gpu": device == "cuda"}  # sets the strategy's autocast device
    for key in ("init_weights", "teacher_weights"):  # local weight files of the cluster: random init here
        job.get("model", {}).pop(key, None)
    spec = PretrainSpec.model_validate(job)
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = create_recipe(recipe, paper_inputs(recipe), spec.preset, **spec.model)
    params = sum(p.numel() for p in model.parameters())
    sensors = [g.split("@")[0] for g in group.split("+")]
    x = synthetic_batch(model, sensors, batch, spec.data.max_dates, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if spec.strategy.name == "deepspeed":
        strategy = DeepSpeedStrategy(model, spec)

        def step() -> None:
            strategy.backward(strategy.forward(x)["loss"])
            strategy.after_backward(True)
    else:
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        dtype = torch.bfloat16 if spec.strategy.precision == "bf16" else None

        def step() -> None:
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = model(x)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    peak = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{where}: {recipe} {spec.preset} ({params / 1e6:.1f} M parameters), {spec.strategy.name}"
          f"{f' ZeRO-{spec.strategy.zero_stage}' if spec.strategy.name == 'deepspeed' else ''}"
          f"{' + offload' if spec.strategy.offload else ''}, {spec.strategy.precision}, batch {batch} of {group}: "
          f"{steps / elapsed:.2f} steps/s, {steps * batch / elapsed:.1f} samples/s, "
          f"{flops / 1e9 / batch:.1f} GFLOP per sample, MFU {flops * steps / elapsed / (peak_tflops * 1e12):.1%} "
          f"of {peak_tflops:g} TFLOP/s{peak}", flush=True)


def make_scene(folder: Path, tiles: int) -> Path:
    with rasterio.open(ROOT / "data/sample/rgbn_haiti/rgbn.tif") as ds:
        data, profile = ds.read(), ds.profile
    big = np.tile(data, (1, tiles, tiles))
    path = folder / "rgbn_tiled.tif"
    profile.update(width=big.shape[2], height=big.shape[1], compress="deflate", tiled=True,
                   blockxsize=256, blockysize=256, nodata=0)
    with rasterio.open(path, "w", **profile) as out:
        out.write(big)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, help="per worker (default 32; --gpu: the job file's)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimiser step (optim.grad_accum), "
                    "on every side")
    ap.add_argument("--gpu", action="store_true", help="the GPU variant instead: the job files of GPU_JOBS")
    ap.add_argument("--jobs", default="ofa,mars,skysense", help="--gpu: which of GPU_JOBS")
    ap.add_argument("--device", default="cuda", help="--gpu: cpu for a smoke run of the same code")
    ap.add_argument("--preset", help="--gpu: override the job's preset (tiny for a CPU smoke run)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    if args.gpu:
        for recipe in args.jobs.split(","):
            gpu_variant(recipe, args.steps, args.batch, args.peak_tflops, args.device, args.preset)
        return
    args.batch = args.batch or 32

    import ray
    from mlflow.tracking import MlflowClient

    from earthray.data.ingest import ingest
    from earthray.data.spec import IngestSpec
    from earthray.train.run import pretrain
    from earthray.train.spec import PretrainSpec

    def bare_loops() -> tuple[list[float], list[float], list[float]]:
        one = bare_loop(60, args.batch, accum=args.accum)
        if args.workers == 1:
            return one, one, one
        return (one, bare_loop(60, args.batch * args.workers, threads=args.workers, accum=args.accum),
                bare_ddp(60, args.batch, args.workers, args.accum))

    # timed before and after the platform run: this shared machine's speed drifts by up to 2x within
    # minutes, and the median over both sides of the run is the figure measured beside it
    before = bare_loops()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        scene = make_scene(Path(tmp), args.tiles)
        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
        manifest = ingest(IngestSpec(output=f"{tmp}/shards", chip_size=32, split={"train": 1.0, "val": 0.0,
                                     "test": 0.0}, inputs=[{"name": "rgbn", "sensors": {"vhr_rgbn": {"path": str(scene)}}}]))
        log_every = 10
        spec = PretrainSpec.model_validate({
            "name": "bench", "workdir": f"{tmp}/work", "recipe": "ofa", "preset": "tiny",
            "data": {"root": f"{tmp}/shards", "groups": {"vhr_rgbn": args.batch}, "augment": True},
            "workers": {"num_workers": args.workers, "cpus_per_worker": 0.5},
            "max_steps": args.steps, "checkpoint_every": args.steps, "tracking": {"log_every": log_every},
            "optim": {"grad_accum": args.accum}})
        start = time.perf_counter()
        result = pretrain(spec)
        wall = time.perf_counter() - start
        client = MlflowClient(result.tracking_uri)
        rate = [m.value for m in client.get_metric_history(result.run_id, "samples_per_s")][1:]
        wait = [m.value for m in client.get_metric_history(result.run_id, "data_wait_fraction")][1:]
        ray.shutdown()
    after = bare_loops()
    bare, bare_all, ddp = (statistics.median(b + a) for b, a in zip(before, after))
    total = statistics.median(rate)
    per_worker = total / args.workers
    print(f"data: {manifest['counts']['total']} real chips (32 px, 4 bands); {args.steps} steps of "
          f"{args.accum} x {args.batch} per worker on {args.workers} workers; run wall time {wall:.0f} s incl. start-up")
    print(f"{'':34}{'samples/s':>12}")
    print(f"{'bare PyTorch loop (1 thread)':34}{bare:12.0f}   (before the run {statistics.median(before[0]):.0f}, "
          f"after {statistics.median(after[0]):.0f})")
    if args.workers > 1:
        print(f"{f'bare loop, {args.workers} threads, batch x{args.workers}':34}{bare_all:12.0f}")
        print(f"{f'bare DDP, {args.workers} processes (gloo)':34}{ddp:12.0f}")
    print(f"{'Ray Train + Ray Data, total':34}{total:12.0f}")
    print(f"{'Ray Train + Ray Data, per worker':34}{per_worker:12.0f}")
    print(f"ratio per worker / bare (1 thread): {per_worker / bare:.2f} (target >= 0.85)")
    print(f"ratio total / bare on the same {args.workers} cores: {total / bare_all:.2f} (target >= 0.85)")
    if args.workers > 1:
        print(f"ratio total / bare DDP on the same {args.workers} cores: {total / ddp:.2f}; "
              f"bare DDP / bare {args.workers} threads: {ddp / bare_all:.2f} (what data parallelism itself costs here)")
    print(f"data wait fraction (median of steady-state logs): {statistics.median(wait):.1%} (target < 10 %)")


if __name__ == "__main__":
    main()
