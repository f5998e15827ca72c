"""A quiet console for the jobs: a few lines a person reads, everything else in a log file.

Ray, Ray Train, Ray Data and DeepSpeed write a lot to the process' stdout/stderr: every
``ray.train.report`` as a dictionary, controller warnings, worker logs forwarded to the
driver, progress as log lines. :func:`quiet_console` points file descriptors 1 and 2 (so
also C++ and subprocess output) at a log file and keeps the terminal for :func:`say` and
the progress bars of :class:`Progress`::

    with quiet_console("train", log_path):      # "[train] log: runs/x/logs/train.log"
        say("[train] stage align: 300 steps")   # to the terminal (and the log)
        with Progress("align", total=300) as bar:
            bar.update(5, loss=1.2, samples_per_s=40.0)

In a terminal :class:`Progress` draws a ``tqdm`` bar; otherwise (CI, a file) it prints one
summary line every ``interval_s`` and at the end. Ray Data's progress, which Ray logs when
stdout is not a terminal (and it is not: it is the log file), is turned into such a bar
per dataset by :func:`attach_ray_data_progress`.

Without :func:`quiet_console` (``--verbose``, ``OMNIRAY_VERBOSE=1``, or library use inside
tests) :func:`say` prints to ``sys.stdout`` and nothing is redirected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: Environment variable naming a directory: every job writes its log there as ``<job>.log``
#: (``jobs.demo`` sets it so that all steps log under one run dir).
LOG_DIR_ENV = "OMNIRAY_LOG_DIR"
#: ``OMNIRAY_VERBOSE=1``: no redirection, everything on the terminal as before.
VERBOSE_ENV = "OMNIRAY_VERBOSE"

_state: dict[str, Any] = {"console": None, "err": None, "log": None}


def console() -> IO[str]:
    """The terminal stream (``sys.stdout`` when no quiet console is active)."""
    return _state["console"] or sys.stdout


def is_tty() -> bool:
    try:
        return console().isatty()
    except (AttributeError, ValueError):
        return False


def say(msg: str, *, err: bool = False) -> None:
    """One line to the terminal (its stderr with ``err``); also into the log when the
    console is quiet."""
    out = (_state["err"] or sys.stderr) if err else console()
    out.write(msg.rstrip("\n") + "\n")
    out.flush()
    if _state["console"] is not None:
        print(msg, flush=True)  # fd 1 is the log file


def log_path_for(job: str, default_dir: str | Path) -> Path:
    """``$OMNIRAY_LOG_DIR/<job>.log`` when set, else ``<default_dir>/logs/<job>.log``."""
    base = os.environ.get(LOG_DIR_ENV)
    return Path(base) / f"{job}.log" if base else Path(default_dir) / "logs" / f"{job}.log"


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def quiet_console(job: str, log_path: str | Path, *, verbose: bool = False) -> Iterator[Path]:
    """Sends fds 1 and 2 to ``log_path`` (appending) for the block; the terminal keeps
    :func:`say` and :class:`Progress`. An exception leaving the block is written to the log
    with its traceback and summarized on the terminal's stderr in one line; the process then
    exits with status 1 (``SystemExit(1)``).

    With ``verbose`` (or ``OMNIRAY_VERBOSE=1``) nothing is redirected.
    """
    log_path = Path(log_path).resolve()
    if verbose_requested(verbose) or _state["console"] is not None or not _real_stdio():
        yield log_path
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    term = os.fdopen(os.dup(saved_out), "w", buffering=1)
    term_err = os.fdopen(os.dup(saved_err), "w", buffering=1)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    _state.update(console=term, err=term_err, log=log_path)
    # Ray Data logs its progress every N s when stdout is no terminal (here: never one).
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "5" if term.isatty() else "30")
    if not os.environ.get(LOG_DIR_ENV):  # under jobs.demo, whose first line names the dir
        say(f"[{job}] log: {_short(log_path)}")
    failed = False
    try:
        yield log_path
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        import traceback

        traceback.print_exc()  # into the log
        first = " ".join(str(e).split())[:160]
        term_err.write(
            f"[{job}] failed: {type(e).__name__}: {first} (traceback: {_short(log_path)})\n"
        )
        failed = True
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        for f in (term, term_err):
            f.flush()
            f.close()
        _state.update(console=None, err=None, log=None)
    if failed:  # the traceback is in the log; the exit status says it failed
        raise SystemExit(1)


def _real_stdio() -> bool:
    """Whether ``sys.stdout``/``sys.stderr`` write to fds 1/2 (not when a caller, such as
    pytest's ``capsys``, replaced them: then nothing is redirected)."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _short(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def format_duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """One progress bar: ``tqdm`` in a terminal, else a summary line every ``interval_s``.

    Args:
        desc: What is counted (``"align"``, ``"Ray Data"``).
        total: Number of units (None when unknown).
        unit: Name of a unit (``"step"``, ``"row"``).
        prefix: Tag of the summary lines (``"[train]"``).
        interval_s: Seconds between summary lines when not in a terminal (with a known
            ``total``: a line at each ``quarter`` of it instead, at most 3 + the final one).
    """

    def __init__(
        self,
        desc: str,
        total: int | None,
        *,
        unit: str = "step",
        prefix: str = "",
        interval_s: float = 60.0,
    ) -> None:
        self.desc, self.total, self.unit, self.prefix = desc, total, unit, prefix
        self.interval_s = interval_s
        self.n = 0
        self.post: dict[str, str] = {}
        self.t0 = time.monotonic()
        self._last_line = self.t0
        self._bar = None
        self._closed = False
        self._said = ""
        self._quarter = 0
        if is_tty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=f"{prefix} {desc}".strip(),
                unit=unit,
                file=console(),
                ncols=_width(),
                leave=True,
            )

    def update_to(self, n: int, total: int | None = None, **post: float | str | None) -> None:
        """Sets the count to ``n`` (and the total); ``post`` = named figures to show."""
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        self.post = {k: _fmt(v) for k, v in post.items() if v is not None}
        if self._bar is not None:
            self._bar.set_postfix(self.post, refresh=False)
            self._bar.update(max(0, n - self.n))
            self.n = n
            return
        self.n = n
        now = time.monotonic()
        if self.total:
            quarter = 4 * n // self.total
            if 0 < quarter < 4 and quarter > self._quarter:
                self._quarter = quarter
                self._say(self.line())
        elif now - self._last_line >= self.interval_s:
            self._last_line = now
            self._say(self.line())

    def _say(self, line: str) -> None:
        # The same figures twice (a last update, then close) print once.
        if line.split(" elapsed ")[0] != self._said.split(" elapsed ")[0]:
            say(line)
        self._said = line

    def line(self) -> str:
        """``[train] align 150/300 (50%) loss 1.23 samples/s 41 elapsed 1m10s ETA 1m10s``."""
        el = time.monotonic() - self.t0
        tot = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        figs = "".join(f" {k} {v}".replace("  ", " ") for k, v in self.post.items())
        eta = ""
        if self.total and 0 < self.n < self.total:
            eta = f" ETA {format_duration(el / self.n * (self.total - self.n))}"
        count = "" if self.total is None and self.n == 0 else f" {self.n}{tot}{pct}"
        return f"{self.prefix} {self.desc}{count}{figs} elapsed {format_duration(el)}{eta}".strip()

    def close(self, final: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            print(self.line(), flush=True)  # into the log as well
        elif final:
            self._say(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _width() -> int:
    """The terminal's width (tqdm's own probe reads fd 1, which is the log here)."""
    try:
        return max(40, min(os.get_terminal_size(console().fileno()).columns, 160))
    except (AttributeError, OSError, ValueError):
        return 100


def _fmt(v: float | str) -> str:
    if isinstance(v, str):
        return v
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


# --------------------------------------------------------------------------- Ray Data
_DATASET_RE = re.compile(r"Running Dataset: (\S+)")
_TOTAL_RE = re.compile(r"Total Progress: (\d+)/(\S+)")
_FINISHED_RE = re.compile(r"Dataset (\S+) execution (finished in [0-9.]+ seconds|failed)")


class _RayDataProgress(logging.Handler):
    """Turns Ray Data's logged progress (non-terminal mode) into one :class:`Progress` per
    dataset execution."""

    def __init__(self, prefix: str) -> None:
        super().__init__(logging.INFO)
        self.prefix = prefix
        self.bar: Progress | None = None
        self.dataset: str | None = None
        self.rows = 0
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - never break Ray's logging
            return
        with self._lock:
            m = _FINISHED_RE.search(msg)
            if m:
                if self.bar is None:
                    self.bar = Progress("Ray Data", None, unit="row", prefix=self.prefix)
                    self.bar.n = self.rows
                elif self.bar.total:
                    self.bar.update_to(self.bar.total)
                self.bar.post = {"": m.group(2)}
                self.finish()
                self.dataset = None
                return
            m = _DATASET_RE.search(msg)
            if m:
                if m.group(1) != self.dataset:
                    self.finish()
                    self.dataset = m.group(1)
                return
            m = _TOTAL_RE.search(msg)
            if m and self.dataset is not None:
                done, total = int(m.group(1)), m.group(2)
                tot = int(total) if total.isdigit() else None
                self.rows = done
                if self.bar is None:
                    self.bar = Progress(
                        "Ray Data", tot, unit="row", prefix=self.prefix, interval_s=30.0
                    )
                self.bar.update_to(done, tot)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None


@contextlib.contextmanager
def ray_data_progress(prefix: str) -> Iterator[None]:
    """Shows Ray Data's progress on the console while the block runs (see module doc)."""
    names = (
        "ray.data._internal.progress.logging_progress",
        "ray.data._internal.execution.streaming_executor",
    )
    handler = _RayDataProgress(prefix)
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(lvl)
        handler.finish()
