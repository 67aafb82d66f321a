"""Ray Serve online inference: real HTTP against a running local Serve app on the session's Ray.

Four fine-tuned bundles (random weights: answers are compared with direct ``TaskModel.predict`` calls on
the same input, normalised here independently of earthray's code), one loaded from the MLflow registry
(``models:/landcover@champion``), multiplexed on one model host that holds at most two at a time;
real Landsat 7 imagery; every kind of bad request (each a 4xx, the server alive after it); bearer-token
auth on the models and the docs; and the limits that keep the service up: overload shed with 503 +
Retry-After within ``max_wait_s``, slow bodies timed out (408) while /healthz answers, bodies and
decoded inputs bounded while they stream in. ``earthray serve`` itself is in ``test_serve_cli.py``.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio
import torch

from earthray.bundle import load_bundle
from earthray.io import Grid, write_raster
from earthray.io.write import CLASS_COLOURS
from earthray.tasks import TaskModel
from serve_helpers import (
    CLASSES,
    L7,
    ROOT,
    SIZE,
    chip,
    closed_by_server,
    geotiff_bytes,
    landsat_scene,
    make_bundle,
    npy_bytes,
    open_request,
    read_response,
    scene_stats,
    tamper,
)

TOKEN = "s3cret-token"
TIGHT_WAIT_S = 4.0
"""max_wait_s of the 'tight' app: no answer, 200 or 503, may take longer (plus SLACK_S for decoding)."""
SLACK_S = 15.0
SLOW_BODY_S = 2.0
"""body_timeout_s of the 'tight' app."""


def serve_on_a_free_port(deploy, routes: dict[str, str], tries: int = 5) -> int:
    """Serve's HTTP proxy on a loopback port the kernel picks (a bind to port 0), with ``deploy()``'s apps.

    The port is free when picked but nobody holds it until the proxy binds it; when something takes it
    first (the proxy then fails to bind, and whatever answers there is not it), Serve starts again on
    another port. The proxy is taken to be up once ``/-/routes`` lists exactly ``routes``."""
    from ray import serve

    for _ in range(tries):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy()
        if _serves_routes(port, routes, timeout=90):
            return port
        serve.shutdown()
    raise RuntimeError(f"Serve's proxy did not come up on a free port in {tries} tries")


def _serves_routes(port: int, routes: dict[str, str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/-/routes", timeout=5)
            if r.status_code == 200 and r.json() == routes:
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    return False


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
    stats = scene_stats(scene)
    root = tmp_path_factory.mktemp("bundles")
    made = {task: make_bundle(root / task, task, stats, seed)
            for seed, task in enumerate(["segmentation", "classification", "regression", "fused"])}
    made["fragile"] = Path(shutil.copytree(made["classification"], root / "fragile"))
    return made


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory, bundles):
    from earthray.registry import register_bundle
    from earthray.tracking import open_run

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id = open_run(uri, "serve-tests", "landcover", {}, root / "artifacts")
    register_bundle(bundles["segmentation"], "landcover", tracking_uri=uri, run_id=run_id, aliases=["champion"])
    return uri


@pytest.fixture(scope="module")
def server(ray_session, bundles, registry_uri):
    """Two apps on one proxy: 'earthray' (four models and a fragile one, bearer token) and 'tight' (one request
    in the model at a time, short waits, a short body timeout, few uploads, little memory)."""
    from ray import serve

    from earthray.serve.app import build_app

    models = {"landcover": "models:/landcover@champion", "scenes": str(bundles["classification"]),
              "elevation": str(bundles["regression"]), "fused": str(bundles["fused"]),
              "fragile": str(bundles["fragile"])}

    def deploy():
        serve.run(build_app({"models": models, "tracking_uri": registry_uri, "max_models_per_replica": 2,
                             "max_batch_size": 4, "max_pixels": 200 * 200, "max_request_bytes": 2 * 2**20,
                             "auth_token": TOKEN}), name="earthray", route_prefix="/")
        serve.run(build_app({"models": {"landcover": str(bundles["segmentation"])}, "max_batch_size": 1,
                             "max_ongoing_requests": 1, "max_queued_requests": 8, "retry_after_s": 3,
                             "max_wait_s": TIGHT_WAIT_S, "max_pixels": 512 * 512, "body_timeout_s": SLOW_BODY_S,
                             "max_uploads": 4, "max_requests": 8, "max_decoded_bytes": 8 * 2**20,
                             "max_inflight_bytes": 40 * 2**20}), name="tight", route_prefix="/tight")

    port = serve_on_a_free_port(deploy, {"/": "earthray", "/tight": "tight"})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=180) as c:
        yield c


def margin_ok(probs: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Pixels whose top class leads the second by more than ``eps`` (a different batch may flip near-ties)."""
    top2 = np.sort(probs, axis=0)[-2:]
    return top2[1] - top2[0] > eps


def test_health_readiness_models_and_openapi(client, server, bundles):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}  # no token needed for probes
    ready = httpx.get(f"{server}/ready", timeout=60)
    assert ready.status_code == 200 and ready.json() == {"ready": True}  # no model names without the token
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"landcover", "scenes", "elevation", "fused", "fragile"}
    assert models["landcover"]["task"] == "segmentation" and models["landcover"]["bands"] == L7
    assert models["landcover"]["source"] == "models:/landcover/1"  # the alias pinned to its version
    assert models["scenes"]["source"].startswith("sha256:")  # a folder: its weights' digest, not a server path
    assert models["scenes"]["source"] == models["fragile"]["source"]  # the same weights
    assert not any(str(p) in json.dumps(models) for p in bundles.values())
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
    assert "/openapi.json" in client.get("/docs").text
    for path in ("/openapi.json", "/docs", "/models"):  # with a token set, the docs need it too
        assert httpx.get(f"{server}{path}").status_code == 401, path
    tight_docs = httpx.get(f"{server}/tight/docs")  # an app without a token: open docs, under its prefix
    assert tight_docs.status_code == 200 and "/tight/openapi.json" in tight_docs.text
    assert httpx.get(f"{server}/tight/openapi.json").json()["info"]["title"] == "earthray"


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
        colours = ds.colormap(1)  # a colour table: GIS tools draw the map paletted, with a legend
        labels = ds.read(1)
    assert [colours[i][:3] for i in range(len(CLASSES))] == [tuple(c) for c in CLASS_COLOURS[:len(CLASSES)]]
    assert colours[255][3] == 0  # nodata is transparent
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
    from earthray.serve.inputs import prepare
    from earthray.serve.predictor import Predictor

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


def npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    """A .npy header alone: what a client claims, without the bytes it claims."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def bad_requests(scene, tmp_path):
    raw, valid, grid = chip(scene, 120, 40)
    ints = np.where(valid, raw, 0).astype(np.uint8)
    nan_json = json.dumps({"array": np.where(valid, raw, np.nan).tolist(), "bands": L7})  # NaN tokens
    huge = npy_header((1_000_000, 100, 100), "<f8") + bytes(64)  # declares 74.5 GiB
    npy = {"content-type": "application/x-npy"}
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
        ("body too large", "landcover", {"content": b"\x00" * (3 * 2**20)}, 413, "the limit is 2097152 bytes"),
        (".npy declaring 74 GiB", "landcover", {"content": huge, "headers": npy}, 413, "max_decoded_bytes"),
        (".npy declaring 74 GiB, in JSON", "landcover", {"json": {"npy": base64.b64encode(huge).decode()}}, 413,
         "max_decoded_bytes"),
        (".npy declaring more than it holds", "landcover",
         {"content": npy_header((6, SIZE, SIZE), "|u1") + bytes(100), "headers": npy}, 422, "100 bytes follow"),
        (".npy of Python objects", "landcover",
         {"content": npy_header((6, SIZE, SIZE), "|O") + bytes(64), "headers": npy}, 422, "integers or floats"),
        (".npy with a negative dimension", "landcover",
         {"content": npy_header((-6, SIZE, SIZE), "|u1") + bytes(64), "headers": npy}, 422, "at least 1"),
        ("JSON integer of 5000 digits", "landcover",
         {"content": b'{"array": [[[' + b"9" * 5000 + b"]]]}", "headers": {"content-type": "application/json"}},
         400, "too long"),
        (".npy with a broken header", "landcover", {"content": b"\x93NUMPY\x01\x00\x10\x00{'descr': nonsense}"},
         422, "header is malformed"),
        ("JSON nested 100 000 deep", "landcover",
         {"content": b'{"array": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
          "headers": {"content-type": "application/json"}}, 400, "nested too deeply"),
        ("not an image", "landcover", {"content": b"GIF89a not really an image at all"}, 415, "not an image"),
        ("broken GeoTIFF", "landcover", {"content": b"II*\x00" + np.random.default_rng(1).bytes(400)}, 415, "not a readable GeoTIFF"),
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
        ("bad base64", "landcover", {"json": {"geotiff": "not base64!"}}, 422, "not valid base64"),
        ("multipart without file", "landcover", {"files": {"other": ("x.bin", b"123")}}, 422, "'file' part"),
        ("malformed multipart", "landcover", {"content": b"--x\r\nbroken", "headers": {
            "content-type": "multipart/form-data; boundary=x"}}, 422, "'file' part"),
        ("empty body", "landcover", {"content": b""}, 400, "empty"),
        ("bad nodata", "landcover", {"content": npy_bytes(ints), "params": {"nodata": "none"}}, 422, "nodata"),
        ("geotiff with unknown band names", "landcover",
         {"content": geotiff_bytes(tmp_path, raw, valid, grid, names=[f"b{i}" for i in range(6)])}, 422, "missing"),
    ]


def test_bad_requests_get_4xx_naming_the_problem(client, scene, tmp_path):
    """Each malformed request gets its documented 4xx with a JSON message about the input (never a server
    path or an object's repr), and the server answers /healthz after each."""
    for label, model, kwargs, status, message in bad_requests(scene, tmp_path):
        r = client.post(f"/models/{model}/predict", **kwargs)
        assert r.status_code == status, (label, r.status_code, r.text)
        error = r.json()["error"]
        assert message in error, (label, error)
        assert "/vsimem" not in error and " at 0x" not in error and "Traceback" not in error, (label, error)
        assert client.get("/healthz").status_code == 200, label


def test_a_body_of_unknown_length_is_refused_at_once(server):
    """A chunked upload (no Content-Length) that would go on for 600 MiB gets 411 as soon as its headers
    arrive, and the connection is closed: Serve's proxy would otherwise buffer all of it in memory."""
    port = int(server.rsplit(":", 1)[1])
    sock = open_request(port, "/models/landcover/predict", {"Authorization": f"Bearer {TOKEN}",
                                                            "Transfer-Encoding": "chunked",
                                                            "Content-Type": "application/x-npy"})
    chunk = np.random.default_rng(2).bytes(2**20)
    sent = 0
    try:
        while sent < 600 * 2**20:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
    except OSError:  # the server answered and closed while we were still sending
        pass
    status, headers, body = read_response(sock, timeout=60)
    assert status == 411 and "Content-Length" in json.loads(body)["error"]
    assert headers.get("connection") == "close" and closed_by_server(sock, 10)
    assert sent < 600 * 2**20  # refused long before the upload could finish
    sock.close()
    print(f"\n411 after {sent / 2**20:.0f} MiB of a 600 MiB chunked upload had been sent")


def test_slow_bodies_time_out_and_probes_still_answer(server):
    """The 'tight' app (body_timeout_s 2, max_uploads 4, max_requests 8): ten clients send headers and 4 body
    bytes, then stall. Four hold the upload slots until 408; the other six get 503 + Retry-After at once;
    meanwhile /healthz and /ready answer."""
    port = int(server.rsplit(":", 1)[1])
    started = time.monotonic()
    socks = [open_request(port, "/tight/models/landcover/predict",
                          {"Content-Length": "100000", "Content-Type": "application/x-npy"}, b"\x93NUM")
             for _ in range(10)]
    for path in ("/tight/healthz", "/tight/ready", "/healthz", "/ready"):
        assert httpx.get(f"{server}{path}", timeout=10).status_code == 200, path
    probes_done = time.monotonic() - started

    def answer(sock):
        status, headers, body = read_response(sock, timeout=SLOW_BODY_S + SLACK_S)
        return status, headers, body.decode(errors="replace"), time.monotonic() - started

    with ThreadPoolExecutor(len(socks)) as pool:
        answers = list(pool.map(answer, socks))
    timed_out = [a for a in answers if a[0] == 408]
    shed = [a for a in answers if a[0] == 503]
    assert len(timed_out) == 4 and len(shed) == 6, [a[:1] + a[2:] for a in answers]
    assert all(json.loads(a[2])["error"] for a in answers)  # JSON from the gateway, none from Serve's proxy
    for _, headers, error, at in timed_out:
        assert "did not arrive within 2 s" in error and SLOW_BODY_S <= at <= SLOW_BODY_S + SLACK_S
        assert headers.get("connection") == "close"
    for _, headers, error, at in shed:
        assert headers["retry-after"] == "3" and ("still sending their body" in error or "predictions" in error)
        assert at < SLOW_BODY_S  # at once, not after the others' timeout
    assert all(closed_by_server(sock, 10) for sock in socks)
    assert probes_done < SLOW_BODY_S  # the probes were answered while every upload slot was held
    assert httpx.get(f"{server}/tight/healthz", timeout=10).status_code == 200
    for sock in socks:
        sock.close()
    print(f"\n408 after {min(a[3] for a in timed_out):.2f}-{max(a[3] for a in timed_out):.2f} s "
          f"(body_timeout_s {SLOW_BODY_S}); 503 after at most {max(a[3] for a in shed):.2f} s; "
          f"probes answered within {probes_done:.2f} s")


def test_decoded_size_and_memory_in_flight_are_bounded(server, scene, tmp_path):
    """The 'tight' app: max_decoded_bytes 8 MiB, max_inflight_bytes 40 MiB. A 6-band float64 GeoTIFF that
    deflates to a few KB but decodes to 12 MiB, and a JSON array that would parse to ~17 MB, get 413 before
    they are decoded; concurrent inputs that fit one by one but not all together get 503 + Retry-After."""
    url = f"{server}/tight/models/landcover/predict"
    _, _, grid = scene
    bomb = write_raster(tmp_path / "bomb.tif", np.ones((6, 512, 512)), Grid(grid.crs, grid.transform, 512, 512),
                        band_names=L7).read_bytes()
    assert len(bomb) < 200_000
    r = httpx.post(url, content=bomb, timeout=60)
    assert r.status_code == 413 and "= 12.0 MiB, more than the limit of 8.0 MiB (max_decoded_bytes)" in r.json()["error"]
    array = {"array": np.ones((6, 300, 300), np.uint8).tolist(), "bands": L7}
    r = httpx.post(url, json=array, timeout=60)
    assert r.status_code == 413 and "would take about" in r.json()["error"]

    data, valid, _ = scene
    body = npy_bytes(np.where(valid, data, 0)[:, :400, :400].astype(np.uint8))  # 1 MiB, ~12 MiB to prepare

    def post(_):
        return httpx.post(url, content=body, timeout=300)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, range(6)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    shed = [r.json()["error"] for r in answers if r.status_code == 503]
    assert any("max_inflight_bytes" in e for e in shed), shed
    assert all(e.startswith("overloaded: ") for e in shed), shed  # this tight app has other limits too
    assert httpx.get(url.replace("/models/landcover/predict", "/healthz")).status_code == 200


def test_bearer_token_is_required(server, scene):
    raw, valid, _ = chip(scene, 120, 200)
    body = npy_bytes(np.where(valid, raw, 0).astype(np.uint8))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.post(f"{server}/models/landcover/predict", content=body, headers=headers, timeout=60)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{server}/models", headers=headers).status_code == 401


def test_overload_is_shed_with_503_and_answers_come_within_max_wait(server, scene):
    """The 'tight' app: one request in the model at a time, at most 8 in the gateway, max_wait_s 4. A flood
    of 24 gets 200s and 503s with Retry-After; no answer of either kind takes longer than max_wait_s (plus
    decoding)."""
    data, valid, _ = scene
    body = npy_bytes(np.where(valid, data, 0)[:, :256, :256].astype(np.uint8))  # 121 windows per request
    url = f"{server}/tight/models/landcover/predict"
    deadline = time.monotonic() + 120
    while httpx.post(url, content=body, timeout=60).status_code != 200:  # the model loaded before the flood
        assert time.monotonic() < deadline

    def post(_):
        started = time.monotonic()
        r = httpx.post(url, content=body, timeout=300)
        return r, time.monotonic() - started

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(post, range(24)))
    codes = [r.status_code for r, _ in answers]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    for r, _ in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "3", r.headers
            assert "overloaded" in r.text, (r.text, r.headers)
    latencies = sorted(t for _, t in answers)
    answered = sorted(t for r, t in answers if r.status_code == 200)
    assert latencies[-1] <= TIGHT_WAIT_S + SLACK_S, latencies
    p99 = answered[min(len(answered) - 1, int(0.99 * len(answered)))]
    print(f"\n{codes.count(200)} answered (p50 {answered[len(answered) // 2]:.2f} s, p99 {p99:.2f} s), "
          f"{codes.count(503)} shed; slowest answer of any kind {latencies[-1]:.2f} s (max_wait_s {TIGHT_WAIT_S})")


def test_a_model_whose_weights_break_after_start_is_a_json_503(client, scene, bundles):
    """The gateway verified 'fragile' when it started; corrupted afterwards, the model host refuses to load
    it and the client gets JSON naming the model, not a plain-text 500."""
    tamper(bundles["fragile"])
    raw, valid, _ = chip(scene, 200, 300)
    r = client.post("/models/fragile/predict", content=npy_bytes(np.where(valid, raw, 0).astype(np.uint8)))
    assert r.status_code == 503 and "model 'fragile' is unavailable" in r.json()["error"], r.text
    assert "sha256 mismatch" in r.json()["error"]
    assert str(bundles["fragile"]) not in r.text and "/" not in r.json()["error"], r.text  # no server paths
    assert client.get("/healthz").status_code == 200


def test_a_config_asking_another_port_of_a_running_serve_is_refused(server, bundles, tmp_path):
    """Serve's HTTP options are fixed while it runs (Ray only logs that new ones are ignored): deploying a
    config on another port to the cluster where this Serve runs is one line naming both ports, and the
    running apps go on answering."""
    from earthray.config import ConfigError
    from earthray.serve.run import run_config

    running = int(server.rsplit(":", 1)[1])
    path = tmp_path / "other-port.yaml"
    path.write_text("applications:\n- name: other\n  route_prefix: /other\n"
                    "  import_path: earthray.serve.app:build_app\n"
                    f"  args: {{models: {{scenes: {bundles['classification']}}}}}\n")
    with pytest.raises(ConfigError, match=f"Serve already runs on this Ray cluster, on 127.0.0.1:{running}.*"
                                          f"--port {running}"):
        run_config(path, port=running + 1, host="127.0.0.1", block=False, on_status=lambda s: None)
    assert httpx.get(f"{server}/healthz").status_code == 200
    assert httpx.get(f"{server}/-/routes").json() == {"/": "earthray", "/tight": "tight"}


def test_serve_config_files_are_checked(bundles, tmp_path):
    from earthray.config import ConfigError
    from earthray.serve.app import load_serve_config
    from earthray.serve.config import token_sha256

    config = load_serve_config(ROOT / "serve" / "landcover.yaml", port=18123)
    app = config.applications[0]
    assert app.import_path == "earthray.serve.app:build_app" and config.http_options.port == 18123
    assert config.http_options.host == "127.0.0.1"
    assert app.args["models"] == {"landcover": "models:/landcover@champion"}
    assert app.args["tracking_uri"] == f"sqlite:///{(ROOT / 'work' / 'mlflow.db').resolve()}"
    assert {d.name for d in app.deployments} == {"Gateway", "ModelServer"}

    def refused(text: str, match: str) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_serve_config(path)

    app_yaml = "applications:\n- name: x\n  import_path: earthray.serve.app:build_app\n  args: {models: {a: /x}"
    refused(app_yaml + ", max_batch_size: 8, max_ongoing_requests: 2}\n", "max_ongoing_requests")
    refused("http_option: {port: 8123}\n" + app_yaml + "}\n", r"bad\.yaml: \(top level\): unknown key 'http_option'")
    refused("http_options: {prot: 8123}\n" + app_yaml + "}\n", "http_options: unknown key 'prot'")
    refused("http_options: {port: 70000}\n" + app_yaml + "}\n", "70000 is not a TCP port")
    refused(app_yaml + "}\n  route_prefx: /\n", "applications.0: unknown key 'route_prefx'")
    refused(app_yaml + "}\n  deployments: [{name: Gateway, max_ongoing_request: 4}]\n",
            "deployments.0: unknown key 'max_ongoing_request'")
    refused(app_yaml + "}\n  deployments: [{name: Gateway, max_ongoing_requests: 64}]\n",
            r"Gateway max_ongoing_requests \(64\) must exceed args.max_requests \(64\)")
    # a token written in the file never reaches Serve: only its sha256 does
    path = tmp_path / "token.yaml"
    path.write_text(app_yaml + ", auth_token: not-in-any-log}\n")
    hashed = load_serve_config(path)
    assert "not-in-any-log" not in hashed.model_dump_json()
    assert hashed.applications[0].args["auth_token_sha256"] == token_sha256("not-in-any-log")


def test_every_bundle_is_verified_before_serving(bundles, tmp_path):
    """A bundle whose weights fail their sha256 check, or a folder that is not there, is refused with one
    line naming the model: the gateway does this when it starts, ``earthray serve`` before anything starts."""
    from earthray.config import ConfigError
    from earthray.serve.config import parse_args
    from earthray.serve.models import served_models

    copy = Path(shutil.copytree(bundles["classification"], tmp_path / "copy"))
    assert served_models(parse_args({"models": {"ok": str(copy)}}))["ok"].version.startswith("sha256:")
    tamper(copy)
    with pytest.raises(ConfigError, match=r"model 'bad' \(.*copy\): .*model.safetensors sha256 mismatch"):
        served_models(parse_args({"models": {"bad": str(copy)}}))
    with pytest.raises(ConfigError, match=r"model 'gone' \(/nowhere\): /nowhere: not a bundle"):
        served_models(parse_args({"models": {"gone": "/nowhere"}}))
