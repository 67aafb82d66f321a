import re

from typer.testing import CliRunner

from earthray.cli import app
from earthray.recipes import get_recipe_class, list_recipes


def test_models_lists_every_preset_and_paper_sizes_within_ten_percent():
    assert list_recipes() == ["mars", "msgfm", "ofa", "skysense"]
    out = CliRunner().invoke(app, ["models"], terminal_width=250)
    assert out.exit_code == 0, out.output
    rows = [line for line in out.output.splitlines() if line.startswith("│")]
    for name in list_recipes():
        for preset in get_recipe_class(name).presets:
            assert any(f"│ {name} " in r and f"│ {preset} " in r for r in rows), (name, preset)
    deviations = [float(m) for m in re.findall(r"([+-]\d+\.\d)%", out.output)]
    assert len(deviations) == sum(len(get_recipe_class(n).paper_params) for n in list_recipes())
    assert all(abs(d) < 10 for d in deviations)
