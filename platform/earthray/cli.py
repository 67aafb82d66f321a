"""The ``earthray`` command. Thin: it parses arguments, calls the library, and renders results."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from earthray.config import ConfigError

app = typer.Typer(help="Train, tune and serve multi-sensor Earth-observation foundation models on Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
sensors_app = typer.Typer(help="The sensor catalogue.", invoke_without_command=True)
app.add_typer(sensors_app, name="sensors")
console = Console()
err = Console(stderr=True)

EXIT_CONFIG = 2
EXIT_QUARANTINE = 3

SensorsOpt = typer.Option(None, "--sensors", help="extra sensor catalogue YAML (adds or overrides sensors)")


def _fail(message: str, code: int = EXIT_CONFIG) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _catalogue(extra: list[Path] | None):
    from earthray.sensors import load_catalogue

    try:
        return load_catalogue(*(extra or []))
    except ConfigError as e:
        _fail(str(e))


@sensors_app.callback()
def sensors_list(ctx: typer.Context, sensors: list[Path] | None = SensorsOpt) -> None:
    """List the sensors: name, kind, bands, GSD, dtype."""
    if ctx.invoked_subcommand:
        return
    from rich.table import Table

    table = Table(title="sensors")
    for col in ("name", "kind", "bands", "gsd (m)", "dtype", "nodata", "aliases"):
        table.add_column(col, no_wrap=col == "name")
    for s in _catalogue(sensors):
        table.add_row(s.name, s.kind, str(len(s.bands)), f"{s.gsd:g}", s.dtype, str(s.nodata), ", ".join(s.aliases))
    console.print(table)


@sensors_app.command("show")
def sensors_show(name: str, sensors: list[Path] | None = SensorsOpt) -> None:
    """Show one sensor: every band with wavelength/polarisation, GSD and normalisation stats."""
    from rich.table import Table

    cat = _catalogue(sensors)
    try:
        s = cat[name]
    except KeyError as e:
        _fail(str(e.args[0]))
    console.print(f"[bold]{s.name}[/]: {s.description}", highlight=False)
    console.print(f"kind {s.kind}, dtype {s.dtype}, nodata {s.nodata}, transform {s.transform.model_dump()}",
                  highlight=False)
    table = Table()
    for col in ("band", "wavelength (nm)", "polarisation", "gsd (m)", "mean", "std"):
        table.add_column(col)
    for b in s.bands:
        table.add_row(b.name, f"{b.wavelength:g}" if b.wavelength else "", b.polarisation or "", f"{b.gsd:g}",
                      f"{b.mean:g}", f"{b.std:g}")
    console.print(table)


@app.command()
def ingest(
    spec: Path = typer.Argument(..., help="ingest spec YAML"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)"),
    overwrite: bool = typer.Option(False, help="replace shards an earlier, different spec wrote to the output"),
) -> None:
    """Chip scenes into Parquet shards + manifest.json. Exit 3 if any scene was quarantined."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from earthray.data.ingest import ingest as run_ingest
    from earthray.data.manifest import summary_table
    from earthray.data.spec import load_spec

    try:
        ingest_spec = load_spec(spec)
        if address:
            ingest_spec.address = address
        with Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                      TimeElapsedColumn(), console=err, transient=True) as progress:
            bar = progress.add_task("starting", total=None)

            def on_scene(result, done: int, total: int) -> None:
                note = f"{result.chips} chips" if result.status == "done" else "[red]quarantined[/]"
                progress.update(bar, completed=done, total=total, description=f"{Path(result.scene).name}: {note}")

            manifest = run_ingest(ingest_spec, overwrite=overwrite, on_scene=on_scene)
    except ConfigError as e:
        _fail(str(e))
    console.print(summary_table(manifest))
    console.print(f"shards and manifest: {Path(ingest_spec.output) / 'manifest.json'}", highlight=False)
    if manifest["quarantine"]:
        for q in manifest["quarantine"]:
            err.print(f"[yellow]quarantined[/] {q['input']}: {q['reason']}", highlight=False)
        raise typer.Exit(EXIT_QUARANTINE)


@app.command()
def pretrain(
    spec: Path = typer.Argument(..., help="pretraining spec YAML (jobs/pretrain-*.yaml)"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)"),
) -> None:
    """Pretrain a recipe on Ray Train; running the same spec again resumes it."""
    from earthray.train.run import pretrain as run_pretrain
    from earthray.train.spec import load_pretrain_spec

    try:
        pretrain_spec = load_pretrain_spec(spec)
        if address:
            pretrain_spec.address = address
        with err.status(f"pretraining {pretrain_spec.name} ({pretrain_spec.recipe}/{pretrain_spec.preset}, "
                        f"{pretrain_spec.max_steps} steps); worker progress follows"):
            result = run_pretrain(pretrain_spec)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    console.print(f"[bold green]done[/] {result.name}: step {result.metrics.get('step')}", highlight=False)
    console.print(f"bundle: {result.bundle}\ncheckpoint: {result.checkpoint}\n"
                  f"MLflow run {result.run_id} in {result.tracking_uri} "
                  f"(mlflow ui --backend-store-uri {result.tracking_uri})", highlight=False)


@app.command()
def models() -> None:
    """List recipes and their size presets with parameter counts (counted on the meta device)."""
    from rich.table import Table

    from earthray.recipes import count_parameters, get_recipe_class, list_recipes

    table = Table(title="recipes (parameters with each paper's inputs)")
    for col in ("recipe", "preset", "parameters", "paper", "vs paper", "inputs"):
        table.add_column(col, justify="right" if col in ("parameters", "paper", "vs paper") else "left")
    for name in list_recipes():
        cls = get_recipe_class(name)
        for preset in cls.presets:
            total = count_parameters(name, preset=preset)
            paper = cls.paper_params.get(preset)
            shown, vs = f"{total / 1e6:,.1f} M", ""
            if paper:
                comparable = count_parameters(name, preset=preset, comparable=True)
                if comparable != total:
                    shown += f" ({comparable / 1e6:,.1f} M per token)"
                vs = f"{(comparable - paper) / paper:+.1%}"
            table.add_row(name, preset, shown, f"{paper / 1e6:,.0f} M" if paper else "", vs,
                          ", ".join(cls.paper_sensors))
    console.print(table)


@app.command()
def version() -> None:
    """Print the earthray version."""
    from earthray import __version__

    console.print(__version__)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
