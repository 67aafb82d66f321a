"""Frozen copies of a network and the exponential moving average that keeps them trailing it.

A teacher (SkySense's EMA teacher, MaRS's frozen teacher) is a copy of part of the model
whose weights never receive gradients. Its weights are stored as *buffers*, not
parameters: they still move with ``.to()``, save and load with the state dict and
ride along in checkpoints, but no optimiser, ZeRO partitioner or parameter count ever
sees them. That is why a recipe's ``count_parameters`` matches the size a paper
reports (the student), not twice it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are buffers of the same names.

    Tied parameters stay tied. The copy is in eval mode (no dropout, no drop-path; a recipe
    keeps it there when switched to training), computes what ``module`` computes in eval
    mode, and ``copy.get_buffer(name)`` is the twin of ``module.get_parameter(name)``.
    """
    twin = copy.deepcopy(module)
    converted: dict[int, torch.Tensor] = {}
    for sub in twin.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in converted:
                converted[id(param)] = param.detach().clone()
            del sub._parameters[name]
            sub.register_buffer(name, converted[id(param)])
    twin.requires_grad_(False)
    return twin.eval()


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, for every student parameter ``s`` and its teacher twin ``t``: ``t = m t + (1 - m) s``.

    ``momentum=0`` copies the student into the teacher. The student's own buffers (running
    statistics, index tables) are copied as they are.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    for name, s in student.named_parameters():
        teacher.get_buffer(name).mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for name, b in student.named_buffers():
        teacher.get_buffer(name).copy_(b)
