"""earthray's progress: the rank-0 training worker's, carried to the driver, and the driver's display of it.

Ray's worker output stays in Ray's log files (``earthray.runtime``), so a worker's progress takes a way of its
own to the driver: rank 0 appends it, one JSON object a line, to ``earthray-progress.jsonl`` in the run's
folder (under the Ray Train storage path, which the driver and every worker see: the checkpoints go there
too), and the driver follows that file (``Follower``). An event is ``{"step", "total"}`` as steps pass (at
most one a second), with ``"text"`` for a log line (every ``tracking.log_every`` steps, ``"status"`` its
metrics) or for a note (``"note": true``: a resume, held-out scores), which the driver always shows. A driver
that does not see the run's folder (Ray Client from another machine) shows no training progress; with
``EARTHRAY_VERBOSE=1`` the workers' own log lines reach it through Ray as before.

``Reporter`` shows it: rich progress bars on a terminal (ingest scenes, training steps, inference windows);
anywhere else (a file, a pipe, a Ray Job's log) plain lines, at most one per ``PLAIN_EVERY_S`` and task
besides notes and a training's last step: a bounded number, never one per refresh.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

FILE = "earthray-progress.jsonl"
TICK_S = 1.0  # the worker's step events, at most this often
POLL_S = 0.5  # the driver reads the file this often
PLAIN_EVERY_S = 30.0  # plain (non-terminal) output: at most one progress line a task this often


def progress_file(spec) -> Path:
    """The run's progress file: ``<storage_path>/<name>/earthray-progress.jsonl`` (``spec``: a TrainSpec)."""
    return Path(spec.storage_path) / spec.name / FILE


def worker_logger() -> logging.Logger:
    """Worker progress lines on stderr (Ray Train echoes a worker's stdout twice on the driver): Ray's log files
    keep them, and the driver's output with EARTHRAY_VERBOSE=1."""
    log = logging.getLogger("earthray.train")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[earthray] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


class WorkerProgress:
    """A training worker's progress: its log lines, and on rank 0 the events of the run's progress file.

    Progress never fails a run: a file that cannot be written is one warning in the worker's log, and the
    driver then shows no progress for the run."""

    def __init__(self, spec, rank: int):
        self.log = worker_logger()
        self.total = spec.max_steps
        self.path: Path | None = progress_file(spec) if rank == 0 else None
        self.last_tick = 0.0

    def _emit(self, event: dict) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")  # one write: the driver never sees half a line for long
        except OSError as e:
            self.log.warning("cannot write the progress file %s (%s): the driver shows no progress", self.path, e)
            self.path = None

    def start(self, step: int) -> None:
        """Training starts (or resumes) at ``step``."""
        self.last_tick = time.monotonic()
        self._emit({"step": step, "total": self.total, "start": True})

    def tick(self, step: int) -> None:
        """An optimiser step ended (an event at most every ``TICK_S``)."""
        now = time.monotonic()
        if self.path is not None and now - self.last_tick >= TICK_S:
            self.last_tick = now
            self._emit({"step": step, "total": self.total})

    def line(self, step: int, text: str, status: str | None = None) -> None:
        """A log line (the driver prints it off a terminal when due; ``status`` goes on the bar)."""
        self.log.info(text)
        self._emit({"step": step, "total": self.total, "text": text, "status": status})

    def note(self, step: int, text: str) -> None:
        """A line the driver always prints (a resume, held-out scores)."""
        self.log.info(text)
        self._emit({"step": step, "total": self.total, "text": text, "note": True})


class Follower:
    """Reads the events appended to ``path`` after it was created (earlier runs' are skipped), in a thread
    every ``POLL_S``, passing each to ``on_event``; ``stop`` reads the last ones."""

    def __init__(self, path: Path, on_event: Callable[[dict], None], every: float = POLL_S):
        self.path, self.on_event, self.every = Path(path), on_event, every
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.partial = b""
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="earthray-progress", daemon=True)

    def start(self) -> Follower:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        self.read()

    def _run(self) -> None:
        while not self.stopped.wait(self.every):
            self.read()

    def read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < self.offset:  # replaced by a new file: start over
                    self.offset, self.partial = 0, b""
                f.seek(self.offset)
                data = f.read()
        except OSError:  # not there yet
            return
        if not data:
            return
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for raw in lines:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict):
                try:
                    self.on_event(event)
                except Exception:  # a display problem must not stop the reading (nor the run)
                    logging.getLogger(__name__).exception("progress event %s", event)


class _Plain:
    """Off a terminal: a task's progress as a line at most every ``every`` seconds."""

    def __init__(self, reporter: Reporter, every: float):
        self.reporter, self.every, self.last = reporter, every, time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every

    def print(self, text: str) -> None:
        self.last = time.monotonic()
        self.reporter.line(text)


class Task:
    """One bar (or its plain lines): ``update(done, total, note)``."""

    def __init__(self, reporter: Reporter, label: str, unit: str, bar=None, task_id=None):
        self.label, self.unit, self.bar, self.task_id = label, unit, bar, task_id
        self.plain = _Plain(reporter, reporter.plain_every_s) if bar is None else None

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task_id, completed=done, total=total, description=note)
        elif self.plain.due():
            of = f"/{total}" if total else ""
            self.plain.print(f"{self.label}: {done}{of} {self.unit}" + (f"; {note}" if note else ""))


class Reporter:
    """Where earthray's progress goes: a rich console, stderr by default. Bars on a terminal; elsewhere plain
    lines, bounded (see the module's docstring)."""

    def __init__(self, console=None, plain_every_s: float = PLAIN_EVERY_S):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.bars = self.console.is_terminal and not self.console.is_dumb_terminal
        self.plain_every_s = plain_every_s

    def line(self, text: str, markup: bool = False) -> None:
        """One line, never wrapped by rich (a terminal wraps it; a log file keeps it whole)."""
        self.console.print(text, highlight=False, markup=markup, soft_wrap=True)

    def _progress(self, *columns):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        return Progress(*columns[:1], BarColumn(), MofNCompleteColumn(), *columns[1:], TimeElapsedColumn(),
                        console=self.console, transient=True)

    @contextmanager
    def task(self, label: str, unit: str = "", total: int | None = None) -> Iterator[Task]:
        """A bar for ``label`` (ingest scenes, inference windows); ``unit`` names what it counts."""
        if not self.bars:
            yield Task(self, label, unit)
            return
        from rich.markup import escape
        from rich.progress import TextColumn

        with self._progress(TextColumn(escape(label)), TextColumn(escape(unit)),
                            TextColumn("{task.description}", markup=False)) as bar:
            yield Task(self, label, unit, bar, bar.add_task("", total=total))

    @contextmanager
    def training(self, spec) -> Iterator[None]:
        """The training ``spec`` runs meanwhile: its workers' progress, from the run's progress file, as a bar
        (steps, the latest loss) and the notes above it; off a terminal, the bounded plain lines."""
        plain = _Plain(self, self.plain_every_s)
        state: dict = {"status": None}

        def show(event: dict, bar=None, task_id=None) -> None:
            step, total, text = event.get("step"), event.get("total"), event.get("text")
            if text and event.get("note"):
                self.line(text)
            if bar is not None:
                if event.get("status"):
                    state["status"] = event["status"]
                status = "reading the data" if event.get("start") else state["status"] or "training"
                bar.update(task_id, completed=step, total=total, status=status)
            elif text and not event.get("note") and (plain.due() or step == total):
                plain.print(text)

        if not self.bars:
            follower = Follower(progress_file(spec), show).start()
            try:
                yield
            finally:
                follower.stop()
            return
        from rich.markup import escape
        from rich.progress import TextColumn

        with self._progress(TextColumn(escape(spec.name)), TextColumn("{task.fields[status]}", markup=False)) as bar:
            task_id = bar.add_task("", total=spec.max_steps, status="starting the workers, reading the data")
            follower = Follower(progress_file(spec), lambda e: show(e, bar, task_id)).start()
            try:
                yield
            finally:
                follower.stop()
