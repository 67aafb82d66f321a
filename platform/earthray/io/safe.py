"""Sentinel-2 SAFE products (zipped or not, L1C or L2A): band files and acquisition time."""

from __future__ import annotations

import os
import re
import zipfile
from datetime import datetime
from pathlib import PurePosixPath

import fsspec

from earthray.io.dates import parse_date

# T55HFA_20201011T000249_B8A.jp2 (L1C) or T55HFA_20201011T000249_B02_10m.jp2 (L2A, several resolutions)
_BAND_FILE = re.compile(r"_(B\d\d|B8A)(?:_(\d+)m)?\.jp2$")
_START = re.compile(r"<PRODUCT_START_TIME>([^<]+)</PRODUCT_START_TIME>")


def is_safe(path: str) -> bool:
    name = path.rstrip("/")
    return name.upper().endswith(".SAFE") or _zip_has_safe(name)


def _zip_has_safe(path: str) -> bool:
    if not path.endswith(".zip"):
        return False
    try:
        return any(".SAFE/" in n for n in _members(path))
    except (OSError, zipfile.BadZipFile):
        return False


def _members(path: str) -> list[str]:
    if path.endswith(".zip"):
        with fsspec.open(path, "rb") as f, zipfile.ZipFile(f) as z:
            return z.namelist()
    fs, root = fsspec.core.url_to_fs(path)
    return [p[len(root.rstrip("/")) + 1:] for p in fs.find(root)]


def _read_member(path: str, member: str) -> str:
    if path.endswith(".zip"):
        with fsspec.open(path, "rb") as f, zipfile.ZipFile(f) as z:
            return z.read(member).decode("utf-8", "replace")
    with fsspec.open(f"{path.rstrip('/')}/{member}", "r") as f:
        return f.read()


def safe_bands(path: str) -> tuple[dict[str, str], datetime | None]:
    """Band name -> GDAL path of its finest-resolution JP2, and the product start time."""
    members = _members(path)
    best: dict[str, tuple[int, str]] = {}
    for m in members:
        match = _BAND_FILE.search(m)
        if match and "/IMG_DATA/" in f"/{m}":
            band, res = match.group(1), int(match.group(2) or 0)
            if band not in best or res < best[band][0]:
                best[band] = (res, m)
    prefix = gdal_path(path.rstrip("/"))
    if path.endswith(".zip"):
        prefix = f"/vsizip/{prefix}"
    bands = {b: f"{prefix}/{m}" for b, (_, m) in sorted(best.items(), key=lambda kv: _band_order(kv[0]))}
    acquired = None
    mtd = next((m for m in members if PurePosixPath(m).name in ("MTD_MSIL1C.xml", "MTD_MSIL2A.xml")), None)
    if mtd:
        found = _START.search(_read_member(path, mtd))
        acquired = parse_date(found.group(1)) if found else None
    return bands, acquired or parse_date(PurePosixPath(path).name)


def _band_order(band: str) -> float:
    return 8.5 if band == "B8A" else float(band[1:])


_VSI = {"s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/", "http": "/vsicurl/http://", "https": "/vsicurl/https://"}


def gdal_path(path: str) -> str:
    """A local path or URI as a GDAL virtual-file path (absolute for local files)."""
    scheme, sep, rest = path.partition("://")
    if not sep:
        return os.path.abspath(path)
    if scheme not in _VSI:
        raise ValueError(f"{path}: unsupported URI scheme {scheme!r} (supported: {', '.join(_VSI)})")
    return _VSI[scheme] + rest
