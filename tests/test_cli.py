"""The `lightning-diag` command line: subcommands, argument forwarding and clear errors."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_diag import cli
from lightning_diag.tensorboard.tags import curve


def test_help_lists_the_four_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("demo", "report", "check", "tune"))


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_report_command_writes_html(tmp_path, capsys):
    with SummaryWriter(str(tmp_path / "run")) as w:
        w.add_scalar(curve("loss"), 1.0, 0)
    out = tmp_path / "out" / "r.html"
    assert cli.main(["report", str(tmp_path), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "Learning curves" in out.read_text()


def test_report_missing_dir_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "missing" in err


def test_demo_forwards_arguments(monkeypatch):
    import lightning_diag.examples.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: calls.append((a, kw)))
    assert cli.main(["demo", "--inject", "--epochs", "2", "--out", "x", "--seed", "3",
                     "--limit-batches", "4", "--no-progress-bar", "--no-report"]) == 0
    assert calls == [(("x",), {"inject": True, "epochs": 2, "seed": 3, "limit_batches": 4,
                               "progress_bar": False, "report": False})]


@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["demo", "--limit-batches", "0"]])
def test_demo_rejects_bad_budgets(argv, capsys):
    assert cli.main(argv) == 2
    assert "must be >= 1" in capsys.readouterr().err


def _fake_tuning(monkeypatch, module: types.ModuleType | None) -> None:
    monkeypatch.setitem(sys.modules, "lightning_diag.tuning",
                        types.ModuleType("lightning_diag.tuning") if module else None)
    monkeypatch.setitem(sys.modules, "lightning_diag.tuning.cli", module)


def test_tune_delegates_to_the_tuning_module(monkeypatch):
    fake = types.ModuleType("lightning_diag.tuning.cli")
    seen = {}
    fake.add_tune_arguments = lambda p: p.add_argument("--trials", type=int, default=1)  # type: ignore[attr-defined]
    fake.run_tune = lambda args: seen.setdefault("trials", args.trials) and 7  # type: ignore[attr-defined]
    _fake_tuning(monkeypatch, fake)
    assert cli.main(["tune", "--trials", "5"]) == 7
    assert seen == {"trials": 5}


def test_tune_without_tuning_module_says_so(monkeypatch, capsys):
    _fake_tuning(monkeypatch, None)
    assert cli.main(["tune"]) == 2
    assert "tuning module" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_entry_point():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "lightning_diag", "report", "--help"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOGDIR" in proc.stdout


# --- lightning-diag check: the findings.jsonl of real short fits -------------------------------


def _fit_run(root: Path, version: int, problem: str) -> None:
    """One tiny fit logging to ``root/tb/version_<version>``: a FAIL (last layer scaled up 30x,
    caught by InitialLossCheck) or only a WARN (two duplicated samples, found by DataInspection).
    """
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import TensorDataset

    from lightning_diag import DataInspection, InitialLossCheck
    from tests.helpers import Classifier, digits, loader, mlp, trainer

    torch.manual_seed(0)
    net = mlp(width=8)
    x, y = digits(64, flatten=True).tensors
    callback: Any
    if problem == "fail":
        with torch.no_grad():
            net[-1].weight.mul_(30)
        callback, data = InitialLossCheck(num_batches=1), TensorDataset(x, y)
    else:
        callback = DataInspection(max_images=1)
        data = TensorDataset(torch.cat([x, x[:2]]), torch.cat([y, y[:2]]))
    logger = TensorBoardLogger(str(root), name="tb", version=version)
    with pytest.warns(UserWarning):  # the findings are WARN/FAIL, so they warn as published
        trainer(root, [callback], logger=logger, limit_train_batches=1,
                limit_val_batches=0).fit(Classifier(net), loader(data))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    _fit_run(root / "failing", 0, "fail")
    _fit_run(root / "warning", 0, "warn")
    _fit_run(root / "both", 2, "warn")
    _fit_run(root / "both", 10, "fail")
    return {name: root / name for name in ("failing", "warning", "both")}


def test_check_fail_run_exits_1_and_prints_findings_advice_and_count(runs, capsys):
    assert cli.main(["check", str(runs["failing"])]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Run tb/version_0"
    assert lines[1].startswith("Findings: 1 fail, 0 warn, ")
    assert lines[3] == "[FAIL] initial_loss.mismatch  (InitialLossCheck)"
    assert "Initial data loss " in lines[4] and "advice:" in out and "last layer" in out
    infos = out.count("[INFO]")
    assert infos >= 1 and out.index("[FAIL]") < out.index("[INFO]")
    assert f"{infos + 1} finding(s) in 1 run(s): 1 fail, 0 warn, {infos} info." in out


def test_check_warn_run_exits_0_by_default_and_1_with_fail_on_warn(runs, capsys):
    assert cli.main(["check", str(runs["warning"])]) == 0
    out = capsys.readouterr().out
    assert "[WARN] data.exact_duplicate train  (DataInspection)" in out and "0 fail, 1 warn" in out
    assert cli.main(["check", str(runs["warning"]), "--fail-on", "warn"]) == 1
    assert cli.main(["check", str(runs["failing"]), "--fail-on", "fail"]) == 1


def test_check_tree_of_runs_lists_every_run_worst_first_within_it(runs, capsys):
    assert cli.main(["check", str(runs["both"]), "--fail-on", "warn"]) == 1
    out = capsys.readouterr().out
    # Runs in natural order (version_2 before version_10), each with its own findings.
    assert out.index("Run tb/version_2") < out.index("Run tb/version_10")
    second = out[out.index("Run tb/version_10"):]
    assert second.index("[FAIL] initial_loss.mismatch") < second.index("[INFO]")
    assert "[WARN] data.exact_duplicate" in out[:out.index("Run tb/version_10")]
    assert "in 2 run(s): 1 fail, 1 warn" in out


def test_check_missing_dir_exits_2(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and "nope" in captured.err and captured.out == ""


def test_check_dir_without_findings_exits_2(tmp_path, capsys):
    with SummaryWriter(str(tmp_path / "run")) as w:  # a TensorBoard run, but no diagnostics
        w.add_scalar("loss", 1.0, 0)
    assert cli.main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no findings.jsonl" in err and "no run with lightning_diag callbacks" in err


@pytest.mark.parametrize("where", ["under_a_file", "a_directory", "deep_under_a_file"])
def test_report_into_a_place_it_cannot_write_is_one_line_exit_2(tmp_path, capsys, where):
    with SummaryWriter(str(tmp_path / "run")) as w:
        w.add_scalar(curve("loss"), 1.0, 0)
    (tmp_path / "afile").write_text("not a folder")
    out = {"under_a_file": tmp_path / "afile" / "r.html", "a_directory": tmp_path / "run",
           "deep_under_a_file": tmp_path / "afile" / "deeper" / "r.html"}[where]
    assert cli.main(["report", str(tmp_path / "run"), "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    (line,) = captured.err.splitlines()
    assert line.startswith(f"lightning-diag report: cannot write the report to '{out}': ")
    assert line.endswith("(pass -o a file in a folder you can write).")
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_report_of_a_file_is_not_a_directory(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert cli.main(["report", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err == (f"lightning-diag report: log directory "
                                       f"'{tmp_path / 'afile'}' is not a directory.\n")


def test_demo_into_a_place_it_cannot_write_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert cli.main(["demo", "--out", str(tmp_path / "afile" / "runs")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"lightning-diag demo: cannot write to --out "
                    f"'{tmp_path / 'afile' / 'runs'}': Not a directory.")
