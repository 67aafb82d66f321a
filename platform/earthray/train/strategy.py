"""How one training step is distributed: DDP or DeepSpeed ZeRO, behind one small interface.

The loop only calls ``forward``, ``backward``, ``after_backward``, ``on_step_end``,
``save``/``load`` and ``full_state_dict``; accumulation, clipping, mixed precision and
sharded state are the strategy's business. That includes running a recipe's
``on_step_end`` where its state can see whole weights: on the unwrapped module, and under
ZeRO-3 inside a gather of the partitioned parameters.

Mixed precision is autocast in both strategies. Under DDP parameters stay float32;
DeepSpeed's bf16 mode casts parameters (its optimizer keeps float32 masters) but keeps
buffers, teachers' weights among them, in float32, so forward passes run under autocast
too, and EMA teachers, prototypes and centres update in float32 either way.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from earthray.recipes import Recipe
from earthray.train.optim import param_groups, warmup_cosine
from earthray.train.spec import TrainSpec

STATE_FILE = "state.pt"
DEEPSPEED_TAG = "state"


class Strategy:
    module: nn.Module
    """The unwrapped recipe (or fine-tuning model)."""
    spec: TrainSpec
    dtype: torch.dtype | None
    """The autocast dtype of mixed precision; None in float32."""

    def forward(self, batch: dict, sync: bool = True) -> dict:
        """``sync=False``: a micro-batch before the last of its optimiser step, whose gradients need not
        be reduced across ranks yet."""
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context forward passes run in (a no-op in float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda" if self.spec.workers.use_gpu else "cpu", dtype=self.dtype)

    def reconstruct(self, batch: dict) -> dict:
        """The recipe's preview reconstructions; every rank must call it (ZeRO-3 gathers weights)."""
        with torch.no_grad(), self.autocast():
            return self.module.reconstruct(self.cast(batch))

    def cast(self, batch: dict) -> dict:
        """The batch in the engine's input dtype (DeepSpeed bf16/fp16 takes half-precision inputs)."""
        return batch

    def on_step_end(self, step: int) -> None:
        """After optimiser step ``step`` (1 = the first), once, on every rank: the recipe's
        ``on_step_end`` on the unwrapped module, in float32, on whole weights. A fine-tuning
        model has no step-end state."""
        if not isinstance(self.module, Recipe):
            return
        with self._whole_weights():
            self.module.on_step_end(step)

    def _whole_weights(self) -> contextlib.AbstractContextManager:
        """Where ``on_step_end`` may read every parameter whole; every rank enters it."""
        return contextlib.nullcontext()

    def held_bytes(self) -> int:
        """What the recipe holds between steps (``Recipe.held_bytes``); 0 for a fine-tuning model."""
        return self.module.held_bytes() if isinstance(self.module, Recipe) else 0

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def after_backward(self, boundary: bool) -> None:
        """After each micro-batch; ``boundary`` ends an optimiser step (every ``grad_accum`` micro-batches)."""
        raise NotImplementedError

    @property
    def lr(self) -> float:
        raise NotImplementedError

    def save(self, directory: Path, rank: int) -> None:
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights in fp32; a collective call under ZeRO-3 (every rank must call it)."""
        return _fp32(self.module.state_dict())


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone() for k, v in state.items()}


DDP_OPTIONS = {"find_unused_parameters": True, "broadcast_buffers": False}
"""Batches may lack a sensor (unused embeddings/decoders) and routing leaves experts idle; buffers
(teachers, prototypes, centres) change only in on_step_end, identically on every rank (EMAs of the
same student, gathered updates), so there is nothing to broadcast."""


class DDPStrategy(Strategy):
    def __init__(self, recipe: nn.Module, spec: TrainSpec):
        import ray.train.torch

        self.spec = spec
        self.model = ray.train.torch.prepare_model(recipe, parallel_strategy_kwargs=DDP_OPTIONS)
        self.module = recipe
        o = spec.optim
        self.optimizer = torch.optim.AdamW(param_groups(recipe, o.weight_decay, o.lr), lr=o.lr, betas=o.betas)
        self.scheduler = warmup_cosine(self.optimizer, o.warmup_steps, spec.max_steps, o.lr, o.min_lr)
        self.dtype = torch.bfloat16 if spec.strategy.precision == "bf16" else None

    def forward(self, batch: dict, sync: bool = True) -> dict:
        # DDP decides in the forward pass whether the backward allreduces: under no_sync the gradients
        # accumulate locally and the step's last micro-batch reduces them all, one allreduce a step
        local = not sync and isinstance(self.model, DistributedDataParallel)
        with self.model.no_sync() if local else contextlib.nullcontext(), self.autocast():
            return self.model(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.spec.optim.grad_accum).backward()

    def after_backward(self, boundary: bool) -> None:
        if not boundary:
            return
        if self.spec.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.spec.optim.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, directory / STATE_FILE)

    def load(self, directory: Path) -> None:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedStrategy(Strategy):
    def __init__(self, recipe: nn.Module, spec: TrainSpec):
        import deepspeed  # imported here: it probes accelerators on import, which only workers should do

        self.spec = spec
        o, s = spec.optim, spec.strategy
        zero: dict = {"stage": s.zero_stage}
        if s.offload:
            zero["offload_optimizer"] = {"device": "cpu"}
            if s.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": min(spec.data.groups.values()),
            "gradient_accumulation_steps": o.grad_accum,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": s.precision == "bf16"},
            "fp16": {"enabled": s.precision == "fp16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if o.clip_grad:
            config["gradient_clipping"] = o.clip_grad
        groups = param_groups(recipe, o.weight_decay, o.lr)
        if s.offload:  # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's C++ Adam (built on first use)
            optimizer = deepspeed.ops.adam.DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)
        scheduler = warmup_cosine(optimizer, o.warmup_steps, spec.max_steps, o.lr, o.min_lr)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=recipe, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.module = self.engine.module
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.precision)

    def cast(self, batch: dict) -> dict:
        if self.dtype is None:
            return batch
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()}

    def forward(self, batch: dict, sync: bool = True) -> dict:
        with self.autocast():  # the engine counts micro-batches and reduces at its own boundary
            return self.engine(self.cast(batch))

    def _whole_weights(self) -> contextlib.AbstractContextManager:
        """ZeRO-3 partitions parameters (not buffers): gather them, read-only, for a recipe with
        step-end state (an EMA reads the whole student); ZeRO-1/2 keep whole parameters."""
        stateful = isinstance(self.module, Recipe) and self.module.stateful_tensors()
        if self.spec.strategy.zero_stage < 3 or not stateful:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def after_backward(self, boundary: bool) -> None:
        self.engine.step()  # DeepSpeed counts micro-batches itself and steps at its own boundary

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, directory: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)

    def load(self, directory: Path) -> None:
        self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.spec.strategy.zero_stage < 3:
            return _fp32(self.module.state_dict())
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            return _fp32(self.module.state_dict())


def make_strategy(recipe: nn.Module, spec: TrainSpec) -> Strategy:
    return (DeepSpeedStrategy if spec.strategy.name == "deepspeed" else DDPStrategy)(recipe, spec)
