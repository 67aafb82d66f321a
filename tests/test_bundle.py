"""Model bundles: save -> load round trips for every recipe, integrity checks, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from earthray.bundle import FORMAT_VERSION, Bundle, BundleError, load_bundle, read_meta, save_bundle
from earthray.recipes import base as recipe_base
from earthray.recipes import create_recipe
from earthray.recipes.base import Recipe, RecipeConfig
from earthray.sensors import get_sensor


def _sensors(recipe: str):
    s1 = get_sensor("s1_grd_db").select(["VV"])
    return {
        "ofa": [get_sensor("vhr_rgbn"), s1],
        "msgfm": [get_sensor("vhr_rgb"), get_sensor("dem")],
        "mars": [get_sensor("vhr_rgb"), s1],
        "skysense": [get_sensor("vhr_rgb"), get_sensor("s2_l1c").select(["B02", "B03", "B04", "B08"]), s1],
    }[recipe]


def _batch(recipe: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if recipe == "ofa":
        return {"vhr_rgbn": randn(2, 4, 32, 32), "s1_grd_db": randn(2, 1, 32, 32)}
    if recipe == "msgfm":
        return {"vhr_rgb": randn(2, 3, 64, 64), "dem": randn(2, 1, 64, 64)}
    if recipe == "mars":
        return {"vhr_rgb": randn(2, 3, 64, 64), "s1_grd_db": randn(2, 1, 64, 64)}
    return {
        "vhr_rgb": randn(2, 3, 64, 64),
        "s2_l1c": randn(2, 2, 4, 16, 16),
        "s2_l1c.doy": torch.tensor([[100, 0], [120, 200]]),
        "s2_l1c.tmask": torch.tensor([[True, False], [True, True]]),
        "s1_grd_db": randn(2, 3, 1, 16, 16),
        "s1_grd_db.doy": torch.tensor([[10, 50, 90], [20, 60, 0]]),
        "s1_grd_db.tmask": torch.tensor([[True, True, True], [True, True, False]]),
        "lonlat": torch.tensor([[4.6, 43.5], [-105.6, 40.3]]),
    }


def _norm(sensors, shift: float = 0.0):
    """Distinct, non-round numbers per band, so 'recorded exactly' means something."""
    return {s.name: {"mean": [0.1 * i + shift + 1 / 3 for i in range(len(s.bands))],
                     "std": [1.0 + 0.01 * i + 1 / 7 for i in range(len(s.bands))]} for s in sensors}


def _save(path: Path, model: Recipe, recipe: str, sensors, **kw) -> Path:
    kw.setdefault("normalisation", _norm(sensors))
    return save_bundle(path, model, recipe=recipe, preset="tiny", config=model.config.model_dump(),
                       sensors=sensors, input_size=kw.pop("input_size", 64), **kw)


def _trained_a_little(model: Recipe, batch) -> Recipe:
    """One optimiser step, so the weights differ from a fresh build's (a load that silently
    kept the init would otherwise pass), then the recipe's own end-of-step hook (EMA teachers)."""
    opt = torch.optim.SGD(list(model.trainable_parameters()), lr=0.05)
    torch.manual_seed(1)
    model(batch)["loss"].backward()
    opt.step()
    model.on_step_end(1)
    return model


@pytest.fixture(scope="module")
def ofa_bundle(tmp_path_factory) -> Path:
    sensors = _sensors("ofa")
    torch.manual_seed(0)
    model = create_recipe("ofa", sensors, "tiny")
    return _save(tmp_path_factory.mktemp("b") / "ofa", model, "ofa", sensors, input_size=32,
                 provenance={"run": "unit", "mlflow_run_id": "abc123", "git_sha": "deadbeef"})


@pytest.mark.parametrize("recipe", ["ofa", "msgfm", "mars", "skysense"])
def test_round_trip_every_recipe(tmp_path, recipe):
    sensors, batch = _sensors(recipe), _batch(recipe)
    torch.manual_seed(0)
    model = _trained_a_little(create_recipe(recipe, sensors, "tiny"), batch)
    _save(tmp_path / recipe, model, recipe, sensors)

    torch.manual_seed(123)  # a different init: only the loaded weights can make the outputs agree
    loaded = load_bundle(tmp_path / recipe)
    assert isinstance(loaded, Bundle) and type(loaded.model) is type(model)
    assert loaded.model.config == model.config
    assert loaded.head is None

    # Every tensor of the state dict, teachers' buffers included, came back bit for bit.
    want, got = model.state_dict(), loaded.model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]

    model.eval()
    with torch.no_grad():
        a, b = model.encode(batch), loaded.model.encode(batch)
    assert a.keys() == b.keys() and a
    for k in a:
        assert len(a[k]) == len(b[k])
        for x, y in zip(a[k], b[k]):
            assert torch.equal(x, y), k

    # The training loss (masking, teachers, cross-sensor draws) under the same seed.
    model.train(), loaded.model.train()
    with torch.no_grad():
        torch.manual_seed(7)
        la = model(batch)
        torch.manual_seed(7)
        lb = loaded.model(batch)
    assert la.keys() == lb.keys()
    for k in la:
        assert torch.equal(la[k], lb[k]), k


def test_config_round_trips_through_json(tmp_path):
    """Tuple fields come back as lists in JSON; the rebuilt config equals the original."""
    sensors = _sensors("mars")
    model = create_recipe("mars", sensors, "tiny", cgcl_weights=(0.6, 0.25, 0.15))
    _save(tmp_path / "m", model, "mars", sensors)
    meta = read_meta(tmp_path / "m")
    assert meta["config"]["cgcl_weights"] == [0.6, 0.25, 0.15]
    assert meta["config"]["depths"] == [1, 1, 1]
    assert load_bundle(tmp_path / "m").model.config == model.config


def test_bundle_json_records_sensors_normalisation_and_provenance(ofa_bundle):
    raw = (ofa_bundle / "bundle.json").read_bytes()
    text = raw.decode("utf-8")  # plain UTF-8 text ...
    assert all(c.isprintable() or c in "\n\t" for c in text)  # ... with no binary bytes
    assert b"\x80\x04" not in raw and b"\x80\x05" not in raw  # no pickle protocol header
    meta = json.loads(text)
    assert meta["format_version"] == FORMAT_VERSION
    assert (meta["recipe"], meta["preset"], meta["input_size"]) == ("ofa", "tiny", 32)

    sensors = _sensors("ofa")
    assert [s["name"] for s in meta["sensors"]] == ["vhr_rgbn", "s1_grd_db"]
    assert [[b["name"] for b in s["bands"]] for s in meta["sensors"]] == [["R", "G", "B", "NIR"], ["VV"]]
    assert meta["sensors"] == [json.loads(json.dumps(s.model_dump())) for s in sensors]
    assert meta["normalisation"] == _norm(sensors)  # exact floats, no rounding

    assert set(meta["weights"]) == {"model.safetensors"}
    assert len(meta["weights"]["model.safetensors"]["sha256"]) == 64
    prov = meta["provenance"]
    assert (prov["run"], prov["mlflow_run_id"], prov["git_sha"]) == ("unit", "abc123", "deadbeef")
    assert "created" in prov
    assert sorted(p.name for p in ofa_bundle.iterdir()) == ["bundle.json", "model.safetensors"]

    loaded = load_bundle(ofa_bundle)
    assert [s.band_names for s in loaded.sensors] == [s.band_names for s in sensors]
    assert loaded.sensors == sensors
    assert loaded.normalisation == _norm(sensors)


def test_tampered_weights_are_rejected(tmp_path, ofa_bundle):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ofa_bundle, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256") as err:
        load_bundle(bad)
    assert str(bad) in str(err.value) and "model.safetensors" in str(err.value)

    weights.unlink()
    with pytest.raises(BundleError, match="missing") as err:
        load_bundle(bad)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_unknown_format_version_is_rejected(tmp_path, ofa_bundle, version):
    import shutil

    bad = tmp_path / "v"
    shutil.copytree(ofa_bundle, bad)
    meta = json.loads((bad / "bundle.json").read_text())
    meta["format_version"] = version
    (bad / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format_version") as err:
        load_bundle(bad)
    assert str(bad) in str(err.value)


def test_malformed_json_and_bad_weight_names_are_rejected(tmp_path, ofa_bundle):
    import shutil

    bad = tmp_path / "j"
    shutil.copytree(ofa_bundle, bad)
    meta_text = (bad / "bundle.json").read_text()
    (bad / "bundle.json").write_text(meta_text[: len(meta_text) // 2])
    with pytest.raises(BundleError, match="not valid JSON") as err:
        load_bundle(bad)
    assert str(bad) in str(err.value)
    assert issubclass(BundleError, ValueError)

    meta = json.loads(meta_text)
    meta["weights"]["../escape.safetensors"] = {"sha256": "0" * 64}
    (bad / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="bad weight file name"):
        load_bundle(bad)

    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(tmp_path / "nowhere")


def test_crash_mid_save_keeps_the_previous_bundle(tmp_path, ofa_bundle):
    import shutil

    target = tmp_path / "keep"
    shutil.copytree(ofa_bundle, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    sensors = _sensors("ofa")
    model = create_recipe("ofa", sensors, "tiny")

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    model.state_dict = explode
    with pytest.raises(RuntimeError, match="disk on fire"):
        _save(target, model, "ofa", sensors, input_size=32)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no temp dirs left behind
    load_bundle(target)

    # A fresh path: nothing at all appears.
    with pytest.raises(RuntimeError, match="disk on fire"):
        _save(tmp_path / "fresh", model, "ofa", sensors, input_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_overwrite_replaces_the_bundle_and_refuses_other_directories(tmp_path):
    sensors = _sensors("ofa")
    first = create_recipe("ofa", sensors, "tiny")
    _save(tmp_path / "b", first, "ofa", sensors, input_size=32, provenance={"run": "one"})
    torch.manual_seed(5)
    second = create_recipe("ofa", sensors, "tiny")
    _save(tmp_path / "b", second, "ofa", sensors, input_size=32, provenance={"run": "two"})
    loaded = load_bundle(tmp_path / "b")
    assert loaded.meta["provenance"]["run"] == "two"
    name = next(iter(second.state_dict()))
    assert torch.equal(loaded.model.state_dict()[name], second.state_dict()[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]

    other = tmp_path / "data"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"data: exists and is not a bundle \(no bundle.json\); refusing"):
        _save(other, first, "ofa", sensors, input_size=32)
    assert (other / "precious.txt").read_text() == "keep me"


def test_head_is_saved_and_loaded_as_a_state_dict(tmp_path):
    sensors = _sensors("ofa")
    model = create_recipe("ofa", sensors, "tiny")
    head = nn.Sequential(nn.Conv2d(48, 16, 1), nn.ReLU(), nn.Conv2d(16, 7, 1))
    spec = {"kind": "segmentation", "in_dim": 48, "num_classes": 7}
    classes = [f"class_{i}" for i in range(1, 8)]
    _save(tmp_path / "h", model, "ofa", sensors, input_size=32, head=head, head_spec=spec, classes=classes)
    loaded = load_bundle(tmp_path / "h")
    assert set(loaded.meta["weights"]) == {"model.safetensors", "head.safetensors"}
    assert loaded.meta["head_spec"] == spec and loaded.classes == classes
    assert loaded.head.keys() == head.state_dict().keys()
    assert all(torch.equal(loaded.head[k], v) for k, v in head.state_dict().items())
    with pytest.raises(ValueError, match="head_spec"):
        _save(tmp_path / "h2", model, "ofa", sensors, input_size=32, head=head)


def test_bad_inputs_fail_before_anything_is_written(tmp_path):
    sensors = _sensors("ofa")
    model = create_recipe("ofa", sensors, "tiny")
    with pytest.raises(ValueError, match="normalisation"):
        _save(tmp_path / "a", model, "ofa", sensors, normalisation={"vhr_rgbn": _norm(sensors)["vhr_rgbn"]})
    with pytest.raises(ValueError, match="bands"):
        bad = _norm(sensors)
        bad["vhr_rgbn"]["std"] = bad["vhr_rgbn"]["std"][:3]
        _save(tmp_path / "a", model, "ofa", sensors, normalisation=bad)
    with pytest.raises(ValueError, match="config"):
        save_bundle(tmp_path / "a", model, recipe="ofa", preset="tiny", config={"depth": 2}, sensors=sensors,
                    normalisation=_norm(sensors), input_size=32)
    with pytest.raises(ValueError, match="sensors"):
        _save(tmp_path / "a", model, "ofa", [get_sensor("vhr_rgb"), sensors[1]],
              normalisation=_norm([get_sensor("vhr_rgb"), sensors[1]]))
    with pytest.raises(ValueError, match="JSON"):
        _save(tmp_path / "a", model, "ofa", sensors, provenance={"when": object()})
    assert list(tmp_path.iterdir()) == []


class _TiedConfig(RecipeConfig):
    dim: int = 8


class _Tied(Recipe):
    """A recipe whose encoder and decoder share one weight (and a buffer aliasing it)."""

    name = "_tied_test"
    Config = _TiedConfig
    presets = {"tiny": {}}

    def __init__(self, config, sensors):
        super().__init__(config, sensors)
        self.enc = nn.Linear(config.dim, config.dim, bias=False)
        self.dec = nn.Linear(config.dim, config.dim, bias=False)
        self.dec.weight = self.enc.weight
        self.register_buffer("table", torch.arange(12.0).reshape(3, 4))
        self.register_buffer("table_t", self.table.t())  # a non-contiguous view of another buffer
        self.register_buffer("nothing", torch.zeros(0))

    def forward(self, batch):
        return {"loss": self.dec(self.enc(batch["x"])).sum()}


def test_shared_and_non_contiguous_tensors(tmp_path, monkeypatch):
    monkeypatch.setitem(recipe_base._REGISTRY, _Tied.name, _Tied)
    sensors = [get_sensor("dem")]
    torch.manual_seed(0)
    model = create_recipe(_Tied.name, sensors, "tiny")
    _save(tmp_path / "t", model, _Tied.name, sensors, input_size=8)
    entry = read_meta(tmp_path / "t")["weights"]["model.safetensors"]
    assert entry["aliases"] == {"dec.weight": "enc.weight"}
    loaded = load_bundle(tmp_path / "t").model
    assert loaded.dec.weight is loaded.enc.weight  # still tied after loading
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
