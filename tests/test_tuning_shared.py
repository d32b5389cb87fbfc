"""random_search beyond one process: workers sharing a PostgreSQL study, trials under DDP.

The PostgreSQL test starts a throwaway cluster (Debian's ``postgresql`` package: ``initdb`` and
``pg_ctl`` on a temporary directory, listening on a Unix socket only; as the ``postgres`` user when
the tests run as root, since PostgreSQL refuses root) and is skipped, with the reason, only where
no cluster can be started. The driver comes with the ``postgres`` extra (part of ``dev``).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[1]
PORT = 5432  # names the socket file inside the cluster's own directory: no clash possible
HEARTBEAT = 1  # seconds; a trial silent for 2 beats is stale


def _run(cmd: list[str], as_user: str | None, **kw: object) -> subprocess.CompletedProcess:
    if as_user is not None:
        cmd = ["runuser", "-u", as_user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)  # type: ignore


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh cluster with an empty ``optuna`` database; stopped and removed afterwards."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.fail("The PostgreSQL driver is missing: pip install 'lightning-diag[postgres]' "
                    "(part of the `dev` extra).")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb; Debian: apt-get install postgresql)")
    as_user = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without `runuser`: cannot start PostgreSQL as another "
                        "user")
        as_user = "postgres"
    # a short path: the socket's path must fit in 107 bytes
    root = Path(tempfile.mkdtemp(prefix="ldiag-pg-", dir="/tmp" if Path("/tmp").is_dir() else None))
    data = root / "data"
    try:
        if as_user is not None:
            try:
                shutil.chown(root, user=as_user)
            except LookupError:
                pytest.skip("running as root and there is no `postgres` user to run PostgreSQL")
        steps = [
            [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
             "--no-sync", "-E", "UTF8"],
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
             f"-k {root} -c listen_addresses='' -p {PORT} -c fsync=off", "start"],
            [str(bin_dir / "createdb"), "-h", str(root), "-p", str(PORT), "-U", "postgres",
             "optuna"],
        ]
        for step in steps:
            done = _run(step, as_user)
            if done.returncode != 0:
                log = (root / "log").read_text()[-1000:] if (root / "log").exists() else ""
                pytest.skip(f"PostgreSQL could not be started: {Path(step[0]).name} failed: "
                            f"{done.stderr.strip()[-1000:]} {log}")
        yield f"postgresql+psycopg2://postgres@/optuna?host={root}&port={PORT}"
    finally:
        if (data / "postmaster.pid").exists():  # started, even if a later step failed
            _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                 as_user)
        shutil.rmtree(root, ignore_errors=True)


WORKER = textwrap.dedent("""
    import functools, pathlib, sys, time
    sys.path.insert(0, {root!r})
    from lightning_diag.examples.digits import DigitsClassifier
    from lightning_diag.tuning.search import random_search
    from tests.helpers import digits, loader

    run_dir, n_trials, mode = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

    class Stuck(DigitsClassifier):
        def on_train_start(self):  # a trial that hangs until its worker is killed
            (run_dir / "training").touch()
            time.sleep(600)

    cls = Stuck if mode == "stuck" else DigitsClassifier
    factory = functools.partial(cls, arch="mlp", width=16, dropout=0.0)
    data = (loader(digits(128), 32), loader(digits(64), 64, shuffle=False))
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode == "together":  # start at once (imports take seconds), so that every worker works
        (run_dir / "ready").touch()
        deadline = time.monotonic() + 120
        while len(list(run_dir.parent.glob("w*/ready"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    if mode == "later":  # imported while another worker runs; searches when told
        deadline = time.monotonic() + 120
        while not (run_dir / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    random_search(factory, data, center_lr=1e-2, n_trials=n_trials, epochs=(1, 1),
                  storage={storage!r}, study_name="shared", run_dir=run_dir,
                  heartbeat={heartbeat}, accelerator="cpu", limit_train_batches=2,
                  enable_model_summary=False)
""")


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen]]:
    """The worker processes a test starts; any still running when it ends (a failure) is killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _worker(procs: list[subprocess.Popen], code: str, run_dir: Path, n_trials: int,
            mode: str) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stderr", "wb") as err:  # a file: a full pipe would stall the worker
        proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(n_trials), mode],
                                cwd=run_dir.parent, stderr=err,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    procs.append(proc)
    return proc


def _stderr(proc: subprocess.Popen) -> str:
    return (Path(proc.args[3]) / "stderr").read_text()[-2000:]  # type: ignore[index]


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_workers_share_a_postgres_study_and_survive_a_killed_worker(
        postgres_url: str, tmp_path: Path, spawned: list[subprocess.Popen]) -> None:
    code = WORKER.format(root=str(ROOT), storage=postgres_url, heartbeat=HEARTBEAT)
    optuna.create_study(storage=postgres_url, study_name="shared", direction="maximize")

    # three workers at once: the trials split, no configuration runs twice
    procs = [_worker(spawned, code, tmp_path / f"w{i}", 6, "together") for i in range(3)]
    for p in procs:
        p.wait(timeout=240)
    assert [p.returncode for p in procs] == [0, 0, 0], [_stderr(p) for p in procs]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    first = _finished(study)
    assert 6 <= len(first) <= 8  # trials in flight when the 6th finished also finish
    assert len({(t.params["lr"], t.params["weight_decay"]) for t in first}) == len(first)
    # Shared, not run by one: on 2 cores the third worker may reach the queue only after the
    # others have taken its 6 quick trials (measured: 1 run in 4), so two is what is certain.
    assert len({t.user_attrs["worker"] for t in first}) >= 2, "one worker ran every trial"
    assert all(t.state.name != "FAIL" for t in study.get_trials())

    # a worker killed in the middle of a trial: the trial stays RUNNING, its heartbeat stops
    stuck = _worker(spawned, code, tmp_path / "stuck", len(first) + 1, "stuck")
    again = _worker(spawned, code, tmp_path / "again", len(first) + 2, "later")
    deadline = time.monotonic() + 120
    while not (tmp_path / "stuck" / "training").exists():
        assert stuck.poll() is None, _stderr(stuck)
        assert time.monotonic() < deadline, "the stuck worker never started its trial"
        time.sleep(0.1)
    stuck.send_signal(signal.SIGKILL)
    stuck.wait(timeout=60)
    running = [t for t in study.get_trials() if t.state.name == "RUNNING"]
    assert len(running) == 1
    killed = running[0]
    time.sleep(2 * HEARTBEAT + 0.5)  # past the grace period

    # a restarted worker fails the stale trial, retries its configuration, and goes on
    (tmp_path / "again" / "go").touch()
    assert again.wait(timeout=240) == 0, _stderr(again)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed.number].state.name == "FAIL"
    retried = [t for t in trials.values()
               if optuna.storages.RetryFailedTrialCallback.retried_trial_number(t)
               == killed.number]
    # Run to its end: the median pruner may prune the retry on its value, a finish like any.
    assert len(retried) == 1 and retried[0].state.name in ("COMPLETE", "PRUNED")
    assert retried[0].value is not None
    assert retried[0].params == killed.params
    final = _finished(study)
    assert len(final) == len(first) + 2
    assert len({(t.params["lr"], t.params["weight_decay"]) for t in final}) == len(final)
    assert {t.number: t.value for t in first} == \
        {t.number: t.value for t in final if t.number in {f.number for f in first}}
    workers = {t.user_attrs["worker"] for t in final if t.number not in
               {f.number for f in first}}
    assert workers == {again.pid}


@pytest.mark.slow
def test_a_trial_trains_under_ddp_and_reports_one_value(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_search_script.py"),
                               str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"The DDP search hung: {err.stderr!r:.2000}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["number"], r["state"], r["ended_by"], r["steps"]) for r in rows] == [
        (1, "complete", "", 2), (0, "pruned", "update_ratio.too_high", 1)]
    study = optuna.load_study(study_name="lightning_diag_search",
                              storage=f"sqlite:///{tmp_path / 'runs' / 'study.db'}")
    assert len(study.trials) == 2  # rank 1 trained rank 0's trials and made none of its own
    bad, healthy = study.trials  # the diagnosis stopped both ranks of trial 0 after its step 0
    assert len(healthy.intermediate_values) == 1 and healthy.value is not None
    assert bad.user_attrs["ended_by"]["code"] == "update_ratio.too_high"
    for t in study.trials:  # both ranks trained each configuration, as a world of two
        for rank in (0, 1):
            fit = tmp_path / "fits" / f"rank{rank}_lr{t.params['lr']!r}"
            assert fit.exists() and fit.read_text() == "2", fit


HOLDER = textwrap.dedent("""
    import functools, pathlib, sys, time
    sys.path.insert(0, {root!r})
    from lightning_diag.examples.digits import DigitsClassifier
    from lightning_diag.tuning.search import random_search
    from tests.helpers import digits, loader

    run_dir = pathlib.Path(sys.argv[1])

    class Waiting(DigitsClassifier):
        def on_train_start(self):  # holds its trial RUNNING until the test says go on
            (run_dir / "training").touch()
            deadline = time.monotonic() + 120
            while not (run_dir / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    factory = functools.partial(Waiting, arch="mlp", width=16, dropout=0.0)
    data = (loader(digits(128), 32), loader(digits(64), 64, shuffle=False))
    random_search(factory, data, center_lr=1e-2, n_trials=2, epochs=(1, 1), run_dir=run_dir,
                  accelerator="cpu", limit_train_batches=2, enable_model_summary=False)
""")


@pytest.mark.slow
def test_a_second_process_on_an_embedded_study_is_refused(
        tmp_path: Path, spawned: list[subprocess.Popen], capsys: pytest.CaptureFixture) -> None:
    # Before: the second process took the first one's running trial for a crash's leftover and
    # failed it; the first then died with "Cannot tell a FAIL trial" (2 of 3 in a rerun).
    from lightning_diag.cli import main
    from lightning_diag.examples.digits import DigitsClassifier
    from lightning_diag.tuning.search import random_search
    from lightning_diag.tuning.study import RunDirInUseError
    from tests.helpers import digits, loader

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(tmp_path / "stderr", "wb") as err:
        first = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT)),
                                  str(run_dir)], cwd=tmp_path, stderr=err,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    spawned.append(first)
    deadline = time.monotonic() + 120
    while not (run_dir / "training").exists():
        assert first.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
        assert time.monotonic() < deadline, "the first search never started its trial"
        time.sleep(0.05)
    factory = functools.partial(DigitsClassifier, arch="mlp", width=16, dropout=0.0)
    data = (loader(digits(128), 32), loader(digits(64), 64, shuffle=False))
    with pytest.raises(RunDirInUseError, match=r"one process per run_dir\. To search with "
                       r"several processes, give each the same storage URL \(`storage=` / "
                       r"`--storage`"):
        random_search(factory, data, center_lr=1e-2, n_trials=3, epochs=(1, 1),
                      run_dir=run_dir, accelerator="cpu")
    assert main(["tune", "--run-dir", str(run_dir), "--accelerator", "cpu"]) == 2
    said = capsys.readouterr().err
    assert said.startswith("lightning-diag tune: Another process is searching in run_dir")
    assert said.count("\n") == 1 and "--storage" in said
    (run_dir / "go").touch()
    assert first.wait(timeout=240) == 0, (tmp_path / "stderr").read_text()[-2000:]
    study = optuna.load_study(study_name="lightning_diag_search",
                              storage=f"sqlite:///{run_dir / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    # the lock went with the process: the run_dir is free again
    again = random_search(factory, data, center_lr=1e-2, n_trials=3, epochs=(1, 1),
                          run_dir=run_dir, accelerator="cpu", limit_train_batches=2)
    assert len(again.rows) == 3


@pytest.mark.slow
def test_workers_starting_at_once_on_a_fresh_sqlite_study(
        tmp_path: Path, spawned: list[subprocess.Popen]) -> None:
    # Before: they raced to create the study's tables (IntegrityError on the schema's version
    # row; 1-2 of 3 workers died in 2 of 4 runs). Nothing creates the study beforehand here.
    storage = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = WORKER.format(root=str(ROOT), storage=storage, heartbeat=60)
    procs = [_worker(spawned, code, tmp_path / f"w{i}", 6, "together") for i in range(3)]
    for p in procs:
        p.wait(timeout=240)
    assert [p.returncode for p in procs] == [0, 0, 0], [_stderr(p) for p in procs]
    study = optuna.load_study(study_name="shared", storage=storage)
    assert 6 <= len(_finished(study)) <= 8
    assert all(t.state.name != "FAIL" for t in study.get_trials())
