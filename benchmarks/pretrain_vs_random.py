"""Does earthray's pretraining help? Land-cover segmentation on a place pretraining never saw.

One run, side by side, through the platform's own jobs, on the bundled real data:

1. ingest the sample (``jobs/ingest-sample.yaml``): Sentinel-2 L2A dates of WorldCereal Flanders patch A
   (split train) and patch B, 80 km east (split test), with per-pixel land cover, and the monthly cube of a
   third place (split train);
2. pretrain OFA-Net tiny (MAE; 4 px patches, half masked) on the Sentinel-2 chips of patch A and the
   monthly cube (labels unused; patch B never seen);
3. for each seed, fine-tune the same FPN segmentation head with the same steps, data order and head
   init on patch A with (a) the pretrained encoder and (b) an encoder randomly initialised with that
   seed, the same input normalisation, per encoder mode (``frozen`` by default; ``full`` too on request);
4. score on patch B: mIoU / OA per seed, their mean and spread, the paired gain, and IoU per class.

    python benchmarks/pretrain_vs_random.py [--seeds 5] [--modes frozen,full] [--pretrain-steps 400]

One seed is noise at this scale: the seed-to-seed spread of a random init is as large as the effects
measured, which is why the comparison is paired and repeated.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = "s2_l2a+s1_grd_db+label"
MONTHLY = "s2_l2a+s1_grd_db+dem"
DATA = {"sensors": ["s2_l2a"]}  # Sentinel-2 alone, from the co-located groups
MODEL = {"patch_size": 4, "mask_ratio": 0.5}  # 8x8 tokens per 32 px chip; see the issue 5 notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--modes", default="frozen", help="comma-separated encoder modes: frozen, partial, full")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from earthray.bundle import load_bundle, save_bundle
    from earthray.data.ingest import ingest
    from earthray.data.spec import load_spec
    from earthray.recipes import create_recipe
    from earthray.runtime import ensure_ray
    from earthray.train.finetune import finetune
    from earthray.train.run import pretrain
    from earthray.train.spec import FinetuneSpec, PretrainSpec

    work = args.workdir or Path(tempfile.mkdtemp(prefix="earthray-pvr-"))
    ensure_ray()
    t0 = time.perf_counter()
    spec = load_spec(ROOT / "jobs" / "ingest-sample.yaml")
    spec.output = str(work / "shards")
    manifest = ingest(spec)
    counts = manifest["groups"][PAIRS]["by_split"]
    print(f"chips: labelled Flanders pairs {counts} (train: patch A, test: patch B), monthly cube "
          f"{manifest['groups'][MONTHLY]['by_split']}  [{time.perf_counter() - t0:.0f} s]", flush=True)

    common = {"workdir": str(work), "tracking": {"log_every": 50}, "workers": {"num_workers": 1, "cpus_per_worker": 1}}
    t0 = time.perf_counter()
    pre = pretrain(PretrainSpec.model_validate({
        **common, "name": "pvr-pretrain", "recipe": "ofa", "preset": "tiny", "model": MODEL,
        "data": {"root": spec.output, "groups": {PAIRS: 32, MONTHLY: 32}, "split": "train", **DATA},
        "optim": {"lr": 1.5e-3, "warmup_steps": 20, "weight_decay": 0.05},
        "max_steps": args.pretrain_steps, "checkpoint_every": args.pretrain_steps}))
    print(f"pretrained {args.pretrain_steps} steps: loss {pre.metrics.get('loss', float('nan')):.4f} "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    trained = load_bundle(pre.bundle)

    def random_bundle(seed: int) -> Path:
        """The pretrained bundle's recipe, config, sensors and normalisation, with fresh weights."""
        torch.manual_seed(seed)
        meta = trained.meta
        model = create_recipe("ofa", trained.sensors, "tiny", **MODEL)
        return save_bundle(work / "bundles" / f"pvr-random-{seed}", model, recipe="ofa", preset="tiny",
                           config=model.config, sensors=trained.sensors, input_size=meta["input_size"],
                           normalisation=meta["normalisation"])

    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for seed in range(args.seeds):
        arms = (("pretrained", pre.bundle), ("random init", random_bundle(1000 + seed)))
        for mode in args.modes.split(","):
            lr = 2e-3 if mode == "frozen" else 1e-3
            for label, bundle in arms:
                result = finetune(FinetuneSpec.model_validate({
                    **common, "seed": seed, "name": f"pvr-{mode}-{label.split()[0]}-{seed}", "bundle": str(bundle),
                    "task": {"task": "segmentation", "encoder": mode, "layer_decay": 0.75},
                    "data": {"root": spec.output, "groups": {PAIRS: 16}, "label": "land_cover", **DATA},
                    "optim": {"lr": lr, "warmup_steps": 10, "weight_decay": 0.05},
                    "max_steps": args.finetune_steps, "checkpoint_every": args.finetune_steps,
                    "eval": {"split": "test", "batch_size": 64}}))
                rows.setdefault((mode, label), []).append(result.metrics)
            print(f"seed {seed}: " + "  ".join(f"{m}/{lb} mIoU {v[-1]['val_miou']:.4f}" for (m, lb), v in rows.items()
                                               if m in args.modes.split(",")), flush=True)

    def mean(runs: list[dict[str, float]], key: str) -> float:
        return statistics.mean(r[key] for r in runs)

    print(f"\nheld-out place (Flanders patch B, {counts.get('test')} chips) land-cover segmentation, OFA-Net tiny, "
          f"{args.finetune_steps} fine-tuning steps, {args.seeds} seeds")
    print(f"{'encoder':8} {'init':12} {'mIoU mean':>10} {'sd':>7} {'OA mean':>8}  per seed mIoU")
    for (mode, label), v in rows.items():
        mious = [r["val_miou"] for r in v]
        print(f"{mode:8} {label:12} {statistics.mean(mious):10.4f} {statistics.pstdev(mious):7.4f} "
              f"{mean(v, 'val_oa'):8.4f}  {' '.join(f'{m:.4f}' for m in mious)}")
    for mode in args.modes.split(","):
        pairs = list(zip(rows[(mode, "pretrained")], rows[(mode, "random init")]))
        gains = [p["val_miou"] - r["val_miou"] for p, r in pairs]
        sd = statistics.stdev(gains) if len(gains) > 1 else float("nan")
        oa = [p["val_oa"] - r["val_oa"] for p, r in pairs]
        print(f"gain ({mode} encoder): mIoU {statistics.mean(gains):+.4f} (paired sd {sd:.4f}, "
              f"pretrained ahead in {sum(g > 0 for g in gains)} of {len(gains)} seeds); OA {statistics.mean(oa):+.4f} "
              f"(ahead in {sum(g > 0 for g in oa)})")
        print("  mIoU averages the classes each run scores: a class no held-out pixel has counts 0 for a run that "
              "predicts it and is left out for one that does not, so read it beside OA and the classes below")
        classes = [k for k in pairs[0][0] if k.startswith("val_iou_")]
        print(f"  IoU per class, mean over seeds ({mode} encoder):")
        print(f"  {'class':16} {'pretrained':>10} {'random':>8} {'gain':>8}")
        for k in classes:
            p, r = mean(rows[(mode, "pretrained")], k), mean(rows[(mode, "random init")], k)
            print(f"  {k[8:]:16} {p:10.4f} {r:8.4f} {p - r:+8.4f}")
        print("  (nan: no held-out pixel has the class and no prediction made it)")
    print(f"\nworkdir: {work}")


if __name__ == "__main__":
    main()
