"""Ray Serve online inference: real HTTP against a running local Serve app on the session's Ray.

Three fine-tuned bundles (random weights: answers are compared with direct ``TaskModel.predict`` calls on
the same input, normalised here independently of earthray's code), one loaded from the MLflow registry
(``models:/landcover@champion``), multiplexed on one model host that holds at most two at a time;
real Landsat 7 imagery; every kind of bad request; bearer-token auth; 503 + Retry-After under overload;
``earthray serve`` on a Serve config file in a separate process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from earthray.bundle import load_bundle, save_bundle
from earthray.io import Grid, open_scene, write_raster
from earthray.recipes import create_recipe
from earthray.recipes.finetune import TaskModel, TaskSpec
from earthray.sensors import get_sensor

ROOT = Path(__file__).resolve().parents[1]
L7 = ["B1", "B2", "B3", "B4", "B5", "B7"]
CLASSES = [f"class_{i}" for i in range(1, 8)]
TOKEN = "s3cret-token"
SIZE = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def landsat_scene() -> tuple[np.ndarray, np.ndarray, Grid]:
    """The real Landsat 7 sample as one (6, H, W) float32 stack, its validity per band, its grid."""
    scene = open_scene([str(ROOT / f"data/sample/landsat7_nc/lsat7_2000_{b}.tif") for b in (10, 20, 30, 40, 50, 70)])
    with scene:
        data, valid = scene.read()
        return data, valid, scene.grid


def make_bundle(path: Path, task: str, stats: dict, seed: int) -> Path:
    torch.manual_seed(seed)
    l7 = get_sensor("landsat7_etm").select(L7)
    sensors, kw = [l7], {"classes": CLASSES}
    if task == "fused":  # a multi-sensor land-cover model, as fine-tuned on a multi-sensor pretrained bundle
        sensors, task = [get_sensor("vhr_rgbn"), l7], "segmentation"
    if task == "regression":
        sensors = [l7, get_sensor("dem")]
        kw = {"inputs": ["landsat7_etm"], "target": "dem", "target_bands": ["elevation"],
              "target_stats": {"mean": [120.0], "std": [35.0]}}
    model = TaskModel(create_recipe("ofa", sensors, "tiny"), TaskSpec(task=task, **kw), SIZE)
    norm = {"landsat7_etm": stats}
    if len(sensors) == 2 and sensors[0].name == "vhr_rgbn":
        norm["vhr_rgbn"] = {"mean": [115.0, 115.0, 105.0, 130.0], "std": [55.0, 50.0, 50.0, 55.0]}
    if task == "regression":
        norm["dem"] = {"mean": [100.0], "std": [50.0]}
    return save_bundle(path, model.encoder, recipe="ofa", preset="tiny", config=model.encoder.config, sensors=sensors,
                       normalisation=norm, input_size=SIZE, head=model.head, head_spec=model.head_spec,
                       classes=model.spec.classes)


class Direct:
    """The bundle's model called directly, on input normalised here (not by earthray.serve)."""

    def __init__(self, path: Path):
        bundle = load_bundle(path)
        self.model = TaskModel.from_bundle(bundle).eval()
        s = bundle.input_stats()["landsat7_etm"]
        self.mean = np.array(s["mean"], np.float32)[:, None, None]
        self.std = np.array(s["std"], np.float32)[:, None, None]

    def normalise(self, raw: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ok = valid.all(axis=0)
        x = np.where(ok, (raw.astype(np.float32) - self.mean) / self.std, 0).astype(np.float32)
        return x, ok

    @torch.no_grad()
    def __call__(self, xs: np.ndarray, oks: np.ndarray) -> np.ndarray:
        out = self.model.predict({"landsat7_etm": torch.from_numpy(xs), "landsat7_etm.valid": torch.from_numpy(oks)})
        task = self.model.spec.task
        if task in ("classification", "segmentation"):
            return out.softmax(1).numpy()
        return self.model.denormalise(out).numpy()


@pytest.fixture(scope="module")
def scene():
    return landsat_scene()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, scene):
    data, valid, _ = scene
    ok = valid.all(axis=0)
    stats = {"mean": [float(b[ok].mean()) for b in data], "std": [float(b[ok].std()) for b in data]}
    root = tmp_path_factory.mktemp("bundles")
    return {task: make_bundle(root / task, task, stats, seed)
            for seed, task in enumerate(["segmentation", "classification", "regression", "fused"])}


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory, bundles):
    from earthray.registry import register_bundle
    from earthray.train.tracking import open_run

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id = open_run(uri, "serve-tests", "landcover", {}, root / "artifacts")
    register_bundle(bundles["segmentation"], "landcover", tracking_uri=uri, run_id=run_id, aliases=["champion"])
    return uri


@pytest.fixture(scope="module")
def server(ray_session, bundles, registry_uri):
    from ray import serve

    from earthray.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    models = {"landcover": "models:/landcover@champion", "scenes": str(bundles["classification"]),
              "elevation": str(bundles["regression"]), "fused": str(bundles["fused"])}
    serve.run(build_app({"models": models, "tracking_uri": registry_uri, "max_models_per_replica": 2,
                         "max_batch_size": 4, "max_pixels": 200 * 200, "max_request_bytes": 2 * 2**20,
                         "auth_token": TOKEN}), name="earthray", route_prefix="/")
    serve.run(build_app({"models": {"landcover": str(bundles["segmentation"])}, "max_batch_size": 1,
                         "max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 3,
                         "max_pixels": 512 * 512}), name="tight", route_prefix="/tight")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=180) as c:
        yield c


def chip(scene, row: int, col: int, h: int = SIZE, w: int = SIZE):
    data, valid, grid = scene
    win = Window(col, row, w, h)
    return data[:, row:row + h, col:col + w], valid[:, row:row + h, col:col + w], \
        Grid(grid.crs, grid.window_transform(win), w, h)


def geotiff_bytes(tmp_path: Path, raw: np.ndarray, valid: np.ndarray, grid: Grid, names=L7) -> bytes:
    filled = np.where(valid, raw, np.float32(-99999)).astype(np.float32)
    return write_raster(tmp_path / "req.tif", filled, grid, nodata=-99999, band_names=names).read_bytes()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def margin_ok(probs: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Pixels whose top class leads the second by more than ``eps`` (a different batch may flip near-ties)."""
    top2 = np.sort(probs, axis=0)[-2:]
    return top2[1] - top2[0] > eps


def test_health_readiness_models_and_openapi(client, server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}  # no token needed for probes
    ready = httpx.get(f"{server}/ready", timeout=60)
    assert ready.status_code == 200 and set(ready.json()["models"]) == {"landcover", "scenes", "elevation", "fused"}
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert models["landcover"]["task"] == "segmentation" and models["landcover"]["bands"] == L7
    assert models["landcover"]["source"] == "models:/landcover/1"  # the alias pinned to its version
    assert models["landcover"]["classes"] == CLASSES and models["landcover"]["input_size"] == SIZE
    assert models["scenes"]["task"] == "classification"
    assert models["elevation"]["target_bands"] == ["elevation"] and models["elevation"]["bands"] == L7
    assert models["landcover"]["sensors"][0] == {"name": "landsat7_etm", "bands": L7, "dtype": "uint8", "nodata": 0}
    assert client.get("/models/scenes").json()["name"] == "scenes"
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/models/{name}/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json", "image/tiff",
                                                      "application/x-npy"}
    assert "/models" in schema["paths"] and "/ready" in schema["paths"]


def test_segmentation_geotiff_from_registry_matches_the_model(client, scene, bundles, tmp_path):
    raw, valid, grid = chip(scene, 120, 40)  # on the scene's edge: 41% nodata
    direct = Direct(bundles["segmentation"])
    x, ok = direct.normalise(raw, valid)
    probs = direct(x[None], ok[None])[0]
    expected = np.where(ok, probs.argmax(0), 255)

    body = geotiff_bytes(tmp_path, raw, valid, grid)
    r = client.post("/models/landcover/predict", params={"format": "geotiff"},
                    files={"file": ("chip.tif", body, "image/tiff")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/tiff"
    with rasterio.MemoryFile(r.content) as mem, mem.open() as ds:
        assert ds.crs == grid.crs and ds.transform == grid.transform and ds.shape == (SIZE, SIZE)
        assert json.loads(ds.tags()["classes"]) == CLASSES and ds.nodata == 255
        labels = ds.read(1)
    assert (labels == 255).sum() == (~ok).sum() > 0  # the chip has nodata pixels: they stay nodata
    sure = margin_ok(probs)
    assert sure.mean() > 0.95
    np.testing.assert_array_equal(labels[sure], expected[sure])

    js = client.post("/models/landcover/predict", content=body, headers={"content-type": "image/tiff"}).json()
    assert js["invalid_pixels"] == int((~ok).sum()) and sum(js["pixels"].values()) == int(ok.sum())
    counts = np.bincount(labels[ok], minlength=len(CLASSES))
    assert abs(np.array([js["pixels"][c] for c in CLASSES]) - counts).sum() <= (~sure).sum()
    np.testing.assert_allclose([js["mean_scores"][c] for c in CLASSES], probs[:, ok].mean(1), atol=1e-4)


def test_large_input_is_tiled_and_blended_like_the_rule_says(client, scene, bundles):
    """A 50x70 array without georeferencing: windows at 0/18 and 0/24/38, Hann-blended probabilities."""
    raw, valid, _ = chip(scene, 40, 100, 50, 70)
    direct = Direct(bundles["segmentation"])
    x, ok = direct.normalise(raw, valid)
    acc, wsum = np.zeros((len(CLASSES), 50, 70), np.float64), np.zeros((50, 70))
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(SIZE) + 0.5) / SIZE)
    weight = np.outer(hann, hann)
    for r in (0, 18):
        for c in (0, 24, 38):
            p = direct(x[None, :, r:r + SIZE, c:c + SIZE], ok[None, r:r + SIZE, c:c + SIZE])[0]
            acc[:, r:r + SIZE, c:c + SIZE] += p * weight
            wsum[r:r + SIZE, c:c + SIZE] += weight
    probs = acc / wsum
    r = client.post("/models/landcover/predict", params={"format": "geotiff", "bands": ",".join(L7)},
                    content=npy_bytes(np.where(valid, raw, 0).astype(np.uint8)),
                    headers={"content-type": "application/x-npy"})
    assert r.status_code == 200, r.text
    with rasterio.MemoryFile(r.content) as mem, mem.open() as ds:
        assert ds.crs is None and ds.shape == (50, 70)
        labels = ds.read(1)
    # uint8 arrays declare no nodata: the sensor's (0) applies, as in ingest; the filled pixels were 0
    sure = margin_ok(probs) & ok
    assert sure.mean() > 0.5
    np.testing.assert_array_equal(labels[sure], probs.argmax(0)[sure])
    assert (labels[~ok] == 255).all()


def test_second_model_is_multiplexed_on_the_same_host(client, scene, bundles, tmp_path):
    from ray import serve

    raw, valid, grid = chip(scene, 200, 300)
    direct = Direct(bundles["classification"])
    x, ok = direct.normalise(raw, valid)
    expected = direct(x[None], ok[None])[0]
    as_json = client.post("/models/scenes/predict", json={"array": np.where(valid, raw, 0).astype(int).tolist(),
                                                          "bands": L7})
    assert as_json.status_code == 200, as_json.text
    scores = as_json.json()["scores"]
    np.testing.assert_allclose([scores[c] for c in CLASSES], expected, atol=1e-5)
    assert as_json.json()["top"] == CLASSES[int(expected.argmax())]
    b64 = base64.b64encode(geotiff_bytes(tmp_path, raw, valid, grid)).decode()
    as_b64 = client.post("/models/scenes/predict", json={"geotiff": b64}).json()
    np.testing.assert_allclose([as_b64["scores"][c] for c in CLASSES], expected, atol=1e-5)

    # regression: physical units, NaN where the input is invalid, on the input's grid
    reg = Direct(bundles["regression"])
    values = reg(x[None], ok[None])[0, 0]
    r = client.post("/models/elevation/predict", params={"format": "geotiff"},
                    files={"file": ("chip.tif", geotiff_bytes(tmp_path, raw, valid, grid))})
    assert r.status_code == 200, r.text
    with rasterio.MemoryFile(r.content) as mem, mem.open() as ds:
        assert ds.crs == grid.crs and ds.transform == grid.transform and ds.descriptions == ("elevation",)
        got = ds.read(1)
    assert np.isnan(got[~ok]).all()
    np.testing.assert_allclose(got[ok], values[ok], rtol=1e-4, atol=1e-3)

    # three models on a host that keeps two: the least recently used one was unloaded
    host = serve.get_deployment_handle("ModelServer", app_name="earthray")

    def loaded() -> list[str]:
        return sorted(m.split("|")[0] for m in host.loaded_models.remote().result())

    assert loaded() == ["elevation", "scenes"]
    again = client.post("/models/landcover/predict", files={"file": ("c.tif", geotiff_bytes(tmp_path, raw, valid, grid))})
    assert again.status_code == 200
    assert loaded() == ["elevation", "landcover"]


def test_a_multi_sensor_model_answers_from_the_sensors_given(client, scene, bundles):
    """VHR + Landsat 7 land cover, asked with Landsat 7 alone: the absent sensor drops out of the fusion."""
    fused = client.get("/models/fused").json()
    assert [s["name"] for s in fused["sensors"]] == ["vhr_rgbn", "landsat7_etm"]
    raw, valid, _ = chip(scene, 60, 200)
    direct = Direct(bundles["fused"])  # calls the model with Landsat 7 only
    x, ok = direct.normalise(raw, valid)
    probs = direct(x[None], ok[None])[0]
    ints = np.where(valid, raw, 0).astype(np.uint8)
    npy = {"content-type": "application/x-npy"}
    names = ",".join(f"landsat7_etm:{b}" for b in L7)
    r = client.post("/models/fused/predict", params={"format": "geotiff", "bands": names}, content=npy_bytes(ints),
                    headers=npy)
    assert r.status_code == 200, r.text
    with rasterio.MemoryFile(r.content) as mem, mem.open() as ds:
        labels = ds.read(1)
    sure = margin_ok(probs) & ok
    assert sure.mean() > 0.9
    np.testing.assert_array_equal(labels[sure], probs.argmax(0)[sure])

    part = client.post("/models/fused/predict", params={"bands": "R,G,B"}, content=npy_bytes(ints[:3]), headers=npy)
    assert part.status_code == 422 and "for vhr_rgbn; missing NIR" in part.json()["error"]
    none = client.post("/models/fused/predict", params={"bands": "X,Y"}, content=npy_bytes(ints[:2]), headers=npy)
    assert none.status_code == 422 and "at least one of its sensors" in none.json()["error"]


def test_windows_carrying_different_sensors_batch_together(bundles, scene):
    """One batch mixing an image with both sensors and one with Landsat 7 only (as ``@serve.batch`` may)."""
    from earthray.serve.predictor import Predictor, prepare

    predictor = Predictor.load("fused", bundles["fused"], device="cpu")
    raw, valid, _ = chip(scene, 60, 200, 40, 40)
    ints = np.where(valid, raw, 0).astype(np.uint8)
    vhr = np.random.default_rng(0).integers(1, 255, (4, 40, 40), dtype=np.uint8)
    l7_info, l7_order = predictor.info.select([f"landsat7_etm:{b}" for b in L7], 6)
    assert [s.name for s in l7_info.sensors] == ["landsat7_etm"] and l7_order == list(range(6))
    both_info, order = predictor.info.select(["R", "G", "B", "NIR"] + [f"landsat7_etm:{b}" for b in L7], 10)
    assert both_info is predictor.info
    l7_only = prepare(l7_info, ints)
    both = prepare(both_info, np.concatenate([vhr, ints])[order])
    mixed = predictor.predict([both, l7_only])
    alone = predictor.predict([both]) + predictor.predict([l7_only])
    for m, a in zip(mixed, alone):
        np.testing.assert_allclose(m, a, atol=1e-5)
    assert not np.allclose(mixed[0], mixed[1], atol=1e-3)  # the VHR bands did change the answer


def bad_requests(scene, tmp_path):
    raw, valid, grid = chip(scene, 120, 40)
    ints = np.where(valid, raw, 0).astype(np.uint8)
    nan_json = json.dumps({"array": np.where(valid, raw, np.nan).tolist(), "bands": L7})  # NaN tokens
    return [
        ("wrong band count", "landcover", {"content": npy_bytes(ints[:5])}, 422, "takes 6 bands"),
        ("wrong band names", "landcover", {"content": npy_bytes(ints), "params": {"bands": "B1,B2,B3,B4,B5,B6"}},
         422, "missing B7"),
        ("ambiguous names count", "landcover", {"content": npy_bytes(ints), "params": {"bands": "B1,B2"}},
         422, "2 band names given"),
        ("complex dtype", "landcover", {"content": npy_bytes(ints.astype(np.complex64))}, 422, "integers or floats"),
        ("strings in JSON", "scenes", {"json": {"array": [[["a"] * SIZE] * SIZE] * 6}}, 422, "integers or floats"),
        ("reflectance, not DN", "landcover", {"content": npy_bytes(ints / 255.0)}, 422, "do not fit"),
        ("NaN not declared", "landcover", {"content": nan_json, "headers": {"content-type": "application/json"}},
         422, "NaN"),
        ("nulls", "landcover", {"json": {"array": [[[None] * SIZE] * SIZE] * 6}}, 422, "numbers"),
        ("all NaN, declared", "landcover", {"content": json.dumps({"array": np.full((6, SIZE, SIZE), np.nan).tolist(),
                                                                   "nodata": "nan"}),
                                            "headers": {"content-type": "application/json"}}, 422, "no valid pixel"),
        ("all nodata", "landcover", {"content": npy_bytes(np.zeros((6, SIZE, SIZE), np.uint8))}, 422,
         "no valid pixel"),
        ("too many pixels", "landcover", {"content": npy_bytes(np.ones((6, 256, 256), np.uint8))}, 413, "exceeds"),
        ("body too large", "landcover", {"content": b"\x00" * (3 * 2**20)}, 413, "exceeds the limit"),
        ("not an image", "landcover", {"content": b"GIF89a not really an image at all"}, 415, "not an image"),
        ("broken GeoTIFF", "landcover", {"content": b"II*\x00" + os.urandom(400)}, 415, "not a readable GeoTIFF"),
        ("unknown model", "nosuch", {"content": npy_bytes(ints)}, 404, "unknown model 'nosuch'"),
        ("too small", "landcover", {"content": npy_bytes(ints[:, :16, :16])}, 422, "at least 32x32"),
        ("classifier wants a chip", "scenes", {"content": npy_bytes(np.ones((6, 48, 48), np.uint8))}, 422,
         "classifies 32x32 chips"),
        ("classifier, geotiff answer", "scenes", {"content": npy_bytes(ints), "params": {"format": "geotiff"}}, 422,
         "answers JSON only"),
        ("bad format", "landcover", {"content": npy_bytes(ints), "params": {"format": "png"}}, 422, "format"),
        ("malformed JSON", "landcover", {"content": b"{not json", "headers": {"content-type": "application/json"}},
         400, "invalid JSON"),
        ("two payloads", "landcover", {"json": {"array": [1], "npy": "AAAA"}}, 422, "exactly one"),
        ("ragged array", "landcover", {"json": {"array": [[[1, 2], [3]]]}}, 422, "rectangular"),
        ("unknown JSON field", "landcover", {"json": {"arrays": [1]}}, 422, "arrays"),
        ("multipart without file", "landcover", {"files": {"other": ("x.bin", b"123")}}, 422, "'file' part"),
        ("empty body", "landcover", {"content": b""}, 400, "empty"),
        ("bad nodata", "landcover", {"content": npy_bytes(ints), "params": {"nodata": "none"}}, 422, "nodata"),
        ("geotiff with unknown band names", "landcover",
         {"content": geotiff_bytes(tmp_path, raw, valid, grid, names=[f"b{i}" for i in range(6)])}, 422, "missing"),
    ]


def test_bad_requests_get_4xx_naming_the_problem(client, scene, tmp_path):
    for label, model, kwargs, status, message in bad_requests(scene, tmp_path):
        r = client.post(f"/models/{model}/predict", **kwargs)
        assert r.status_code == status, (label, r.status_code, r.text)
        assert message in r.json()["error"], (label, r.json())


def test_bearer_token_is_required(server, scene):
    raw, valid, _ = chip(scene, 120, 200)
    body = npy_bytes(np.where(valid, raw, 0).astype(np.uint8))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.post(f"{server}/models/landcover/predict", content=body, headers=headers, timeout=60)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{server}/models", headers=headers).status_code == 401


def test_overload_answers_503_with_retry_after(server, scene):
    """The 'tight' app: one request in the model at a time, one queued; a flood gets 503s, not collapse."""
    data, valid, _ = scene
    body = npy_bytes(np.where(valid, data, 0)[:, :256, :256].astype(np.uint8))  # 121 windows per request

    def post(_):
        return httpx.post(f"{server}/tight/models/landcover/predict", content=body, timeout=300)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, range(12)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    for r in answers:
        if r.status_code == 503:  # from the gateway (JSON) or, when the gateway's own queue is full, Serve's proxy
            assert r.headers["retry-after"] == "3"
            assert "overloaded" in r.text or "backpressure" in r.text, r.text


def test_serve_config_files_are_valid(bundles):
    from earthray.config import ConfigError
    from earthray.serve.app import load_serve_config

    config = load_serve_config(ROOT / "serve" / "landcover.yaml", port=18123)
    app = config.applications[0]
    assert app.import_path == "earthray.serve.app:build_app" and config.http_options.port == 18123
    assert app.args["models"] == {"landcover": "models:/landcover@champion"}
    assert app.args["tracking_uri"] == f"sqlite:///{(ROOT / 'work' / 'mlflow.db').resolve()}"
    assert {d.name for d in app.deployments} == {"Gateway", "ModelServer"}
    bad = Path(bundles["segmentation"]).parent / "bad.yaml"
    bad.write_text("applications:\n- name: x\n  import_path: earthray.serve.app:build_app\n"
                   "  args: {models: {landcover: /x}, max_batch_size: 8, max_ongoing_requests: 2}\n")
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        load_serve_config(bad)


def test_earthray_serve_command_runs_a_config_file(bundles, scene, tmp_path):
    """``earthray serve CONFIG --port`` in its own process (its own local Ray); Ctrl-C stops it."""
    config = tmp_path / "serve.yaml"
    config.write_text(f"""
applications:
  - name: earthray
    route_prefix: /
    import_path: earthray.serve.app:build_app
    args:
      models: {{scenes: {bundles['classification'].name}}}
    deployments:
      - name: ModelServer
        num_replicas: 1
        ray_actor_options: {{num_cpus: 0.25}}
      - name: Gateway
        num_replicas: 1
        ray_actor_options: {{num_cpus: 0.1}}
""")
    os.symlink(bundles["classification"], tmp_path / bundles["classification"].name)  # relative to the config
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    earthray = Path(sys.executable).parent / "earthray"
    proc = subprocess.Popen([str(earthray), "serve", str(config), "--port", str(port), "--address", "local"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(2)
        raw, valid, _ = chip(scene, 200, 300)
        r = httpx.post(f"http://127.0.0.1:{port}/models/scenes/predict", timeout=120,
                       content=npy_bytes(np.where(valid, raw, 0).astype(np.uint8)))
        assert r.status_code == 200 and set(r.json()["scores"]) == set(CLASSES)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "on http://" in out and "shutting down" in out
