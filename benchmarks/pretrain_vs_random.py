"""Does earthray's pretraining help? Land-cover segmentation on the labelled Landsat 7 sample.

One run, side by side, through the platform's own jobs:

1. ingest the bundled Landsat 7 scene with its strata labels (32 px chips, spatial-block split),
   plus an overlapping-stride copy of the same scene's *train* blocks for pretraining;
2. pretrain OFA-Net tiny (MAE) on the train split's images only (labels unused);
3. fine-tune the same FPN segmentation head, same steps, data and seed, on (a) the pretrained
   encoder and (b) a randomly initialised one, for each encoder mode (frozen, full);
4. print held-out (val split, other spatial blocks) mIoU / OA for both and the gain.

    python benchmarks/pretrain_vs_random.py [--pretrain-steps 400] [--finetune-steps 150]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
L7 = ROOT / "data" / "sample" / "landsat7_nc"
GROUP = "landsat7_etm+label"


def ingest_spec(out: Path, stride: int) -> dict:
    bands = [str(L7 / f"lsat7_2000_{b}0.tif") for b in (1, 2, 3, 4, 5, 7)]
    return {
        "name": f"l7-stride{stride}", "output": str(out), "chip_size": 32, "stride": stride,
        "min_valid_fraction": 0.5, "split": {"train": 0.7, "val": 0.15, "test": 0.15, "seed": 0},
        "inputs": [{"name": "landsat7_nc", "sensors": {"landsat7_etm": {"stack": bands,
                                                                         "bands": ["B1", "B2", "B3", "B4", "B5", "B7"]}},
                    "label": {"path": str(L7 / "strata.tif"), "first_class": 1,
                              "classes": [f"class_{i}" for i in range(1, 8)]}}],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from earthray.bundle import save_bundle
    from earthray.data.ingest import ingest
    from earthray.data.spec import IngestSpec
    from earthray.recipes import create_recipe
    from earthray.runtime import ensure_ray
    from earthray.train.finetune import finetune
    from earthray.train.run import pretrain, sensors_of
    from earthray.train.spec import FinetuneSpec, PretrainSpec

    work = args.workdir or Path(tempfile.mkdtemp(prefix="earthray-pvr-"))
    ensure_ray()
    t0 = time.perf_counter()
    labelled = ingest(IngestSpec.model_validate(ingest_spec(work / "shards" / "l7", 32)))
    # Same scene, overlapping chips for pretraining; the spatial blocks (and so the splits) are the same.
    unlabelled = ingest(IngestSpec.model_validate(ingest_spec(work / "shards" / "l7-dense", 8)))
    counts = labelled["groups"][GROUP]["by_split"]
    print(f"chips: labelled {counts}, pretraining (train split, stride 8) "
          f"{unlabelled['groups'][GROUP]['by_split'].get('train')}  [{time.perf_counter() - t0:.0f} s]")

    common = {"workdir": str(work), "seed": args.seed, "tracking": {"log_every": 50},
              "workers": {"num_workers": 1, "cpus_per_worker": 1}}
    t0 = time.perf_counter()
    pre = pretrain(PretrainSpec.model_validate({
        **common, "name": "pvr-pretrain", "recipe": "ofa", "preset": "tiny",
        "data": {"root": str(work / "shards" / "l7-dense"), "groups": {GROUP: 32}},
        "optim": {"lr": 1.5e-3, "warmup_steps": 20, "weight_decay": 0.05},
        "max_steps": args.pretrain_steps, "checkpoint_every": args.pretrain_steps}))
    print(f"pretrained {args.pretrain_steps} steps: loss {pre.metrics.get('loss', float('nan')):.4f} "
          f"[{time.perf_counter() - t0:.0f} s]")

    sensors = sensors_of(labelled, [GROUP])
    random = create_recipe("ofa", sensors, "tiny")
    random_bundle = save_bundle(work / "bundles" / "pvr-random", random, recipe="ofa", preset="tiny",
                                config=random.config, sensors=sensors, input_size=32,
                                normalisation=json.loads(json.dumps(
                                    {s.name: {"mean": [b.mean for b in s.bands], "std": [b.std for b in s.bands]}
                                     for s in sensors})))
    from earthray.train.evaluate import EvaluateSpec, evaluate

    probe = EvaluateSpec.model_validate({"data": {"root": str(work / "shards" / "l7"), "group": GROUP},
                                         "workdir": str(work), "seed": args.seed})
    probes = {label: evaluate(bundle, probe, log=False).scores
              for label, bundle in (("pretrained", pre.bundle), ("random init", random_bundle))}
    rows = []
    for mode, lr in (("frozen", 2e-3), ("full", 1e-3)):
        for label, bundle in (("pretrained", pre.bundle), ("random init", random_bundle)):
            t0 = time.perf_counter()
            result = finetune(FinetuneSpec.model_validate({
                **common, "name": f"pvr-{mode}-{label.split()[0]}", "bundle": str(bundle),
                "task": {"task": "segmentation", "encoder": mode, "layer_decay": 0.75},
                "data": {"root": str(work / "shards" / "l7"), "groups": {GROUP: 16}},
                "optim": {"lr": lr, "warmup_steps": 10, "weight_decay": 0.05},
                "max_steps": args.finetune_steps, "checkpoint_every": args.finetune_steps,
                "eval": {"split": "val", "batch_size": 32}}))
            m = result.metrics
            rows.append((mode, label, m["val_miou"], m["val_oa"], m["val_f1"], time.perf_counter() - t0))

    print(f"\nheld-out (val split) land-cover segmentation, OFA-Net tiny, {args.finetune_steps} fine-tuning steps")
    print(f"{'encoder':8} {'init':12} {'mIoU':>7} {'OA':>7} {'F1':>7} {'seconds':>8}")
    for mode, label, miou, oa, f1, secs in rows:
        print(f"{mode:8} {label:12} {miou:7.4f} {oa:7.4f} {f1:7.4f} {secs:8.0f}")
    for mode in ("frozen", "full"):
        pre_row, rnd_row = [r for r in rows if r[0] == mode]
        print(f"gain ({mode} encoder): mIoU {pre_row[2] - rnd_row[2]:+.4f} "
              f"({pre_row[2] / max(rnd_row[2], 1e-9):.2f}x), OA {pre_row[3] - rnd_row[3]:+.4f}")
    print("\nfrozen features, per feature cell (earthray evaluate): linear probe and kNN on the val split")
    print(f"{'init':12} {'linear mIoU':>12} {'linear OA':>10} {'kNN mIoU':>9} {'kNN OA':>7}")
    for label, sc in probes.items():
        print(f"{label:12} {sc['linear/miou']:12.4f} {sc['linear/oa']:10.4f} {sc['knn/miou']:9.4f} {sc['knn/oa']:7.4f}")
    print(f"\nworkdir: {work}")


if __name__ == "__main__":
    main()
