"""Each paper's key ablation, reproduced in direction at small scale, scored on a place pretraining never saw.

One run, through the platform's own jobs (``earthray.train.run.pretrain`` on Ray Train, then the
frozen-encoder probes of ``earthray.evaluate``), on the bundled real data:

- **msGFM Table 6**: cross-sensor reconstruction ratio 0.5 vs 0.0 (paper, 1 % BigEarthNet mAP: 80.9 vs 78.5);
- **OFA-Net Tables 1-2**: multi-sensor pretraining vs the same encoder pretrained on Sentinel-2 alone vs
  random init (paper: m-bigearthnet top-1 57.13 / 55.41 / 52.89, m-SA-crop-type mIoU 31.98 / 30.67 / 29.11);
- **SkySense**: the same encoder probed on the Sentinel-2 series vs a single date (Table 4b, PASTIS-MM OA
  84.6 vs 73.5), and pretrained on S2 + S1 vs S2 alone, probed on S2 (Table 5a: iSAID mIoU 70.91 vs 68.98);
- **MaRS Table 4**: CGCL on vs off, probed with one modality missing (paper, mapping mIoU 49.1 vs 42.0).

Every arm is pretrained with the recipe's tiny job (``jobs/pretrain-<recipe>-tiny.yaml``) for the same
steps, once per seed; seeds pair the arms (same data order, same probe seed). Probes are fixed splits by
place: per-pixel crop type and land cover (WorldCereal legend, scored per feature cell) are trained on
Flanders patch A and scored on patch B, 80 km away (split ``test``, never in pretraining); BigEarthNet's
multi-labels are trained on three patches and scored on the other three. Every table prints beside the
arms a random-encoder baseline (the recipe untrained, same seeds, same probe) and the majority-class
score, the paired gain with its spread and t (mean / (sd / sqrt(n))), the paper's figures and whether
the direction agrees. MLflow gets one parent run per ablation (experiment ``earthray-reproduce``) and a
child run per arm and seed with every probe score.

    python benchmarks/reproduce.py [--quick] [--seeds 5] [--steps 300] [--ablations msgfm,ofa,skysense,mars,ofa_p4]

``--quick`` is 2 seeds and 150 steps: a first look (about an hour on 2 cores). The full run (5 seeds,
300 steps) takes a few hours on 2 cores. See ``benchmarks/README.md`` for paper scale on a GPU cluster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAIRS = "s2_l2a+s1_grd_db+label"
SERIES = "s2_l2a_10m+s2_l2a@series+s1_grd_db@series+label"
EXPERIMENT = "earthray-reproduce"


@dataclass(frozen=True)
class Probe:
    """One frozen-encoder probe: a labelled group, a layer, the sensors fed and the dates sampled."""

    name: str
    group: str
    label: str
    inputs: tuple[str, ...] | None = None
    max_dates: int = 8
    train_split: str = "train"
    eval_split: str = "test"

    @property
    def metric(self) -> str:
        return "linear/map" if self.group == "bigearthnet" else "linear/miou"


@dataclass
class Arm:
    """A pretraining variant (job overrides; None: no pretraining) probed one way."""

    name: str
    overrides: dict[str, Any] | None
    probes: list[Probe]


@dataclass
class Comparison:
    treatment: str
    control: str
    paper: str
    """The paper's figures, treatment vs control, as printed."""
    paper_gain: float
    """Their sign is the direction the paper reports."""


@dataclass
class Ablation:
    key: str
    title: str
    job: str
    arms: list[Arm]
    comparisons: list[Comparison]
    notes: list[str] = field(default_factory=list)


def ablations() -> dict[str, Ablation]:
    crop, cover = Probe("crop type", PAIRS, "crop_type"), Probe("land cover", PAIRS, "land_cover")
    ben = Probe("BigEarthNet", "bigearthnet", "corine")
    s2 = ("s2_l2a",)
    crop_s2, cover_s2, ben_s2 = (Probe(p.name, p.group, p.label, s2) for p in (crop, cover, ben))
    sky_s2 = ("s2_l2a_10m", "s2_l2a")
    sky = [Probe(n, SERIES, lab, sky_s2) for n, lab in (("crop type", "crop_type"), ("land cover", "land_cover"))]
    series = [Probe(f"{n} (S2 series)", SERIES, lab, ("s2_l2a",), 8) for n, lab in (("crop type", "crop_type"),
                                                                                      ("land cover", "land_cover"))]
    single = [Probe(f"{n} (S2 series)", SERIES, lab, ("s2_l2a",), 1) for n, lab in (("crop type", "crop_type"),
                                                                                      ("land cover", "land_cover"))]
    missing = [Probe(f"{p.name}, {m} only", p.group, p.label, (m,)) for m in ("s2_l2a", "s1_grd_db")
               for p in (crop, cover)]
    ofa_multi = {"data.groups": {PAIRS: 8, "s2_l2a+s1_grd_db+dem": 8, "s2_l1c": 4, "landsat8_oli_tirs": 8,
                                 "vhr_rgbn": 8}}
    ofa_s2 = {"data.groups": {PAIRS: 8, "s2_l2a+s1_grd_db+dem": 8}, "data.sensors": ["s2_l2a"]}
    ofa_comparisons = [
        Comparison("multi-sensor", "S2 only", "m-bigearthnet top-1 57.13 vs 55.41; m-SA-crop-type mIoU 31.98 vs "
                                              "30.67", +1.72),
        Comparison("S2 only", "random init", "m-bigearthnet 55.41 vs 52.89; m-SA-crop-type 30.67 vs 29.11", +2.52),
        Comparison("multi-sensor", "random init", "m-bigearthnet 57.13 vs 52.89; m-SA-crop-type 31.98 vs 29.11",
                   +4.24)]
    ofa_probes = [crop_s2, cover_s2, ben_s2]
    return {
        "msgfm": Ablation(
            "msgfm", "msGFM Table 6: cross-sensor reconstruction ratio 0.5 vs 0.0", "pretrain-msgfm-tiny.yaml",
            [Arm("ratio 0.5", {"model.cross_sensor_ratio": 0.5}, [crop, cover, ben]),
             Arm("ratio 0.0", {"model.cross_sensor_ratio": 0.0}, [crop, cover, ben])],
            [Comparison("ratio 0.5", "ratio 0.0", "1% BEN mAP 80.9 vs 78.5; Vaihingen mIoU 74.8 vs 73.4", +2.4)]),
        "ofa": Ablation(
            "ofa", "OFA-Net Tables 1-2: multi-sensor vs single-sensor (S2) pretraining vs random init",
            "pretrain-ofa-tiny.yaml",
            [Arm("multi-sensor", ofa_multi, ofa_probes), Arm("S2 only", ofa_s2, ofa_probes),
             Arm("random init", None, ofa_probes)], ofa_comparisons,
            ["every arm is probed on Sentinel-2 alone, the one sensor all three encoders know"]),
        # A check, not a paper table: the tiny preset's patch 8 gives 4x4 tokens on 32 px chips; does the
        # pretrained-below-random finding above survive finer tokens (more per-pixel detail in the features)?
        "ofa_p4": Ablation(
            "ofa_p4", "OFA-Net Tables 1-2 again with patch 4 (8x8 tokens): a check of the patch-8 result",
            "pretrain-ofa-tiny.yaml",
            [Arm("multi-sensor", ofa_multi | {"model.patch_size": 4}, ofa_probes),
             Arm("S2 only", ofa_s2 | {"model.patch_size": 4}, ofa_probes),
             Arm("random init", None, ofa_probes)], ofa_comparisons,
            ["model.patch_size 4 in every arm (random init: the multi-sensor arm's recipe untrained)"]),
        "skysense": Ablation(
            "skysense", "SkySense: S2 series vs one date (same encoder); S2 + S1 vs S2-only pretraining",
            "pretrain-skysense-tiny.yaml",
            [Arm("S2 + S1 pretrained", {}, sky),
             Arm("S2 only pretrained", {"data.sensors": list(sky_s2)}, sky),
             Arm("probe: S2 series", {}, series),
             Arm("probe: one date", {}, single)],
            [Comparison("S2 + S1 pretrained", "S2 only pretrained", "Table 5a iSAID mIoU 70.91 vs 68.98; fMoW-S2 "
                                                                   "top-5 87.27 vs 85.69", +1.93),
             Comparison("probe: S2 series", "probe: one date", "Table 4b PASTIS-MM OA, S2-Ts 84.6 vs S2-static 73.5",
                        +11.1)],
            ["probes of the first two arms feed the HR view and the S2 series (no S1): what S1 in pretraining adds",
             "the last two arms are the first arm's encoder, probed with 8 sampled S2 dates vs 1"]),
        "mars": Ablation(
            "mars", "MaRS Table 4: cross-granularity contrastive learning (CGCL) on vs off, one modality missing",
            "pretrain-mars-tiny.yaml",
            [Arm("CGCL on", {"model.cgcl_weight": 1.0}, missing), Arm("CGCL off", {"model.cgcl_weight": 0.0}, missing)],
            [Comparison("CGCL on", "CGCL off", "mapping mIoU 49.1 vs 42.0; change detection IoU 76.0 vs 67.1", +7.1)],
            ["each probe feeds one modality only: optical (s2_l2a) or SAR (s1_grd_db)"]),
    }


# ------------------------------------------------------------------------------------------------ running


class Runner:
    """Pretrains and probes through the platform; caches what two arms share (an encoder, a probe)."""

    def __init__(self, work: Path, steps: int, tracking_uri: str):
        from earthray.data.ingest import ingest
        from earthray.data.spec import load_spec

        self.work, self.steps, self.uri = work, steps, tracking_uri
        spec = load_spec(ROOT / "jobs" / "ingest-sample.yaml")
        spec.output = str(work / "shards")
        t0 = time.perf_counter()
        self.manifest = ingest(spec)
        self.root = spec.output
        print(f"ingested the sample: {self.manifest['counts']['total']} chips [{time.perf_counter() - t0:.0f} s]",
              flush=True)
        # Re-running (more seeds, or after a stop) reuses every encoder and score already made.
        self.cache = work / f"cache-{steps}steps.json"
        saved = json.loads(self.cache.read_text()) if self.cache.exists() else {"bundles": {}, "scores": {}}
        self.bundles: dict[str, str] = {k: v for k, v in saved["bundles"].items() if Path(v).is_dir()}
        self.scores: dict[str, dict[str, float]] = saved["scores"]

    def _save(self) -> None:
        tmp = self.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bundles": self.bundles, "scores": self.scores}, indent=1))
        tmp.replace(self.cache)

    def job(self, ablation: Ablation, overrides: dict[str, Any], seed: int, name: str):
        from earthray.train.spec import load_pretrain_spec
        from earthray.tune.spec import build_job, job_data

        base = job_data(load_pretrain_spec(ROOT / "jobs" / ablation.job))
        values = {"data.root": self.root, "max_steps": self.steps, "checkpoint_every": self.steps,
                  "workers.num_workers": 1, "workers.cpus_per_worker": 1.0, "tracking.log_every": 50,
                  "tracking.preview_every": 0, "tracking.tracking_uri": self.uri,
                  "tracking.experiment": f"{EXPERIMENT}-pretrain", **overrides}
        return build_job(base, values, name=name, workdir=str(self.work), seed=seed)

    def bundle(self, ablation: Ablation, arm: Arm, seed: int, treatment: Arm) -> Path:
        """The arm's encoder for ``seed``: pretrained, or (no overrides) the treatment's recipe untrained."""
        overrides = arm.overrides if arm.overrides is not None else treatment.overrides
        random = arm.overrides is None
        name = f"{ablation.key}-{_digest(overrides)}-s{seed}" + ("-random" if random else "")
        if name not in self.bundles:
            spec = self.job(ablation, overrides, seed, name)
            bundle = random_bundle(spec, self.manifest, self.work / "bundles" / name) if random else pretrained(spec)
            self.bundles[name] = str(bundle)
            self._save()
        return Path(self.bundles[name])

    def probe(self, bundle: Path, probe: Probe, seed: int) -> dict[str, float]:
        from earthray.evaluate import EvaluateSpec, evaluate

        key = f"{bundle}|{probe}|{seed}"
        if key not in self.scores:
            spec = EvaluateSpec.model_validate({
                "workdir": str(self.work), "seed": seed, "methods": ["linear", "knn"], "num_cpus": 1.0,
                "data": {"root": self.root, "group": probe.group, "label": probe.label,
                         "inputs": list(probe.inputs) if probe.inputs else None, "max_dates": probe.max_dates,
                         "train_split": probe.train_split, "eval_split": probe.eval_split},
                "tracking": {"tracking_uri": self.uri}})
            self.scores[key] = evaluate(str(bundle), spec, log=False).scores
            self._save()
        return self.scores[key]


def _digest(overrides: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def pretrained(spec) -> Path:
    from earthray.train.run import pretrain

    t0 = time.perf_counter()
    result = pretrain(spec)
    print(f"  pretrained {spec.name}: {spec.max_steps} steps, loss {result.metrics.get('loss', float('nan')):.4f} "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    return result.bundle


def random_bundle(spec, manifest: dict, out: Path) -> Path:
    """The job's recipe with the weights it starts from (seeded), as a bundle normalised like a trained one."""
    import torch

    from earthray.bundle import save_bundle
    from earthray.recipes import create_recipe, resolve_config
    from earthray.train.run import sensors_of

    sensors = sensors_of(manifest, list(spec.data.groups), spec.data.sensors)
    torch.manual_seed(spec.seed)
    model = create_recipe(spec.recipe, sensors, spec.preset, **spec.model)
    model.prepare_downstream()
    config = resolve_config(spec.recipe, spec.preset, **spec.model).model_dump()
    return save_bundle(out, model, recipe=spec.recipe, preset=spec.preset, config=config, sensors=sensors,
                       normalisation={s.name: {"mean": [b.mean for b in s.bands], "std": [b.std for b in s.bands]}
                                      for s in sensors},
                       input_size=config.get("img_size") or config.get("hr_img_size") or 0,
                       provenance={"run_name": spec.name, "random_init": True})


# ------------------------------------------------------------------------------------------------ reporting


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def paired(treat: list[float], control: list[float]) -> tuple[float, float, float]:
    """Mean gain, its sd and t = mean / (sd / sqrt(n)) over seeds."""
    gains = [a - b for a, b in zip(treat, control) if not (math.isnan(a) or math.isnan(b))]
    m, sd = mean_sd(gains)
    t = m / (sd / math.sqrt(len(gains))) if len(gains) > 1 and sd > 0 else float("nan")
    return m, sd, t


def report(ablation: Ablation, results: dict[str, dict[str, list[dict]]], baselines: dict[str, list[dict]],
           seeds: int, steps: int, client, parent: str) -> list[str]:
    """The ablation's table as text lines; summary metrics logged to the parent run."""
    lines = [f"== {ablation.title} ==", f"   {ablation.job}, {steps} pretraining steps, {seeds} seeds; frozen "
                                         f"encoder, linear probe (kNN in MLflow); train Flanders A -> test Flanders B,"
                                         f" BigEarthNet train -> test patches"]
    lines += [f"   note: {n}" for n in ablation.notes]
    summary: dict[str, float] = {}
    for comp in ablation.comparisons:
        arm_t = next(a for a in ablation.arms if a.name == comp.treatment)
        arm_c = next(a for a in ablation.arms if a.name == comp.control)
        lines.append(f"   {comp.treatment} vs {comp.control}   (paper: {comp.paper})")
        header = (f"   {'probe':28} {'metric':12} {comp.treatment[:18]:>18} {comp.control[:18]:>18} {'random enc.':>15} "
                  f"{'majority':>8} {'gain (paired)':>17} {'t':>6} {'agrees':>6}")
        lines.append(header)
        for pt, pc in zip(arm_t.probes, arm_c.probes):
            metric = pt.metric
            t_vals = [r[metric] for r in results[comp.treatment][pt.name]]
            c_vals = [r[metric] for r in results[comp.control][pc.name]]
            rand = [r[metric] for r in baselines.get(pt.name, [])]
            major = statistics.mean(r[metric.replace("linear", "majority")] for r in results[comp.treatment][pt.name])
            g, sd, t = paired(t_vals, c_vals)
            agree = "yes" if (g > 0) == (comp.paper_gain > 0) else "no"
            cell = [mean_sd(v) for v in (t_vals, c_vals, rand)]
            lines.append(f"   {pt.name:28} {metric:12} " + " ".join(f"{m:8.4f} ±{s:7.4f}" for m, s in cell[:2])
                         + f" {cell[2][0]:8.4f} ±{cell[2][1]:5.3f} {major:8.4f} {g:+8.4f} ±{sd:7.4f} {t:6.2f} "
                         f"{agree:>6}")
            tag = f"{comp.treatment}_vs_{comp.control}/{pt.name}".replace(" ", "_").replace(",", "").replace("+", "p")
            summary |= {f"{tag}/gain": g, f"{tag}/gain_sd": sd, f"{tag}/t": t}
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k.replace("(", "").replace(")", ""), float(v), now, 0) for k, v in summary.items()
               if not math.isnan(v)]
    client.log_batch(parent, metrics=metrics)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 150 steps: a first look")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 5; --quick: 2)")
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps per run (default 300; --quick: 150)")
    ap.add_argument("--ablations", default="msgfm,ofa,skysense,mars,ofa_p4")
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "reproduce")
    args = ap.parse_args()
    seeds = args.seeds or (2 if args.quick else 5)
    steps = args.steps or (150 if args.quick else 300)

    from mlflow.tracking import MlflowClient

    from earthray import tracking
    from earthray.runtime import ensure_ray

    args.workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(args.workdir / 'mlflow.db').resolve()}"
    ensure_ray()
    runner = Runner(args.workdir, steps, uri)
    client = MlflowClient(uri)
    catalogue = ablations()
    out: list[str] = []
    for key in args.ablations.split(","):
        ablation = catalogue[key]
        t0 = time.perf_counter()
        parent = tracking.open_run(uri, EXPERIMENT, f"{key}-{steps}steps-{seeds}seeds",
                                   {"ablation": ablation.title, "steps": steps, "seeds": seeds, "job": ablation.job},
                                   args.workdir / "mlartifacts")
        treatment = ablation.arms[0]
        results: dict[str, dict[str, list[dict]]] = {a.name: {} for a in ablation.arms}
        baselines: dict[str, list[dict]] = {}
        for seed in range(seeds):
            for arm in ablation.arms:
                bundle = runner.bundle(ablation, arm, seed, treatment)
                child = tracking.open_run(uri, EXPERIMENT, f"{key}/{arm.name}/seed{seed}", {"arm": arm.name,
                                          "seed": seed, "overrides": arm.overrides, "bundle": str(bundle)},
                                          args.workdir / "mlartifacts", tags={"mlflow.parentRunId": parent})
                for probe in arm.probes:
                    scores = runner.probe(bundle, probe, seed)
                    results[arm.name].setdefault(probe.name, []).append(scores)
                    tracking.log_metrics(uri, child, {f"{probe.name}/{k}".replace(" ", "_").replace(",", "")
                                                      .replace("(", "").replace(")", ""): v
                                                      for k, v in scores.items() if v == v}, seed)
                tracking.close_run(uri, child, ok=True)
            probes = list({p.name: p for arm in ablation.arms for p in arm.probes}.values())
            encoder = runner.bundle(ablation, Arm("random", None, probes), seed, treatment)
            for probe in probes:
                baselines.setdefault(probe.name, []).append(runner.probe(encoder, probe, seed))
            print(f"{key}: seed {seed} done [{time.perf_counter() - t0:.0f} s]", flush=True)
        lines = report(ablation, results, baselines, seeds, steps, client, parent)
        tracking.close_run(uri, parent, ok=True)
        print("\n".join(lines), flush=True)
        out += lines + [""]
    print("\n" + "\n".join(out))
    print(f"MLflow: mlflow ui --backend-store-uri {uri}")


if __name__ == "__main__":
    main()
