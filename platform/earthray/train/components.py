"""The training loop's components, each owning its cadence: the metric logger, the held-out validator,
the reconstruction previewer and the checkpointer, plus the loop's state and its epoch cache.

The loop (``earthray.train.loop``) only steps; after each optimiser step it hands the step to each
component, which decides for itself whether this step is one of its own (every ``log_every``,
``eval.every``, ``preview_every``, ``checkpoint_every`` steps, and the last step).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from earthray import tracking
from earthray.train.preview import save_previews
from earthray.train.progress import WorkerProgress
from earthray.train.spec import PretrainSpec, TrainSpec

TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"


@dataclass
class TrainState:
    """Where training is: optimiser steps done, the epoch, and micro-batches that epoch has consumed."""

    step: int = 0
    epoch: int = 0
    micro: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]


def due(step: int, every: int, last: int) -> bool:
    """A component's cadence: every ``every`` steps (0: never) and at the last step."""
    return step == last or bool(every and step % every == 0)


class Meter:
    """Running sums between two log lines: loss terms, samples, micro-batches, time waiting for data."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.terms: dict[str, float] = {}
        self.samples = self.micro = 0
        self.wait = 0.0
        self.start = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], samples: int) -> None:
        for k, v in out.items():
            self.terms[k] = self.terms.get(k, 0.0) + float(v.detach())
        self.samples += samples
        self.micro += 1

    def summary(self, world: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        metrics = {k: v / max(self.micro, 1) for k, v in self.terms.items()}
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


class MetricLogger:
    """Every ``tracking.log_every`` steps, rank 0 logs the meter's averages to MLflow and a progress line.

    A write goes to MLflow's logging thread, not the training thread: every rank waits for rank 0 at
    its next gradient allreduce, so a synchronous write (6 ms to a local SQLite store, a network round
    trip to a tracking server) would stall them all. One write is outstanding at most; the next log
    waits for it, so a failing store still stops the run, one interval later. The last is synchronous.
    """

    def __init__(self, spec: TrainSpec, rank: int, world: int, uri: str, run_id: str, progress: WorkerProgress):
        self.spec, self.rank, self.world, self.uri, self.run_id, self.progress = spec, rank, world, uri, run_id, progress
        self.meter = Meter()
        self.latest: dict[str, float] = {}
        """The last logged loss and lr: what the checkpoint report carries."""
        self.pending = None

    def after_step(self, step: int, strategy, epoch: int) -> None:
        if self.rank != 0 or not due(step, self.spec.tracking.log_every, self.spec.max_steps):
            return
        metrics = self.meter.summary(self.world) | {"lr": strategy.lr, "epoch": epoch}
        self.meter.reset()  # here, not after logging: the next interval's samples/s pays for this logging
        if isinstance(self.spec, PretrainSpec):
            metrics["held_bytes"] = strategy.held_bytes()
        if self.pending is not None:
            self.pending.wait()
        last = step >= self.spec.max_steps
        self.pending = tracking.log_metrics(self.uri, self.run_id, metrics, step, wait=last)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "samples_per_s"))
        self.progress.line(step, f"{self.spec.name} step {step}/{self.spec.max_steps} {shown} "
                                 f"wait {100 * metrics['data_wait_fraction']:.0f}%", status=shown)
        self.latest.update({k: v for k, v in metrics.items() if k in ("loss", "lr")})


def evaluate_shards(strategy, shards: dict, batch_size: int, rank: int, world: int,
                    cache: EpochCache | None = None) -> dict[str, float]:
    """The task's torchmetrics over the held-out split, reduced across workers. ``shards``: name -> a
    callable giving that shard's torch batches (its ``iter_torch_batches`` with the stream's collate).

    Every worker streams the whole (unsplit) held-out set and scores every ``world``-th batch:
    Ray Train's split drops rows to even out shards, which would change the metrics."""
    model = strategy.module
    metrics = model.metrics()
    model.eval()
    cache = cache or EpochCache(0)
    for name, shard in shards.items():
        for i, batch in enumerate(cache(name, lambda shard=shard: shard(batch_size=batch_size))):
            if i % world == rank:
                with strategy.autocast():
                    model.update_metrics(metrics, strategy.cast(batch))
    model.train()
    return {f"val_{k}": float(v) for k, v in metrics.compute().items()}


class Validator:
    """Fine-tuning: the held-out split's metrics every ``eval.every`` steps and at the end (every rank)."""

    def __init__(self, spec: TrainSpec, shards: dict, rank: int, world: int, uri: str, run_id: str,
                 progress: WorkerProgress):
        self.spec, self.shards, self.rank, self.world = spec, shards, rank, world
        self.uri, self.run_id, self.progress = uri, run_id, progress
        self.every = getattr(getattr(spec, "eval", None), "every", 0)
        self.cache = EpochCache(spec.data.cache_mb)
        self.latest: dict[str, float] = {}
        """The last held-out scores: what later checkpoint reports carry."""

    def after_step(self, step: int, strategy) -> dict[str, float]:
        if not self.shards or not due(step, self.every, self.spec.max_steps):
            return {}
        scores = evaluate_shards(strategy, self.shards, self.spec.eval.batch_size, self.rank, self.world, self.cache)
        if self.rank == 0:
            tracking.log_metrics(self.uri, self.run_id, scores, step)
            self.progress.note(step, f"{self.spec.name} step {step} " + " ".join(f"{k} {v:.4g}"
                                                                                for k, v in scores.items()))
        self.latest = scores
        return scores


class Previewer:
    """Every ``tracking.preview_every`` steps, a masked-reconstruction recipe's previews as MLflow artifacts."""

    def __init__(self, spec: TrainSpec, rank: int, uri: str, run_id: str):
        self.every, self.rank, self.uri, self.run_id = spec.tracking.preview_every, rank, uri, run_id

    def after_step(self, step: int, strategy, batch: dict) -> None:
        if not self.every or step % self.every or not hasattr(strategy.module, "reconstruct"):
            return
        recons = strategy.reconstruct(batch)  # every rank: it may be a collective under ZeRO-3
        if self.rank == 0 and recons:
            with tempfile.TemporaryDirectory() as tmp:
                for png in save_previews(recons, Path(tmp), step):
                    tracking.log_artifact(self.uri, self.run_id, png, "previews")


class Checkpointer:
    """Every ``checkpoint_every`` steps and at the end: the strategy's state (every rank's shard), rank 0's
    full fp32 weights and the loop's state, reported to Ray Train as one checkpoint."""

    def __init__(self, spec: TrainSpec, strategy, rank: int):
        self.spec, self.strategy, self.rank = spec, strategy, rank

    def restore(self, state: TrainState) -> bool:
        """Load Ray Train's latest checkpoint, if the run has one, into the strategy and ``state``."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return False
        with checkpoint.as_directory() as d:
            self.strategy.load(Path(d))
            state.load_state_dict(json.loads((Path(d) / TRAINER_STATE).read_text()))
        return True

    def after_step(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if not due(state.step, self.spec.checkpoint_every, self.spec.max_steps):
            return
        import ray.train
        from safetensors.torch import save_file

        final = state.step == self.spec.max_steps
        weights = self.strategy.full_state_dict()  # collective under ZeRO-3: every rank takes part
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            self.strategy.save(d, self.rank)
            if self.rank == 0:
                save_file({k: v.contiguous() for k, v in weights.items()}, str(d / WEIGHTS))
                (d / TRAINER_STATE).write_text(json.dumps(state.state_dict()))
            has_files = any(d.iterdir())
            ray.train.report({"step": state.step, "epoch": state.epoch, "final": final, **metrics},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)
