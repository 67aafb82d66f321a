"""The one training loop every recipe runs in, on each Ray Train worker.

Steps are optimiser steps. After each one (with gradient accumulation: after the last
micro-batch of each) the strategy runs the recipe's ``on_step_end`` on every rank (EMA
teachers, prototypes, centres: the loop itself never touches recipe state), and then each
component (``earthray.train.components``: metric logger, validator, previewer,
checkpointer) acts if the step is one of its own.

A checkpoint holds the strategy's state (every rank's shard under DeepSpeed), the full
fp32 weights (``model.safetensors``, for export) and ``trainer_state.json`` (step, epoch,
micro-batches consumed in that epoch), so a restarted worker group resumes at the next
step, skipping the micro-batches the epoch had already used.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Literal

import torch
from pydantic import BaseModel

from earthray.data.augment import flip_rotate
from earthray.data.pipeline import interleave
from earthray.recipes import create_recipe
from earthray.sensors import Sensor
from earthray.tasks import TaskSpec
from earthray.train.components import WEIGHTS, Checkpointer, EpochCache, MetricLogger, Previewer, TrainState, Validator
from earthray.train.progress import WorkerProgress
from earthray.train.spec import FinetuneSpec, PretrainSpec, TrainSpec
from earthray.train.strategy import make_strategy

__all__ = ["WEIGHTS", "EpochCache", "LoopConfig", "build_model", "train_loop"]


class LoopConfig(BaseModel):
    """What each Ray Train worker is given (``train_loop_config``): the job, its sensors and its MLflow run."""

    kind: Literal["pretrain", "finetune"]
    spec: dict
    sensors: list[Sensor]
    run_id: str
    tracking_uri: str
    task: TaskSpec | None = None
    bundle_path: str | None = None

    def job(self) -> TrainSpec:
        return (FinetuneSpec if self.kind == "finetune" else PretrainSpec).model_validate(self.spec)


def build_model(config: LoopConfig) -> tuple[TrainSpec, torch.nn.Module]:
    """The job's spec and model: a recipe to pretrain, or a bundle's encoder with a task head."""
    spec = config.job()
    torch.manual_seed(spec.seed)
    if config.kind == "finetune":
        from earthray.bundle import load_bundle
        from earthray.tasks import TaskModel

        return spec, TaskModel.from_bundle(load_bundle(config.bundle_path), config.task)
    return spec, create_recipe(spec.recipe, config.sensors, spec.preset, **spec.model)


def train_loop(config: dict) -> None:
    import ray.train

    loop = LoopConfig.model_validate(config)
    spec, model = build_model(loop)
    torch.set_num_threads(max(1, int(spec.workers.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    strategy = make_strategy(model, spec)
    progress = WorkerProgress(spec, rank)  # log lines, and rank 0's events for the driver (earthray.train.progress)
    state, checkpointer = TrainState(), Checkpointer(spec, strategy, rank)
    if checkpointer.restore(state) and rank == 0:
        progress.note(state.step, f"resumed {spec.name} at step {state.step}")
        from earthray import tracking

        tracking.log_metrics(loop.tracking_uri, loop.run_id, {"resumed_from_step": state.step}, state.step)
    # name -> iter_torch_batches of this worker's shard, decoding with the stream's collate
    batches = {name: partial(ray.train.get_dataset_shard(name).iter_torch_batches, collate_fn=collate)
               for name, collate in config["collate"].items()}
    held_out = {g: batches[f"eval.{g}"] for g in spec.data.groups} if isinstance(spec, FinetuneSpec) else {}
    logger = MetricLogger(spec, rank, world, loop.tracking_uri, loop.run_id, progress)
    validator = Validator(spec, held_out, rank, world, loop.tracking_uri, loop.run_id, progress)
    previewer = Previewer(spec, rank, loop.tracking_uri, loop.run_id)
    names = [s.name for s in loop.sensors]
    cache, skip, accum = EpochCache(spec.data.cache_mb), state.micro, 0
    progress.start(state.step)

    while state.step < spec.max_steps:
        # rows are mixed anew each epoch, repeatably (a resumed epoch sees the same order)
        order = hash((spec.seed, state.epoch, rank)) & 0x7FFFFFFF if spec.data.shuffle_buffer else None
        streams = {g: cache(g, partial(batches[g], batch_size=bs, drop_last=True,
                                       local_shuffle_buffer_size=spec.data.shuffle_buffer or None,
                                       local_shuffle_seed=order), seed=order)
                   for g, bs in spec.data.groups.items()}
        stream = iter(interleave(streams))
        state.micro, seen = 0, 0
        while state.step < spec.max_steps:
            t0 = time.perf_counter()
            try:
                _group, batch = next(stream)
            except StopIteration:
                break
            logger.meter.wait += time.perf_counter() - t0
            seen += 1
            if state.micro < skip:  # already trained on before the restart
                state.micro += 1
                continue
            if spec.data.augment:
                gen = torch.Generator().manual_seed(hash((spec.seed, state.step, rank, state.micro)) & 0x7FFFFFFF)
                batch = flip_rotate(batch, names, gen)
            boundary = accum + 1 == spec.optim.grad_accum
            out = strategy.forward(batch, sync=boundary)
            strategy.backward(out["loss"])
            state.micro, accum = state.micro + 1, accum + 1
            strategy.after_backward(boundary)
            logger.meter.add(out, len(next(iter(batch.values()))))
            if not boundary:
                continue
            accum, state.step = 0, state.step + 1
            strategy.on_step_end(state.step)
            progress.tick(state.step)
            logger.after_step(state.step, strategy, state.epoch)
            validator.after_step(state.step, strategy)
            previewer.after_step(state.step, strategy, batch)
            checkpointer.after_step(state, logger.latest | validator.latest)
        if seen == 0:
            raise RuntimeError(f"{spec.name}: no full batch in groups {list(spec.data.groups)} (split "
                               f"{spec.data.split!r}); lower the batch sizes or ingest more data")
        if state.step < spec.max_steps:
            state.epoch, skip = state.epoch + 1, 0
