"""`earthray submit`'s path rules on ingest specs with several label layers (no cluster needed)."""

from pathlib import Path

import pytest
import yaml

from earthray.config import ConfigError
from earthray.jobs.kinds import check_spec


def _ingest(repo: Path, label) -> Path:
    spec = repo / "jobs" / "ingest-x.yaml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(yaml.safe_dump({"name": "x", "output": "/mnt/shared/x", "inputs": [
        {"name": "a", "sensors": {"s2_l2a": {"path": "scene.tif"}}, "label": label}]}))
    return spec


@pytest.mark.parametrize("key", ["path", "scene"])
def test_every_label_layer_path_is_checked(tmp_path, key):
    repo = tmp_path / "repo"
    inside = {"name": "cover", "path": "cover.tif", "classes": ["a", "b"]}
    outside = {"name": "crop", key: "../../elsewhere/crop.tif" if key == "path" else "../../elsewhere/labels.json",
               "classes": ["a", "b"]}
    with pytest.raises(ConfigError, match=rf"inputs\.0\.label\.1\.{key}: '\.\./\.\./elsewhere/.*' is relative and it "
                                          r"resolves to .*, outside the working dir"):
        check_spec(_ingest(repo, [inside, outside]), repo.resolve())
    with pytest.raises(ConfigError, match=rf"inputs\.0\.label\.{key}: .* outside the working dir"):
        check_spec(_ingest(repo, outside), repo.resolve())
    assert check_spec(_ingest(repo, [inside]), repo.resolve()) == "ingest"
