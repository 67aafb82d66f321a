"""What the Serve tests share: real Landsat 7 chips, tiny fine-tuned bundles, request bodies, raw HTTP.

Raw sockets are for what an HTTP client library will not do: send headers and then stall, or stream a
chunked body that never ends.
"""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import numpy as np
import torch
from rasterio.windows import Window

from earthray.bundle import save_bundle
from earthray.io import Grid, open_scene, write_raster
from earthray.recipes import create_recipe
from earthray.sensors import get_sensor
from earthray.tasks import TaskModel, TaskSpec

ROOT = Path(__file__).resolve().parents[1]
L7 = ["B1", "B2", "B3", "B4", "B5", "B7"]
CLASSES = [f"class_{i}" for i in range(1, 8)]
SIZE = 32


def landsat_scene() -> tuple[np.ndarray, np.ndarray, Grid]:
    """The real Landsat 7 sample as one (6, H, W) float32 stack, its validity per band, its grid."""
    scene = open_scene([str(ROOT / f"data/sample/landsat7_nc/lsat7_2000_{b}.tif") for b in (10, 20, 30, 40, 50, 70)])
    with scene:
        data, valid = scene.read()
        return data, valid, scene.grid


def scene_stats(scene) -> dict[str, list[float]]:
    data, valid, _ = scene
    ok = valid.all(axis=0)
    return {"mean": [float(b[ok].mean()) for b in data], "std": [float(b[ok].std()) for b in data]}


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


def tamper(bundle: Path) -> None:
    """Flip one byte of the weights (the sha256 in bundle.json no longer matches)."""
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


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


def open_request(port: int, path: str, headers: dict[str, str], body: bytes = b"") -> socket.socket:
    """A POST whose headers (and ``body``, possibly less than they declare) are sent; the socket stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "127.0.0.1", **headers}.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
    return sock


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the answer on ``sock`` (waiting at most ``timeout`` seconds)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError(f"closed without an answer: {data[:200]!r}")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    chunked = headers.get("transfer-encoding") == "chunked"
    while (not body.endswith(b"0\r\n\r\n")) if chunked else len(body) < int(headers.get("content-length", 0)):
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(lines[0].split()[1]), headers, _dechunk(body) if chunked else body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        out, data = out + rest[:n], rest[n + 2:]
        if n == 0:
            break
    return out


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``sock`` (after its answer) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False
