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


def test_no_module_but_compat_uses_ray_internals():
    """No private Ray module (``ray._private``, ``ray.train.v2._internal``, ...) nor private attribute of a Ray
    object that earthray is known to have needed (Tune's report queue, Serve's multiplexer) outside compat.py.
    A logger's name is no use of one (quieting a renamed logger fails nothing)."""
    private = re.compile(r"^(?!.*getLogger\().*(\bray(\.\w+)*\._\w|_training_actor_item_queue|__serve_multiplex_wrapper)")
    files = [f for f in sorted(PACKAGE.rglob("*.py")) if f != PACKAGE / "compat.py"]
    assert PACKAGE / "tune" / "sweep.py" in files and PACKAGE / "runtime.py" in files
    offenders = [f"{f.relative_to(PACKAGE)}:{i}" for f in files
                 for i, line in enumerate(f.read_text().splitlines(), 1) if private.search(line)]
    assert not offenders, f"Ray internals outside earthray/compat.py: {offenders}"
