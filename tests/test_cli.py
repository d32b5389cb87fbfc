"""The `lightning-diag` command line: subcommands, argument forwarding and clear errors."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_diag import cli


def test_help_lists_the_three_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("demo", "report", "tune"))


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_report_command_writes_html(tmp_path, capsys):
    with SummaryWriter(str(tmp_path / "run")) as w:
        w.add_scalar("diag/curves/loss/train", 1.0, 0)
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
