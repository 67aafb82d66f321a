"""How a sweep scores a trial's encoder: the objective, and the rung scores ASHA stops on.

Pretraining losses cannot rank trials whose loss weights differ, so the objective is a score of
the encoder: the linear-probe / kNN evaluation on a labelled held-out split, or, where no
labelled group fits the model, the recipe's own loss terms on a held-out split (comparable only
for terms the swept fields do not weigh), read as the trial's training reads its series (the
job's ``data.max_dates``).

ASHA stops on that same score: the trial checkpoints at every rung (``grace_period *
reduction_factor**k`` steps), and a Train callback (a ``TuneReportCallback``) scores each rung's
checkpoint before it forwards the report to Tune; the other reports of the run are not
forwarded, since Tune and its searchers require the metric in every result. The last score
comes from the trial's exported bundle.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from earthray import tracking
from earthray.runtime import ensure_ray
from earthray.tune.spec import HeldoutSpec


def heldout_losses(bundle: str | Path, spec: HeldoutSpec, max_dates: int) -> dict[str, float]:
    """The recipe's loss terms, averaged over a held-out split, with the masks fixed by ``spec.seed``;
    ``max_dates`` dates per time series, as the trained job sampled them."""
    import torch

    from earthray.bundle import load_bundle
    from earthray.data.stream import open_group

    loaded = load_bundle(str(bundle))
    ensure_ray(None, preserve_order=True)
    stream = open_group(spec.root, spec.group, spec.split, max_dates=max_dates, seed=spec.seed,
                    num_cpus=spec.decode_cpus, labels=False, normalisation=loaded.input_stats())
    model = loaded.model.eval()
    torch.manual_seed(spec.seed)
    sums: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for batch in stream.dataset.iter_torch_batches(batch_size=spec.batch_size, collate_fn=stream.collate):
            n = len(next(iter(batch.values())))
            for key, value in model(batch).items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
            count += n
    if not count:
        raise ValueError(f"{spec.root}: group {spec.group!r} has no chips in split {spec.split!r}")
    return {f"heldout/{k}": v / count for k, v in sums.items()}


def score_encoder(plan: dict, job: dict, sensors: list[dict], run_id: str, step: int,
                  checkpoint: str | None = None, bundle: str | None = None) -> dict[str, float]:
    """The objective's scores of a checkpoint (exported to a temporary bundle) or a bundle, logged to the trial's run."""
    from earthray.evaluate import EvaluateSpec, evaluate
    from earthray.recipes import resolve_config
    from earthray.sensors import Sensor
    from earthray.train.run import export_bundle
    from earthray.train.spec import PretrainSpec

    spec = PretrainSpec.model_validate(job)
    Path(spec.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=spec.workdir, prefix="probe-") as tmp:
        if checkpoint is not None:
            config = resolve_config(spec.recipe, spec.preset, **spec.model).model_dump()
            bundle = str(export_bundle(spec, [Sensor.model_validate(s) for s in sensors], config, Path(checkpoint),
                                       run_id, Path(tmp, "bundle")))
        if plan["evaluation"] is not None:
            scores = evaluate(bundle, EvaluateSpec.model_validate(plan["evaluation"]), log=False).scores
        else:
            scores = heldout_losses(bundle, HeldoutSpec.model_validate(plan["heldout"]), spec.data.max_dates)
    if plan["metric"] not in scores:
        raise ValueError(f"objective.metric {plan['metric']!r} is not among the scores: {', '.join(sorted(scores))}")
    tracking.log_metrics(plan["tracking_uri"], run_id, {f"probe/{k}": v for k, v in scores.items() if v == v}, step)
    return scores


@dataclass
class Probe:
    """Scores an encoder in a Ray task (inside the trial's placement group, in its probe bundle)."""

    plan: dict
    job: dict
    sensors: list[dict]
    run_id: str

    def __call__(self, step: int, checkpoint: str | None = None, bundle: str | None = None) -> dict[str, float]:
        import ray

        task = ray.remote(score_encoder).options(num_cpus=self.plan["probe_cpus"], max_retries=0)
        return ray.get(task.remote(self.plan, self.job, self.sensors, self.run_id, step, checkpoint, bundle))


class ProbeReportCallback(TuneReportCallback):
    """Forwards a Train report to Tune only at a rung, with the rung checkpoint's probe scores added
    (``TuneReportCallback`` adds the checkpoint's path as ``checkpoint_path``).

    Runs in the Train controller; while it scores, the workers wait at their next report."""

    def __init__(self, probe: Probe, milestones: list[int]):
        super().__init__()
        self.probe = probe
        self.milestones = set(milestones)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        reported = metrics[0]
        step = reported.get("step")
        if checkpoint is None or step not in self.milestones:
            return
        result = {**self.probe(step, checkpoint=checkpoint.path), "step": step, "run_id": self.probe.run_id}
        if "loss" in reported:
            result["loss"] = reported["loss"]
        super().after_report(run_context, [result], checkpoint)
