"""``earthray quickstart``: the whole platform on one machine, on the bundled real imagery.

Local Ray, SQLite MLflow, the repo's own job specs, in the order a platform team would run them:
ingest -> pretrain (OFA-Net tiny) -> fine-tune the land-cover head (registered as
``models:/landcover@champion``) -> serve it and query it over HTTP -> batch inference over a
whole scene -> a summary of where everything is. Each step is the same code path as its own
command; re-running is safe (ingest and inference skip finished work, pretraining and
fine-tuning resume finished runs).

What it prints is earthray's own: a line as each stage starts and ends, progress bars (scenes, training
steps, windows; bounded plain lines off a terminal). Ray's own log lines stay in Ray's log files (the
first line says where) unless ``EARTHRAY_VERBOSE=1`` (``earthray quickstart --verbose``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from earthray.train.progress import Reporter

LANDSAT7 = ["B1", "B2", "B3", "B4", "B5", "B7"]
MODEL = "landcover"


@dataclass
class QuickstartResult:
    outputs: dict[str, str] = field(default_factory=dict)
    answers: dict[str, object] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def sample_request(root: Path, size: int = 64) -> bytes:
    """A real 6-band Landsat 7 GeoTIFF chip (a window of the sample scene), as a client would send."""
    import numpy as np
    import rasterio
    from rasterio.io import MemoryFile
    from rasterio.windows import Window

    files = [root / "data" / "sample" / "landsat7_nc" / f"lsat7_2000_{b}0.tif" for b in (1, 2, 3, 4, 5, 7)]
    window = Window(96, 96, size, size)
    bands = []
    for f in files:
        with rasterio.open(f) as src:
            bands.append(src.read(1, window=window))
            profile = {"crs": src.crs, "transform": src.window_transform(window), "dtype": src.dtypes[0]}
    # The files are int16 with a few values outside the 8-bit DN range Landsat 7 sends (the sensor's dtype).
    data = np.clip(np.stack(bands), 0, 255).astype(np.uint8)
    profile["dtype"] = "uint8"
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=size, height=size, count=len(bands), **profile) as dst:
            dst.write(data)
            dst.descriptions = tuple(LANDSAT7)
        return mem.read()


def served_classes(path: Path) -> list[str]:
    """The class names a served class map carries in its ``classes`` tag (HTTP returns no sidecar file)."""
    import json

    import rasterio

    with rasterio.open(path) as ds:
        return json.loads(ds.tags()["classes"])


def quickstart(root: str | Path, port: int = 8000, shown: Reporter | None = None) -> QuickstartResult:
    """Run every stage on the repo at ``root``; ``shown`` (default: stderr) gets a line as each stage starts and
    ends, and the stages' progress."""
    import httpx
    from ray import serve

    from earthray.data.ingest import ingest
    from earthray.data.spec import load_spec
    from earthray.io import category_sidecar, quicklook
    from earthray.runtime import ensure_ray, ray_logs, verbose
    from earthray.serve.app import run_config
    from earthray.serve.infer import infer, load_infer_spec
    from earthray.serve.run import check_port_free
    from earthray.train.finetune import finetune
    from earthray.train.run import pretrain
    from earthray.train.spec import load_finetune_spec, load_pretrain_spec

    root = Path(root).resolve()
    jobs = root / "jobs"
    out = QuickstartResult()
    shown = shown or Reporter()
    step = shown.line
    check_port_free("127.0.0.1", port)  # before minutes of training, not at the serving stage
    if dashboard := ensure_ray():
        logs = "" if verbose() or not ray_logs() else f"; Ray's logs: {ray_logs()} (--verbose shows them here)"
        step(f"Ray dashboard: {dashboard}{logs}")

    def stage(name: str, fn):
        step(f"[{len(out.seconds) + 1}/5] {name} ...")
        t0 = time.perf_counter()
        value = fn()
        out.seconds[name] = time.perf_counter() - t0
        step(f"[{len(out.seconds)}/5] {name}: done in {out.seconds[name]:.0f} s")
        return value

    def ingest_sample():
        with shown.task("ingest", "scenes") as bar:
            return ingest(load_spec(jobs / "ingest-sample.yaml"),
                          on_scene=lambda r, done, total: bar.update(done, total, Path(r.scene).name))

    def train(run, spec):
        with shown.training(spec):
            return run(spec)

    manifest = stage("ingest the sample imagery", ingest_sample)
    groups = manifest["groups"]
    step(f"      {sum(g['count'] for g in groups.values())} chips in {len(groups)} groups; "
         f"quarantined: {len(manifest['quarantine'])}")
    pre = stage("pretrain OFA-Net tiny", lambda: train(pretrain, load_pretrain_spec(jobs / "pretrain-ofa-tiny.yaml")))
    step(f"      loss {pre.metrics.get('loss', float('nan')):.4f}; bundle {pre.bundle}")
    ft = stage("fine-tune the land-cover head",
               lambda: train(finetune, load_finetune_spec(jobs / "finetune-landcover.yaml")))
    scores = {k: round(v, 4) for k, v in ft.metrics.items() if k.startswith("val_") and not k.startswith("val_iou_")}
    step(f"      held-out {scores}; registered {ft.registered.uri if ft.registered else '-'} (@champion)")

    base = f"http://127.0.0.1:{port}"

    def serve_and_query():
        run_config(root / "serve" / "landcover.yaml", port=port, host="127.0.0.1", block=False,
                   on_status=lambda s: step(f"      {s.removesuffix('; Ctrl-C stops')}"))  # it is queried, then stops
        try:
            with httpx.Client(base_url=base, timeout=120) as http:
                out.answers["models"] = http.get("/models").json()
                chip = sample_request(root)
                query = {"bands": ",".join(f"landsat7_etm:{b}" for b in LANDSAT7)}  # the model has 5 sensors
                answer = http.post(f"/models/{MODEL}/predict", content=chip, params=query,
                                   headers={"content-type": "image/tiff"})
                _ok(answer)
                out.answers["predict"] = answer.json()
                tiff = http.post(f"/models/{MODEL}/predict", content=chip, params=query | {"format": "geotiff"},
                                 headers={"content-type": "image/tiff"})
                _ok(tiff)
                target = root / "work" / "quickstart" / "served-landcover.tif"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tiff.content)
                category_sidecar(target, served_classes(target))  # GIS tools read class names beside the file
                out.outputs["served GeoTIFF"] = str(target)
        finally:
            serve.shutdown()

    stage("serve the head and query it over HTTP", serve_and_query)
    predicted = out.answers["predict"]
    step(f"      POST {base}/models/{MODEL}/predict -> {_summary(predicted)}")

    infer_spec = load_infer_spec(jobs / "infer-landcover.yaml")

    def infer_scene():
        with shown.task("infer", "windows") as bar:
            return infer(infer_spec, on_windows=lambda done, total: bar.update(done, total))

    result = stage("batch inference over a whole scene", infer_scene)
    for scene in result.scenes:
        step(f"      {scene.scene}: {scene.status} -> {scene.output or scene.reason}")
        if scene.output:
            out.outputs["land-cover map"] = scene.output
            png = quicklook(scene.output, root / "work" / "quickstart" / "landcover-map.png")
            out.outputs["land-cover preview"] = str(png)

    previews = sorted((root / "work" / "mlartifacts").glob(f"*/{pre.run_id}/artifacts/previews/*.png"))
    out.outputs |= {
        "shards": str(Path(load_spec(jobs / "ingest-sample.yaml").output)),
        "pretrained bundle": str(pre.bundle),
        "fine-tuned bundle": str(ft.bundle),
        "registered model": ft.registered.uri if ft.registered else "",
        "MLflow UI": f"mlflow ui --backend-store-uri {ft.tracking_uri}",
    }
    if previews:
        out.outputs["reconstruction preview"] = str(previews[-1])
    return out


def _ok(response) -> None:
    if response.is_error:
        raise ValueError(f"{response.request.method} {response.request.url}: {response.status_code} {response.text}")


def _summary(answer: dict) -> str:
    """One line of a JSON prediction: the most frequent classes of a segmentation, or the top scores."""
    pixels = answer.get("pixels") or answer.get("scores") or {}
    total = sum(pixels.values()) or 1
    top = sorted(pixels.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{k} {v / total:.0%}" for k, v in top) or str(answer)[:200]
