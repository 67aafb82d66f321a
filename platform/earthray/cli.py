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


def _fail(problem: str | Exception, code: int = EXIT_CONFIG) -> None:
    """Print one error line and exit; a KeyError's message without the quotes ``str()`` adds."""
    if isinstance(problem, KeyError) and problem.args:
        problem = problem.args[0]
    err.print(f"[bold red]error:[/] {problem}", highlight=False)
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
        _fail(e)
    console.print(f"[bold green]done[/] {result.name}: step {result.metrics.get('step')}", highlight=False)
    console.print(f"bundle: {result.bundle}\ncheckpoint: {result.checkpoint}\n"
                  f"MLflow run {result.run_id} in {result.tracking_uri} "
                  f"(mlflow ui --backend-store-uri {result.tracking_uri})", highlight=False)


@app.command()
def finetune(
    spec: Path = typer.Argument(..., help="fine-tuning spec YAML (jobs/finetune-*.yaml)"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)"),
) -> None:
    """Fine-tune a task head on a pretrained bundle; evaluate on the held-out split; optionally register it."""
    from earthray.bundle import BundleError
    from earthray.train.finetune import finetune as run_finetune
    from earthray.train.spec import load_finetune_spec

    try:
        ft = load_finetune_spec(spec)
        if address:
            ft.address = address
        with err.status(f"fine-tuning {ft.name} ({ft.task.task}, encoder {ft.task.encoder}, {ft.max_steps} steps) "
                        f"on {ft.bundle}; worker progress follows"):
            result = run_finetune(ft)
    except (ConfigError, BundleError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(e)
    val = {k[4:]: v for k, v in result.metrics.items() if k.startswith("val_")}
    scores = " ".join(f"{k} {v:.4g}" for k, v in val.items() if not k.startswith("iou_"))
    console.print(f"[bold green]done[/] {result.name}: {scores}", highlight=False)
    if per_class := " ".join(f"{k[4:]} {v:.3g}" for k, v in val.items() if k.startswith("iou_")):
        console.print(f"IoU per class: {per_class}", highlight=False)
    console.print(f"bundle: {result.bundle}\nMLflow run {result.run_id} in {result.tracking_uri}", highlight=False)
    if result.registered:
        console.print(f"registered {result.registered.uri} (aliases {', '.join(ft.registry.aliases)})",
                      highlight=False)


@app.command()
def evaluate(
    bundle: str = typer.Argument(..., help="bundle directory (or a registry URI load_bundle accepts)"),
    spec: Path = typer.Argument(..., help="evaluation spec YAML (jobs/evaluate-*.yaml)"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)"),
) -> None:
    """Linear-probe and kNN scores of a bundle's frozen encoder on a labelled shard group (MLflow run)."""
    from rich.table import Table

    from earthray.bundle import BundleError
    from earthray.train.evaluate import evaluate as run_evaluate
    from earthray.train.evaluate import load_evaluate_spec

    try:
        eval_spec = load_evaluate_spec(spec)
        if address:
            eval_spec.address = address
        with err.status(f"evaluating {bundle} on {eval_spec.data.group} ({', '.join(eval_spec.methods)})"):
            result = run_evaluate(bundle, eval_spec)
    except (ConfigError, BundleError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(e)
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
    port: int = typer.Option(8000, help="HTTP port for the Serve app while it is queried"),
) -> None:
    """Ingest, pretrain, fine-tune, register, serve, query and map a scene, on the bundled sample data."""
    import time

    from rich.table import Table

    from earthray.jobs.quickstart import quickstart as run_quickstart

    root = Path.cwd()
    if not (root / "jobs" / "ingest-sample.yaml").exists():
        _fail(f"{root}: run quickstart from the earthray repository (it uses jobs/, serve/ and data/sample/)")
    started = time.perf_counter()
    try:
        result = run_quickstart(root, port=port, step=lambda line: err.print(line, highlight=False))
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(e)
    table = Table(title=f"earthray quickstart: done in {time.perf_counter() - started:.0f} s")
    table.add_column("what")
    table.add_column("where", overflow="fold")
    for what, where in result.outputs.items():
        table.add_row(what, where)
    console.print(table)


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


def _jobs_call(fn, *args, **kwargs):
    from earthray.jobs import JobError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, JobError) as e:
        _fail(str(e))


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
    job_id = _jobs_call(jobs.submit, spec, address, kind=kind, working_dir=working_dir, pip=pip, env=env_vars,
                        args=args or (), token=token)
    console.print(job_id, highlight=False, soft_wrap=True)
    if follow:
        _jobs_call(jobs.logs, job_id, address, follow=True, token=token)
        state = _jobs_call(jobs.wait, job_id, address, timeout=60, token=token)
        err.print(f"job {job_id} {state}", highlight=False)
        if state != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def status(job_id: str, address: str | None = AddressOpt, token: str | None = TokenOpt) -> None:
    """Print a submitted job's status (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED) and Ray's message."""
    from earthray import jobs

    state = _jobs_call(jobs.status, job_id, address, token=token)
    note = _jobs_call(jobs.message, job_id, address, token=token)
    console.print(f"{job_id} {state}" + (f": {note}" if note else ""), highlight=False, soft_wrap=True)


@app.command()
def logs(job_id: str, address: str | None = AddressOpt, follow: bool = typer.Option(False, "--follow"),
         token: str | None = TokenOpt) -> None:
    """Print a submitted job's logs; --follow streams them until the job ends."""
    from earthray import jobs

    text = _jobs_call(jobs.logs, job_id, address, follow=follow, token=token)
    if not follow:
        sys.stdout.write(text)


@app.command()
def stop(job_id: str, address: str | None = AddressOpt, token: str | None = TokenOpt) -> None:
    """Stop a submitted job."""
    from earthray import jobs

    stopped = _jobs_call(jobs.stop, job_id, address, token=token)
    console.print(f"{job_id}: " + ("stop requested" if stopped else "already ended"), highlight=False)


@app.command()
def serve(
    config: Path = typer.Argument(..., help="Ray Serve config file (serve/*.yaml), as `serve deploy` takes it"),
    port: int | None = typer.Option(None, min=1, max=65535,
                                    help="HTTP port (default: the config's http_options.port, else 8000)"),
    host: str | None = typer.Option(None, help="HTTP host (default: the config's, else 127.0.0.1)"),
    address: str | None = typer.Option(None, help="Ray address ('local' starts a fresh local Ray; default: Ray's)"),
) -> None:
    """Run a Serve config file's applications until Ctrl-C (local Ray by default); the config, every bundle
    and the port are checked before anything starts."""
    from earthray.serve.run import run_config

    try:
        run_config(config, port=port, host=host, address=address,
                   on_status=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except (ConfigError, TimeoutError) as e:
        _fail(str(e))


@app.command()
def infer(
    spec: Path = typer.Argument(..., help="batch-inference spec YAML (jobs/infer-*.yaml)"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)"),
) -> None:
    """Predict whole scenes window by window into stitched GeoTIFFs; finished scenes are skipped.
    Exit 3 if any scene failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from earthray.serve.spec import load_infer_spec

    try:
        infer_spec = load_infer_spec(spec)
        from earthray.serve.infer import infer as run_infer

        if address:
            infer_spec.address = address
        with Progress(TextColumn("infer"), BarColumn(), MofNCompleteColumn(), TextColumn("windows {task.description}"),
                      TimeElapsedColumn(), console=err, transient=True) as progress:
            bar = progress.add_task("", total=None)

            def on_scene(result) -> None:
                note = {"done": "[green]done[/]", "skipped": "skipped (done before)"}.get(result.status,
                                                                                       "[red]failed[/]")
                progress.console.print(f"{result.scene}: {note} {result.reason or result.output or ''}",
                                       highlight=False)

            result = run_infer(infer_spec, on_scene=on_scene,
                               on_windows=lambda done, total: progress.update(bar, completed=done, total=total))
    except (ConfigError, FileNotFoundError) as e:  # infer reports bundle problems as ConfigErrors
        _fail(str(e))
    counts = {s: sum(r.status == s for r in result.scenes) for s in ("done", "skipped", "failed")}
    console.print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; "
                  f"{result.windows} windows in {result.seconds:.1f}s -> {infer_spec.output}", highlight=False)
    if counts["failed"]:
        raise typer.Exit(EXIT_QUARANTINE)


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="sweep spec YAML (tune/*.yaml)"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)"),
) -> None:
    """Sweep a pretraining job's fields with Ray Tune, scoring each trial's encoder; running it again resumes it."""
    from earthray.tune import load_sweep
    from earthray.tune.sweep import run_sweep, summary_table

    try:
        plan = load_sweep(spec)
        if address:
            plan.spec.address = address
        result = run_sweep(plan)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(e)
    console.print(summary_table(result))
    if result.best is not None:
        values = ", ".join(f"{k}={v}" for k, v in result.best.config.items())
        console.print(f"[bold green]best[/] {result.best.trial_id}: {result.metric} {result.best.score:.4g} "
                      f"({values})", highlight=False)
    console.print(f"MLflow run {result.parent_run_id} in {result.tracking_uri}; Tune results in "
                  f"{result.experiment_path}", highlight=False)
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
