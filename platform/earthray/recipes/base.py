"""The one interface every pretraining recipe has, and the registry that finds them.

A recipe is an ``nn.Module`` built from a config and the sensors it will see. Its
``forward(batch)`` returns named loss terms plus ``"loss"`` (the total to
backpropagate), so the training loop, tracking and sweeps never need to know
which paper a model came from.

The rest of the contract, each with a default for recipes that need none: state that
changes outside the optimiser is declared (``stateful_tensors``) and updated in
``on_step_end``, which the loop runs after every optimiser step; memory kept between
steps is reported (``held_bytes``); ``prepare_downstream`` picks the weights exported
bundles hand to downstream tasks; ``load_initial_weights`` reads local pretrained files.

The batch layout (what the data pipeline delivers: ``batch[sensor]`` plus its ``.valid``,
``.present``, ``.doy`` and ``.tmask`` companions, ``lonlat``, ``label``) and the readers that
fill its defaults live in one place, :mod:`earthray.data.batch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext as _nullcontext
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from earthray.errors import NotFound
from earthray.sensors import Sensor, get_sensor

Batch = Mapping[str, torch.Tensor]


class RecipeConfig(BaseModel):
    """Base of every recipe's config; a recipe subclasses it with its own fields."""

    model_config = ConfigDict(extra="forbid")


class Recipe(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type[RecipeConfig]]
    presets: ClassVar[dict[str, dict[str, Any]]]
    paper_params: ClassVar[dict[str, float]] = {}
    """Parameter counts the papers report, by preset, for the size check."""
    paper_sensors: ClassVar[dict[str, list[str] | None]] = {}
    """The inputs the paper trains on (sensor -> bands, None for all): what sizes are counted with."""

    def __init__(self, config: RecipeConfig, sensors: Sequence[Sensor]):
        super().__init__()
        self.config = config
        self.sensors = {s.name: s for s in sensors}

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, batch: Batch) -> dict[str, list[torch.Tensor]]:  # pragma: no cover - abstract
        """Multi-scale features per sensor (no masking): what fine-tuning heads consume."""
        raise NotImplementedError

    def reconstruct(self, batch: Batch) -> dict[str, dict[str, torch.Tensor]]:
        """Per sensor: ``image`` (B, C, H, W), pixel ``mask`` (B, H, W, True = hidden) and ``recon``.

        For training previews. Recipes without a pixel decoder (contrastive ones) return ``{}``.
        """
        return {}

    def on_step_end(self, step: int) -> None:
        """Update the state that changes outside the optimiser (EMA teachers, prototypes, centres).

        The training loop calls it once per optimiser step, after the step (with gradient
        accumulation: once per accumulated step), on the unwrapped recipe, on every rank:
        updates that gather across ranks may use collectives. ``step`` counts the optimiser
        steps done, this one included (1 after the first). Under ZeRO-3 every parameter is
        gathered around the call when the recipe declares state (``stateful_tensors``), so
        the hook reads whole weights. Default: nothing to update.
        """

    def stateful_tensors(self) -> dict[str, torch.Tensor]:
        """The state-dict entries ``on_step_end`` changes, by state-dict key; ``{}`` if none.

        What the recipe contract test checks moves in a real run; every other entry that
        is not a trained parameter must stay as built.
        """
        return {}

    def held_bytes(self) -> int:
        """Bytes the recipe keeps outside its state dict from one step to the next (queued
        updates, running sums); 0 if none. The loop logs it after each ``on_step_end``; it
        must not grow with the number of steps or micro-batches."""
        return 0

    def prepare_downstream(self) -> str:
        """Make the weights ``encode`` runs the ones downstream tasks should start from.

        Called once on a rebuilt recipe before a pretraining bundle is saved (never on a
        bundle with a fine-tuned head), so fine-tuning, frozen-feature evaluation, sweep
        probes and serving all start from them without knowing the recipe. Returns what
        the encoder now holds, recorded in the bundle's provenance as ``encoder_weights``.
        Default: the trained weights as they are (``"trained"``).
        """
        return "trained"

    def load_initial_weights(self) -> None:
        """Read the local pretrained weights the config names (``create_recipe`` calls it
        after building); default: none. Rebuilding a saved model skips it, since the saved
        weights replace everything anyway."""

    def comparable_parameters(self) -> int:
        """The count a paper's stated size refers to; the stored total unless a recipe says otherwise."""
        return sum(p.numel() for p in self.parameters())

    def trainable_parameters(self):
        return (p for p in self.parameters() if p.requires_grad)


_REGISTRY: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    _REGISTRY[cls.name] = cls
    return cls


def list_recipes() -> list[str]:
    return sorted(_REGISTRY)


def get_recipe_class(name: str) -> type[Recipe]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NotFound(f"unknown recipe {name!r}; known: {', '.join(list_recipes())}") from None


def resolve_config(name: str, preset: str = "tiny", **overrides: Any) -> RecipeConfig:
    cls = get_recipe_class(name)
    if preset not in cls.presets:
        raise NotFound(f"recipe {name!r} has no preset {preset!r}; presets: {', '.join(cls.presets)}")
    return cls.Config(**{**cls.presets[preset], **overrides})


def create_recipe(
    name: str,
    sensors: Sequence[str | Sensor],
    preset: str = "tiny",
    device: str | torch.device | None = None,
    initial_weights: bool = True,
    **overrides: Any,
) -> Recipe:
    """Build a recipe's model, timm-style: ``create_recipe("msgfm", ["s2_l1c", "s1_grd"], "base")``.

    ``initial_weights=False`` skips the local pretrained files the config names (for a model
    whose weights are about to be replaced: a bundle, a checkpoint, a size count)."""
    cls = get_recipe_class(name)
    config = resolve_config(name, preset, **overrides)
    resolved = [s if isinstance(s, Sensor) else get_sensor(s) for s in sensors]
    with torch.device(device) if device is not None else _nullcontext():
        model = cls(config, resolved)
    if initial_weights:
        model.load_initial_weights()
    return model


def paper_inputs(name: str) -> list[Sensor]:
    """The paper's sensors (band subsets applied) for recipe ``name``."""
    return [get_sensor(s).select(bands) for s, bands in get_recipe_class(name).paper_sensors.items()]


def count_parameters(name: str, sensors: Sequence[str | Sensor] | None = None, preset: str = "base",
                     comparable: bool = False, **overrides: Any) -> int:
    """Parameter count without allocating memory (built on the meta device).

    ``sensors`` defaults to the paper's inputs; ``comparable`` counts what the paper's figure counts.
    """
    model = create_recipe(name, paper_inputs(name) if sensors is None else sensors, preset, device="meta",
                          initial_weights=False, **overrides)
    return model.comparable_parameters() if comparable else sum(p.numel() for p in model.parameters())
