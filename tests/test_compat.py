"""The Ray internals earthray uses live in earthray/compat.py only, and this Ray still has every one."""

from __future__ import annotations

import re
from pathlib import Path

import ray

from earthray.compat import missing_internals

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "earthray"


def test_compat_fits_this_ray():
    missing = missing_internals()
    assert not missing, (f"Ray {ray.__version__} lacks internals earthray/compat.py uses: {', '.join(missing)}; "
                         "update earthray/compat.py for this Ray")


def test_serving_and_runtime_use_no_ray_internals_directly():
    private = re.compile(r"\bray\.(serve\.)?_private\b|__serve_multiplex_wrapper")
    files = [PACKAGE / "runtime.py", *sorted((PACKAGE / "serve").glob("*.py"))]
    offenders = [f"{f.relative_to(PACKAGE)}:{i}" for f in files
                 for i, line in enumerate(f.read_text().splitlines(), 1) if private.search(line)]
    assert not offenders, f"Ray internals outside earthray/compat.py: {offenders}"
