"""Where a search's trials live: the Optuna storage and study, and reading trials back.

The default, embedded study (``<run_dir>/study.db``) belongs to one process: a search holds a
lock on its ``run_dir`` while it runs, and a second process given the same ``run_dir`` is
refused at once with a message naming the storage URL option, since it would otherwise take
the first one's running trial for the leftover of a crash. Several processes share a study
through a storage URL (SQLite on one machine, PostgreSQL across machines), where a heartbeat
fails the trial of a worker that died. Workers that open a fresh shared study at the same
moment race to create its tables; the loser retries.

Example:
    >>> optuna = require_optuna()
    >>> try:
    ...     open_storage(optuna, "not a url", heartbeat=None)
    ... except StorageError as err:
    ...     print(str(err)[:80])
    Cannot open the study's storage 'not a url': Could not parse SQLAlchemy URL from
"""

from __future__ import annotations

import inspect
import math
import random
import sqlite3
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lightning_diag.tuning.records import TrialRecord

__all__ = ["EMBEDDED_STUDY", "RunDirInUseError", "StorageError", "embedded_url", "fail_leftovers",
           "open_storage", "read_trials", "require_optuna", "run_dir_lock", "trial_sampler"]

#: The embedded study's file in a search's ``run_dir``.
EMBEDDED_STUDY = "study.db"
#: Tries to open a storage that other workers are creating at the same moment.
_OPEN_TRIES = 5


class StorageError(ValueError):
    """The storage URL cannot be opened: a bad URL, a missing driver, an unreachable database."""


class RunDirInUseError(RuntimeError):
    """Another process is searching with the embedded study of the same ``run_dir``."""


def require_optuna() -> Any:
    """Import Optuna or explain how to install it."""
    try:
        import optuna
    except ImportError as err:
        raise ImportError("The random search needs Optuna: pip install 'lightning-diag[tune]'.") \
            from err
    return optuna


def trial_sampler(optuna: Any, seed: int) -> Any:
    """A random sampler whose draws depend on ``(seed, trial.number, name)`` only.

    Optuna's ``RandomSampler(seed)`` replays the same sequence in every process and after every
    restart, so workers sharing a study, or a resumed search, would repeat configurations; trial
    numbers are unique within a study, hence so are these draws.
    """
    dists = optuna.distributions

    class TrialSeededSampler(optuna.samplers.BaseSampler):  # type: ignore[misc,name-defined]
        def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
            return {}

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
            return {}

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            rng = np.random.default_rng([seed, trial.number, zlib.crc32(name.encode())])
            if isinstance(dist, dists.CategoricalDistribution):
                return dist.choices[int(rng.integers(len(dist.choices)))]
            if isinstance(dist, dists.IntDistribution):
                return int(rng.integers(dist.low, dist.high + 1))
            if dist.log:
                return float(math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))))
            return float(rng.uniform(dist.low, dist.high))

    return TrialSeededSampler()


def embedded_url(run_dir: Path) -> str:
    """The URL of ``run_dir``'s embedded study."""
    return f"sqlite:///{(run_dir / EMBEDDED_STUDY).resolve()}"


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s embedded study for this process, or refuse at once.

    The lock is the operating system's (``flock``), so it goes with the process however it
    ends; it is re-entrant within the process (``tune`` holds it around its search).

    Raises:
        RunDirInUseError: another process holds it.
    """
    import filelock

    lock = filelock.FileLock(str(run_dir / f"{EMBEDDED_STUDY}.lock"), is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise RunDirInUseError(
            f"Another process is searching in run_dir {str(run_dir)!r} with its embedded study "
            f"({EMBEDDED_STUDY}); one process per run_dir. To search with several processes, "
            "give each the same storage URL (`storage=` / `--storage`, e.g. "
            "sqlite:////abs/path/shared.db) and its own run_dir.") from None
    try:
        yield
    finally:
        lock.release()


def _shown(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_storage(optuna: Any, storage: Any, heartbeat: int | None,
                 embedded: Path | None = None) -> Any:
    """The RDB storage at URL ``storage`` (any other storage object is returned as given).

    With ``heartbeat`` (seconds), a running trial writes a heartbeat; one silent for twice that
    long is failed by the next worker that starts a trial, and its configuration retried once.
    ``embedded``: the file of a run_dir's own study (``storage`` is its URL), which one process
    holds: it is written ahead (SQLite's WAL journal, synchronised at checkpoints), so that a
    trial's dozen small writes do not each wait for the disk (24 ms each on a busy disk, 0.01
    ms so); a killed process loses nothing, a power cut at most the last trials.
    Workers creating a fresh study's tables at the same moment collide (a unique constraint of
    the schema's version row); the storage is then opened again, up to 5 times.

    Raises:
        StorageError: the URL cannot be parsed, its driver is missing or the database cannot
            be opened; the message is one line naming the URL (password hidden).
    """
    from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError

    if not isinstance(storage, str):
        return storage
    kwargs: dict[str, Any] = {}
    if heartbeat is not None:
        with warnings.catch_warnings():  # the retry callback is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryFailedTrialCallback(max_retry=1)
        # Optuna 4.9 renamed the argument (the old name warns, and goes in 6.0)
        renamed = "heartbeat_stale_trial_callback" in inspect.signature(
            optuna.storages.RDBStorage).parameters
        kwargs = {"heartbeat_interval": heartbeat,
                  "heartbeat_stale_trial_callback" if renamed else "failed_trial_callback": retry}
    if embedded is not None:
        kwargs["engine_kwargs"] = {"creator": partial(_write_ahead, embedded)}
    tries = 0
    while True:
        try:
            return optuna.storages.RDBStorage(storage, **kwargs)
        except (IntegrityError, OperationalError) as err:
            tries += 1
            if not _racing(err) or tries == _OPEN_TRIES:
                raise _storage_error(storage, err) from err
            time.sleep(random.uniform(0.05, 0.3) * tries)
        except (ArgumentError, ImportError, SQLAlchemyError) as err:
            raise _storage_error(storage, err) from err


def _write_ahead(path: Path) -> sqlite3.Connection:
    """A connection to the SQLite file ``path`` in WAL mode, synchronised at checkpoints."""
    conn = sqlite3.connect(str(path), check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _racing(err: Exception) -> bool:
    """Whether ``err`` is another worker creating the same tables at the same moment: a unique
    row written twice, a table created twice, a database locked by the other's creation."""
    from sqlalchemy.exc import IntegrityError

    text = str(err).lower()
    return isinstance(err, IntegrityError) or "already exists" in text or "locked" in text


def _storage_error(url: str, err: BaseException) -> StorageError:
    reason = str(getattr(err, "orig", None) or err).splitlines()[0].rstrip(".")
    return StorageError(
        f"Cannot open the study's storage {_shown(url)!r}: {reason}. Give an SQLAlchemy URL "
        "that Optuna accepts (`storage=` / `--storage`), e.g. sqlite:////abs/path/study.db or "
        "postgresql+psycopg2://user:password@host/database.")


def fail_leftovers(optuna: Any, study: Any) -> None:
    """Mark FAIL the trials an earlier, dead process left RUNNING in an embedded study (its
    lock says no other process is running any)."""
    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(t.number, state=states.FAIL)


def read_trials(study: Any, direction: str) -> list[TrialRecord]:
    """The study's finished trials as records: completed first, best first."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in ("COMPLETE", "PRUNED"):
            continue
        curve = list(t.user_attrs.get("curve", []))
        value = t.value if t.value is not None else (curve[-1] if curve else math.nan)
        ended = t.user_attrs.get("ended_by") or {}
        took = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else math.nan
        rows.append(TrialRecord(
            number=t.number, lr=t.params["lr"], weight_decay=t.params["weight_decay"],
            value=float(value), state=t.state.name.lower(), epochs=len(curve),
            steps=t.user_attrs.get("steps", 0), seconds=took, worker=t.user_attrs.get("worker"),
            ended_by=ended.get("code", ""), ended_at=ended.get("step"), why=ended.get("why", ""),
            curve=curve))
    sign = -1.0 if direction == "maximize" else 1.0
    rows.sort(key=lambda r: (r.state != "complete",
                             sign * r.value if math.isfinite(r.value) else math.inf))
    return rows
