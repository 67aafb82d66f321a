"""The one job table: every command's spec class, loader and runner, and every YAML file the repo ships."""

from pathlib import Path

import pytest
import yaml

from earthray.config import ConfigError, InputPath, OutputPath, StrictModel, load_yaml, path_values
from earthray.jobs.kinds import KINDS, check_spec, spec_kind

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*ROOT.glob("jobs/*.yaml"), *ROOT.glob("tune/*.yaml"), *ROOT.glob("serve/*.yaml")])


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_resolves_its_parts(name):
    kind = KINDS[name]
    assert isinstance(kind.spec_class, type)
    assert callable(kind.loader) and callable(kind.runner)
    assert kind.names, "a kind must say which file names it runs"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_spec_is_detected_and_loads(path):
    kind = KINDS[spec_kind(path)]
    if not kind.check_on_submit:  # a sweep reads its data's manifests: checked here without them
        spec = load_yaml(path, kind.spec_class)
    else:
        spec = kind.loader(path)
    assert spec is not None
    # The loader resolved every typed path against the spec's folder.
    if kind.paths is None:
        for where, _, value, _ in path_values(spec):
            assert "://" in value or value.startswith("models:/") or Path(value).is_absolute(), (where, value)


def test_detection_prefers_the_folder_and_names_the_patterns(tmp_path):
    (tmp_path / "tune").mkdir()
    assert spec_kind(tmp_path / "tune" / "pretrain-x.yaml") == "sweep"
    assert spec_kind(tmp_path / "pretrain-x.yaml") == "pretrain"
    assert spec_kind(tmp_path / "sweep-x.yaml") == "sweep"
    with pytest.raises(ConfigError, match=r"cannot tell .*ingest-\*\.yaml -> ingest.*serve/\*\.yaml -> serve"):
        spec_kind(tmp_path / "mystery.yaml")


class _Inner(StrictModel):
    src: InputPath | None = None
    stack: list[InputPath | list[InputPath]] = []
    note: str = "not a path"


class _Spec(StrictModel):
    out: OutputPath = "work"
    uri: OutputPath | None = None
    inner: dict[str, _Inner] = {}


def test_typed_paths_resolve_in_one_place(tmp_path):
    spec_file = tmp_path / "sub" / "x.yaml"
    spec_file.parent.mkdir()
    spec_file.write_text(yaml.safe_dump({"uri": "sqlite:///m.db", "inner": {"a": {
        "src": "s3://bucket/a.tif", "stack": ["b.tif", ["c.tif", "/abs/d.tif"]], "note": "e.tif"}}}))
    raw = load_yaml(spec_file, _Spec, resolve=False)
    assert [(w, r) for w, r, _, _ in path_values(raw)] == [
        ("out", "output"), ("uri", "output"), ("inner.a.src", "input"), ("inner.a.stack.0", "input"),
        ("inner.a.stack.1.0", "input"), ("inner.a.stack.1.1", "input")]
    spec = load_yaml(spec_file, _Spec)
    base = spec_file.parent.resolve()
    assert spec.out == str(base / "work") and spec.uri == f"sqlite:///{base / 'm.db'}"
    inner = spec.inner["a"]
    assert inner.src == "s3://bucket/a.tif" and inner.note == "e.tif"
    assert inner.stack == [str(base / "b.tif"), [str(base / "c.tif"), "/abs/d.tif"]]
    assert raw.inner["a"].stack[0] == "b.tif", "resolving copies; the unresolved spec is untouched"


def test_submit_checks_outputs_from_the_spec_class(tmp_path):
    repo = tmp_path / "repo"
    (repo / "jobs").mkdir(parents=True)
    spec = repo / "jobs" / "infer-x.yaml"
    spec.write_text(yaml.safe_dump({"model": "/mnt/shared/bundle", "scenes": ["/mnt/shared/a.tif"],
                                    "output": "out"}))
    with pytest.raises(ConfigError, match=r"infer-x\.yaml: output: 'out' is relative; a submitted job"):
        check_spec(spec, repo.resolve())
    spec.write_text(yaml.safe_dump({"model": "/mnt/shared/bundle", "scenes": [["a.tif", "../../b.tif"]],
                                    "output": "/mnt/shared/out"}))
    with pytest.raises(ConfigError, match=r"scenes\.0\.1: '\.\./\.\./b\.tif' is relative and it resolves to .*outside"):
        check_spec(spec, repo.resolve())
