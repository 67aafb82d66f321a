"""The one training loop every recipe runs in, on each Ray Train worker.

Steps are optimiser steps. After each one (with gradient accumulation: after the last
micro-batch of each) the strategy runs the recipe's ``on_step_end`` on every rank (EMA
teachers, prototypes, centres: the loop itself never touches recipe state), and the
bytes a pretraining recipe then holds between steps are logged as ``held_bytes``.

A checkpoint holds the strategy's state (every rank's shard under DeepSpeed), the full
fp32 weights (``model.safetensors``, for export) and ``trainer_state.json`` (step, epoch,
micro-batches consumed in that epoch), so a restarted worker group resumes at the next
step, skipping the micro-batches the epoch had already used.
"""

from __future__ import annotations

import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from earthray.data.augment import flip_rotate
from earthray.data.pipeline import interleave
from earthray.recipes import create_recipe
from earthray.sensors import Sensor
from earthray.train.preview import save_previews
from earthray.train.progress import WorkerProgress
from earthray.train.spec import FinetuneSpec, PretrainSpec, TrainSpec
from earthray.train.strategy import make_strategy

TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"


class _Meter:
    """Running sums between two log lines: loss terms, samples, time waiting for data and in total."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.terms: dict[str, float] = {}
        self.steps = self.samples = 0
        self.wait = 0.0
        self.start = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], samples: int) -> None:
        for k, v in out.items():
            self.terms[k] = self.terms.get(k, 0.0) + float(v.detach())
        self.samples += samples

    def summary(self, world: int, micro: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        metrics = {k: v / max(micro, 1) for k, v in self.terms.items()}
        metrics.update({"samples_per_s": self.samples * world / elapsed, "data_wait_fraction": self.wait / elapsed})
        return metrics


class EpochCache:
    """Keeps a worker's rows of a small group in memory after its first full epoch.

    Every epoch of a Ray Data stream starts a new streaming execution (seconds on a small
    machine), which dominates when a group holds only a few batches (a labelled fine-tuning
    set, the sample data). A replayed epoch is re-batched in an order drawn from ``seed``
    (one per epoch and worker, so a resumed run replays it the same way), or in stream order
    without a seed (held-out sets).
    """

    def __init__(self, limit_mb: float):
        self.limit = limit_mb * 2**20
        self.kept: dict[str, tuple[dict[str, torch.Tensor], int]] = {}
        self.too_big: set[str] = set()

    def __call__(self, name: str, make_stream, seed: int | None = None):
        if name in self.kept:
            rows, size = self.kept[name]
            n = len(next(iter(rows.values())))
            if seed is None:
                order, last = torch.arange(n), n
            else:  # full batches only, as the stream gave them (drop_last)
                order, last = torch.randperm(n, generator=torch.Generator().manual_seed(seed)), n - n % size
            for i in range(0, last, size):
                idx = order[i:i + size]
                yield {k: v[idx] for k, v in rows.items()}
            return
        batches, total = [], 0
        for batch in make_stream():
            if name not in self.too_big:
                total += sum(v.numel() * v.element_size() for v in batch.values())
                if total > self.limit:
                    self.too_big.add(name)
                    batches = []
                else:
                    batches.append(batch)
            yield batch
        if name not in self.too_big and batches:
            self.kept[name] = ({k: torch.cat([b[k] for b in batches]) for k in batches[0]},
                               len(next(iter(batches[0].values()))))


def _sensors(config: dict) -> list[Sensor]:
    return [Sensor.model_validate(s) for s in config["sensors"]]


def build_model(config: dict) -> tuple[TrainSpec, torch.nn.Module]:
    """The job's spec and model: a recipe to pretrain, or a bundle's encoder with a task head."""
    if config.get("kind") == "finetune":
        from earthray.bundle import load_bundle
        from earthray.tasks import TaskModel, TaskSpec

        spec = FinetuneSpec.model_validate(config["spec"])
        torch.manual_seed(spec.seed)
        return spec, TaskModel.from_bundle(load_bundle(config["bundle_path"]), TaskSpec.model_validate(config["task"]))
    spec = PretrainSpec.model_validate(config["spec"])
    torch.manual_seed(spec.seed)
    return spec, create_recipe(spec.recipe, _sensors(config), spec.preset, **spec.model)


def evaluate_shards(strategy, shards: dict, batch_size: int, rank: int, world: int,
                    cache: EpochCache | None = None) -> dict[str, float]:
    """The task's torchmetrics over the held-out split, reduced across workers.

    Every worker streams the whole (unsplit) held-out set and scores every ``world``-th batch:
    Ray Train's split drops rows to even out shards, which would change the metrics."""
    model = strategy.module
    metrics = model.metrics()
    model.eval()
    cache = cache or EpochCache(0)
    for name, shard in shards.items():
        for i, batch in enumerate(cache(name, lambda shard=shard: shard.iter_torch_batches(batch_size=batch_size))):
            if i % world == rank:
                with strategy.autocast():
                    model.update_metrics(metrics, strategy.cast(batch))
    model.train()
    return {f"val_{k}": float(v) for k, v in metrics.compute().items()}


def train_loop(config: dict) -> None:
    import ray.train
    from safetensors.torch import save_file

    from earthray import tracking

    spec, model = build_model(config)
    torch.set_num_threads(max(1, int(spec.workers.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sensors = _sensors(config)
    strategy = make_strategy(model, spec)
    progress = WorkerProgress(spec, rank)  # log lines, and rank 0's events for the driver (earthray.train.progress)

    state = {"step": 0, "epoch": 0, "micro": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            strategy.load(Path(d))
            state = json.loads((Path(d) / TRAINER_STATE).read_text())
        if rank == 0:
            progress.note(state["step"], f"resumed {spec.name} at step {state['step']}")
            tracking.log_metrics(config["tracking_uri"], config["run_id"], {"resumed_from_step": state["step"]},
                                 state["step"])

    shards = {g: ray.train.get_dataset_shard(g) for g in spec.data.groups}
    held_out = {g: ray.train.get_dataset_shard(f"eval.{g}") for g in spec.data.groups} \
        if isinstance(spec, FinetuneSpec) else {}
    names = [s.name for s in sensors]
    step, epoch, skip = state["step"], state["epoch"], state["micro"]
    meter, accum, micro_since_log = _Meter(), 0, 0
    latest: dict[str, float] = {}
    cache, eval_cache = EpochCache(spec.data.cache_mb), EpochCache(spec.data.cache_mb)
    progress.start(step)

    def report(final: bool) -> None:
        weights = strategy.full_state_dict()  # collective under ZeRO-3: every rank takes part
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            strategy.save(d, rank)
            if rank == 0:
                save_file({k: v.contiguous() for k, v in weights.items()}, str(d / WEIGHTS))
                (d / TRAINER_STATE).write_text(json.dumps({"step": step, "epoch": epoch, "micro": micro}))
            has_files = any(d.iterdir())
            ray.train.report({"step": step, "epoch": epoch, "final": final, **latest},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)

    while step < spec.max_steps:
        # rows are mixed anew each epoch, repeatably (a resumed epoch sees the same order)
        order = hash((spec.seed, epoch, rank)) & 0x7FFFFFFF if spec.data.shuffle_buffer else None
        streams = {g: cache(g, partial(shards[g].iter_torch_batches, batch_size=bs, drop_last=True,
                                       local_shuffle_buffer_size=spec.data.shuffle_buffer or None,
                                       local_shuffle_seed=order), seed=order)
                   for g, bs in spec.data.groups.items()}
        stream = iter(interleave(streams))
        micro, seen = 0, 0
        while step < spec.max_steps:
            t0 = time.perf_counter()
            try:
                _group, batch = next(stream)
            except StopIteration:
                break
            meter.wait += time.perf_counter() - t0
            seen += 1
            if micro < skip:  # already trained on before the restart
                micro += 1
                continue
            if spec.data.augment:
                gen = torch.Generator().manual_seed(hash((spec.seed, step, rank, micro)) & 0x7FFFFFFF)
                batch = flip_rotate(batch, names, gen)
            out = strategy.forward(batch)
            strategy.backward(out["loss"])
            micro += 1
            accum += 1
            micro_since_log += 1
            boundary = accum == spec.optim.grad_accum
            strategy.after_backward(boundary)
            meter.add(out, len(next(iter(batch.values()))))
            if not boundary:
                continue
            accum = 0
            step += 1
            strategy.on_step_end(step)
            progress.tick(step)
            if rank == 0 and (step % spec.tracking.log_every == 0 or step == spec.max_steps):
                metrics = meter.summary(world, micro_since_log) | {"lr": strategy.lr, "epoch": epoch}
                if isinstance(spec, PretrainSpec):
                    metrics["held_bytes"] = strategy.held_bytes()
                tracking.log_metrics(config["tracking_uri"], config["run_id"], metrics, step)
                shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "samples_per_s"))
                progress.line(step, f"{spec.name} step {step}/{spec.max_steps} {shown} "
                                    f"wait {100 * metrics['data_wait_fraction']:.0f}%", status=shown)
                latest.update({k: v for k, v in metrics.items() if k in ("loss", "lr")})
                meter.reset()
                micro_since_log = 0
            if held_out and ((spec.eval.every and step % spec.eval.every == 0) or step == spec.max_steps):
                scores = evaluate_shards(strategy, held_out, spec.eval.batch_size, rank, world, eval_cache)
                latest.update(scores)
                if rank == 0:
                    tracking.log_metrics(config["tracking_uri"], config["run_id"], scores, step)
                    progress.note(step, f"{spec.name} step {step} "
                                  + " ".join(f"{k} {v:.4g}" for k, v in scores.items()))
            if spec.tracking.preview_every and step % spec.tracking.preview_every == 0 and hasattr(strategy.module,
                                                                                                   "reconstruct"):
                recons = strategy.reconstruct(batch)
                if rank == 0 and recons:
                    with tempfile.TemporaryDirectory() as tmp:
                        for png in save_previews(recons, Path(tmp), step):
                            tracking.log_artifact(config["tracking_uri"], config["run_id"], png, "previews")
            if step % spec.checkpoint_every == 0 or step == spec.max_steps:
                report(final=step == spec.max_steps)
        if seen == 0:
            raise RuntimeError(f"{spec.name}: no full batch in groups {list(spec.data.groups)} (split "
                               f"{spec.data.split!r}); lower the batch sizes or ingest more data")
        if step < spec.max_steps:
            epoch, skip = epoch + 1, 0
