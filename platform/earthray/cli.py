"""The ``earthray`` command. Thin: it parses arguments, calls the library, and renders results."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from earthray.errors import EarthrayError

EXIT_CONFIG = 2
EXIT_QUARANTINE = 3
console = Console()
err = Console(stderr=True)


class _ErrorBoundary(typer.core.TyperGroup):
    """The one place user errors become a line on stderr and exit code 2. A user error is an
    ``EarthrayError`` or a missing file the user named; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (EarthrayError, FileNotFoundError) as e:
            _fail(e)


app = typer.Typer(help="Train, tune and serve multi-sensor Earth-observation foundation models on Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=_ErrorBoundary)
sensors_app = typer.Typer(help="The sensor catalogue.", invoke_without_command=True)
app.add_typer(sensors_app, name="sensors")
SensorsOpt = typer.Option(None, "--sensors", help="extra sensor catalogue YAML (adds or overrides sensors)")
VerboseOpt = typer.Option(False, "--verbose", help="also show Ray's own log lines (workers, Ray Train, Ray Data, "
                          "Serve), as EARTHRAY_VERBOSE=1 does; by default they stay in Ray's log files")


def _fail(problem: str | Exception, code: int = EXIT_CONFIG) -> None:
    """Print one error line (never folded, so paths stay whole for copying) and exit."""
    err.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _catalogue(extra: list[Path] | None):
    from earthray.sensors import load_catalogue

    return load_catalogue(*(extra or []))


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

    s = _catalogue(sensors)[name]
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
    verbose: bool = VerboseOpt,
) -> None:
    """Chip scenes into Parquet shards + manifest.json. Exit 3 if any scene was quarantined."""
    from earthray.data.manifest import summary_table
    from earthray.runtime import set_verbose
    from earthray.train.progress import Reporter

    set_verbose(verbose)
    job = _job("ingest")
    ingest_spec = job.loader(spec)
    if address:
        ingest_spec.address = address
    with Reporter(err).task("ingest", "scenes") as bar:

        def on_scene(result, done: int, total: int) -> None:
            note = f"{result.chips} chips" if result.status == "done" else "quarantined"
            bar.update(done, total, f"{Path(result.scene).name}: {note}")

        manifest = job.runner(ingest_spec, overwrite=overwrite, on_scene=on_scene)
    console.print(summary_table(manifest))
    console.print(f"shards and manifest: {Path(ingest_spec.output) / 'manifest.json'}", highlight=False,
                  soft_wrap=True)
    if manifest["quarantine"]:
        for q in manifest["quarantine"]:
            err.print(f"[yellow]quarantined[/] {q['input']}: {q['reason']}", highlight=False)
        raise typer.Exit(EXIT_QUARANTINE)


def _job(name: str):
    """The command's entry in the one job table (its spec loader and run function)."""
    from earthray.jobs.kinds import KINDS

    return KINDS[name]


def _train(name: str, spec: Path, address: str | None, verbose: bool, describe):
    """Load a training spec, point it at ``address``, and run it with the workers' progress shown."""
    from earthray.runtime import set_verbose
    from earthray.train.progress import Reporter

    set_verbose(verbose)
    kind = _job(name)
    job = kind.loader(spec)
    if address:
        job.address = address
    shown = Reporter(err)
    shown.line(describe(job))
    with shown.training(job):
        return job, kind.runner(job)


@app.command()
def pretrain(
    spec: Path = typer.Argument(..., help="pretraining spec YAML (jobs/pretrain-*.yaml)"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Pretrain a recipe on Ray Train; running the same spec again resumes it."""
    _, result = _train("pretrain", spec, address, verbose,
                       lambda j: f"pretraining {j.name} ({j.recipe}/{j.preset}, {j.max_steps} steps)")
    loss = result.metrics.get("loss")
    console.print(f"[bold green]done[/] {result.name}: step {result.metrics.get('step')}"
                  + (f", loss {loss:.4g}" if isinstance(loss, float) else ""), highlight=False)
    console.print(f"bundle: {result.bundle}\ncheckpoint: {result.checkpoint}\n"
                  f"MLflow run {result.run_id} in {result.tracking_uri} "
                  f"(mlflow ui --backend-store-uri {result.tracking_uri})", highlight=False, soft_wrap=True)


@app.command()
def finetune(
    spec: Path = typer.Argument(..., help="fine-tuning spec YAML (jobs/finetune-*.yaml)"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Fine-tune a task head on a pretrained bundle; evaluate on the held-out split; optionally register it."""
    ft, result = _train("finetune", spec, address, verbose,
                        lambda j: f"fine-tuning {j.name} ({j.task.task}, encoder {j.task.encoder}, "
                                  f"{j.max_steps} steps) on {j.bundle}")
    val = {k[4:]: v for k, v in result.metrics.items() if k.startswith("val_")}
    scores = " ".join(f"{k} {v:.4g}" for k, v in val.items() if not k.startswith("iou_"))
    console.print(f"[bold green]done[/] {result.name}: {scores}", highlight=False)
    if per_class := " ".join(f"{k[4:]} {v:.3g}" for k, v in val.items() if k.startswith("iou_")):
        console.print(f"IoU per class: {per_class}", highlight=False)
    console.print(f"bundle: {result.bundle}\nMLflow run {result.run_id} in {result.tracking_uri}", highlight=False,
                  soft_wrap=True)
    if result.registered:
        console.print(f"registered {result.registered.uri} (aliases {', '.join(ft.registry.aliases)})",
                      highlight=False, soft_wrap=True)


@app.command()
def evaluate(
    bundle: str = typer.Argument(..., help="bundle directory (or a registry URI load_bundle accepts)"),
    spec: Path = typer.Argument(..., help="evaluation spec YAML (jobs/evaluate-*.yaml)"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Linear-probe and kNN scores of a bundle's frozen encoder on a labelled shard group (MLflow run)."""
    from rich.table import Table

    from earthray.runtime import set_verbose

    set_verbose(verbose)
    job = _job("evaluate")
    eval_spec = job.loader(spec)
    if address:
        eval_spec.address = address
    with err.status(f"evaluating {bundle} on {eval_spec.data.group} ({', '.join(eval_spec.methods)})"):
        result = job.runner(bundle, eval_spec)
    metrics = sorted({k.split("/", 1)[1] for k in result.scores}, key=["oa", "miou", "f1", "map"].index)
    table = Table(title=f"{bundle} on {eval_spec.data.group}: {result.n_train} train / {result.n_eval} eval samples")
    for col in ("method", *metrics):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method in dict.fromkeys(k.split("/", 1)[0] for k in result.scores):
        table.add_row(method, *[f"{result.scores.get(f'{method}/{m}', float('nan')):.4f}" for m in metrics])
    console.print(table)
    console.print(f"MLflow run {result.run_id} in {result.tracking_uri}", highlight=False)


@app.command()
def quickstart(
    port: int = typer.Option(8000, min=1, max=65535, help="HTTP port for the Serve app while it is queried"),
    verbose: bool = VerboseOpt,
) -> None:
    """Ingest, pretrain, fine-tune, register, serve, query and map a scene, on the bundled sample data."""
    import time

    from rich.measure import Measurement
    from rich.table import Table

    from earthray.quickstart import quickstart as run_quickstart
    from earthray.runtime import set_verbose
    from earthray.train.progress import Reporter

    set_verbose(verbose)
    root = Path.cwd()
    if not (root / "jobs" / "ingest-sample.yaml").exists():
        _fail(f"{root}: run quickstart from the earthray repository (it uses jobs/, serve/ and data/sample/)")
    started = time.perf_counter()
    result = run_quickstart(root, port=port, shown=Reporter(err))
    table = Table(title=f"earthray quickstart: done in {time.perf_counter() - started:.0f} s")
    table.add_column("what")
    table.add_column("where", overflow="fold")
    for what, where in result.outputs.items():
        table.add_row(what, where)
    out = console
    if not console.is_terminal:  # a file keeps each path on one line, to copy
        width = Measurement.get(console, console.options.update_width(1000), table).maximum
        out = Console(file=console.file, width=max(console.width, width))
    out.print(table)


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
                    shown += f" ({comparable / 1e6:,.1f} M as the paper counts)"
                vs = f"{(comparable - paper) / paper:+.1%}"
            table.add_row(name, preset, shown, f"{paper / 1e6:,.0f} M" if paper else "", vs,
                          ", ".join(cls.paper_sensors))
    console.print(table)


AddressOpt = typer.Option(None, "--address", help="the cluster's job server, its dashboard URL "
                          "(default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, else http://127.0.0.1:8265)")
TokenOpt = typer.Option(None, "--token", envvar="RAY_AUTH_TOKEN", show_envvar=True,
                        help="the cluster's auth token (default: ~/.ray/auth_token)")


@app.command()
def submit(
    spec: Path = typer.Argument(..., help="job spec YAML (jobs/pretrain-*.yaml, jobs/ingest-*.yaml, tune/*.yaml, ...)"),
    args: list[str] | None = typer.Argument(None, help="extra arguments for the command, after --"),
    address: str | None = AddressOpt,
    kind: str | None = typer.Option(None, help="the command that runs the spec (default: from its name)"),
    working_dir: Path | None = typer.Option(None, help="folder uploaded for the job (default: the spec's repo)"),
    env: list[str] | None = typer.Option(None, "--env", help="K=V environment variable for the job (repeatable)"),
    pip: list[str] | None = typer.Option(None, "--pip", help="extra pip requirement for the job (repeatable)"),
    follow: bool = typer.Option(False, "--follow", help="stream the job's logs; exit 1 unless it succeeds"),
    token: str | None = TokenOpt,
) -> None:
    """Submit a spec to a Ray cluster as a Ray Job; prints the job id."""
    from earthray import jobs

    env_vars = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    job_id = jobs.submit(spec, address, kind=kind, working_dir=working_dir, pip=pip, env=env_vars,
                        args=args or (), token=token)
    console.print(job_id, highlight=False, soft_wrap=True)
    if follow:
        jobs.logs(job_id, address, follow=True, token=token)
        state = jobs.wait(job_id, address, timeout=60, token=token)
        err.print(f"job {job_id} {state}", highlight=False)
        if state != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def status(job_id: str, address: str | None = AddressOpt, token: str | None = TokenOpt) -> None:
    """Print a submitted job's status (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED) and Ray's message."""
    from earthray import jobs

    state = jobs.status(job_id, address, token=token)
    note = jobs.message(job_id, address, token=token)
    console.print(f"{job_id} {state}" + (f": {note}" if note else ""), highlight=False, soft_wrap=True)


@app.command()
def logs(job_id: str, address: str | None = AddressOpt, follow: bool = typer.Option(False, "--follow"),
         token: str | None = TokenOpt) -> None:
    """Print a submitted job's logs; --follow streams them until the job ends."""
    from earthray import jobs

    text = jobs.logs(job_id, address, follow=follow, token=token)
    if not follow:
        sys.stdout.write(text)


@app.command()
def stop(job_id: str, address: str | None = AddressOpt, token: str | None = TokenOpt) -> None:
    """Stop a submitted job."""
    from earthray import jobs

    stopped = jobs.stop(job_id, address, token=token)
    console.print(f"{job_id}: " + ("stop requested" if stopped else "already ended"), highlight=False)


@app.command()
def serve(
    config: Path = typer.Argument(..., help="Ray Serve config file (serve/*.yaml), as `serve deploy` takes it"),
    port: int | None = typer.Option(None, min=1, max=65535,
                                    help="HTTP port (default: the config's http_options.port, else 8000)"),
    host: str | None = typer.Option(None, help="HTTP host (default: the config's, else 127.0.0.1)"),
    address: str | None = typer.Option(None, help="Ray address ('local' starts a fresh local Ray; default: Ray's)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Run a Serve config file's applications until Ctrl-C (local Ray by default); the config, every bundle
    and the port are checked before anything starts."""
    from earthray.runtime import set_verbose

    set_verbose(verbose)
    _job("serve").runner(config, port=port, host=host, address=address,
               on_status=lambda m: console.print(m, highlight=False, soft_wrap=True))


@app.command()
def infer(
    spec: Path = typer.Argument(..., help="batch-inference spec YAML (jobs/infer-*.yaml)"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Predict whole scenes window by window into stitched GeoTIFFs; finished scenes are skipped.
    Exit 3 if any scene failed."""
    from rich.markup import escape

    from earthray.runtime import set_verbose
    from earthray.train.progress import Reporter

    set_verbose(verbose)
    job = _job("infer")
    infer_spec = job.loader(spec)
    if address:
        infer_spec.address = address
    shown = Reporter(err)
    with shown.task("infer", "windows") as bar:

        def on_scene(result) -> None:
            note = {"done": "[green]done[/]", "skipped": "skipped (done before)"}.get(result.status,
                                                                                   "[red]failed[/]")
            shown.line(f"{escape(result.scene)}: {note} {escape(result.reason or result.output or '')}",
                       markup=True)

        result = job.runner(infer_spec, on_scene=on_scene, on_windows=lambda done, total: bar.update(done, total))
    counts = {s: sum(r.status == s for r in result.scenes) for s in ("done", "skipped", "failed")}
    console.print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; "
                  f"{result.windows} windows in {result.seconds:.1f}s -> {infer_spec.output}", highlight=False,
                  soft_wrap=True)
    if counts["failed"]:
        raise typer.Exit(EXIT_QUARANTINE)


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="sweep spec YAML (tune/*.yaml)"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Sweep a pretraining job's fields with Ray Tune, scoring each trial's encoder; running it again resumes it."""
    from earthray.runtime import set_verbose
    from earthray.tune.sweep import summary_table

    set_verbose(verbose)
    job = _job("sweep")
    plan = job.loader(spec)
    if address:
        plan.spec.address = address
    result = job.runner(plan)
    console.print(summary_table(result))
    if result.best is not None:
        values = ", ".join(f"{k}={v}" for k, v in result.best.config.items())
        console.print(f"[bold green]best[/] {result.best.trial_id}: {result.metric} {result.best.score:.4g} "
                      f"({values})", highlight=False)
    console.print(f"MLflow run {result.parent_run_id} in {result.tracking_uri}; Tune results in "
                  f"{result.experiment_path}", highlight=False)
    if result.plot is not None:
        console.print(f"scores plot: {result.plot}", highlight=False)
    if result.interrupted:
        err.print("[yellow]interrupted[/]: run the same command again to resume the unfinished trials", highlight=False)
        raise typer.Exit(130)


@app.command()
def version() -> None:
    """Print the earthray version."""
    from earthray import __version__

    console.print(__version__)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
