"""The HTML report: sections from documented tags, findings parsed, robust to empty logdirs,
and a real render in headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_diag.findings import Finding, Severity
from lightning_diag.report.build import build_report, parse_findings_table
from lightning_diag.tensorboard.writer import log_histogram_counts

TABLE_HEAD = "| severity | code | message | advice |\n|---|---|---|---|\n"


def _table(*findings: Finding) -> str:
    return TABLE_HEAD + "\n".join(f.to_markdown_row() for f in findings)


def _finding(code: str, sev: Severity, msg: str, advice: str = "") -> Finding:
    return Finding(check="X", code=code, severity=sev, message=msg, advice=advice)


def write_full_logdir(path: Path) -> Path:
    """One run logging every documented tag family, as the callbacks do."""
    run = path / "tb" / "version_0"
    with SummaryWriter(str(run)) as w:
        w.add_text("diagnostics/InitialLossCheck", _table(_finding(
            "initial_loss.mismatch", Severity.FAIL, "Initial loss 9.1 is outside [2.07, 2.53].",
            "Scale down the last layer | check init.")), 0)
        w.add_text("diagnostics/DataInspection", _table(
            _finding("data.leakage", Severity.WARN, "12 train samples also in val.", "Remove."),
            _finding("data.summary", Severity.INFO, "1437 samples, 10 classes.")), 0)
        w.add_scalar("diagnostics/InitialLossCheck/initial_loss.mismatch", 9.1, 0)
        w.add_scalar("diag/initial_loss/loss", 9.1, 0)
        for epoch in range(4):
            w.add_scalar("diag/curves/loss/train", 2.3 / (epoch + 1), epoch)
            w.add_scalar("diag/curves/loss/val", 2.4 / (epoch + 1), epoch)
            w.add_scalar("diag/curves/acc/train", 0.2 * epoch, epoch)
            w.add_scalar("diag/curves/acc/val", 0.18 * epoch, epoch)
            w.add_scalar("diag/curves/acc_gap", 0.02 * epoch, epoch)
            w.add_scalar("diag/ema/val_acc", 0.2 * epoch + 0.01, epoch)
            w.add_scalar("val_acc_ema", 0.2 * epoch + 0.01, epoch)
            w.add_scalar("val_acc", 0.2 * epoch, epoch)
            w.add_scalar("custom/thing", float(epoch), epoch)
        for step in range(0, 50, 10):
            for layer in ("net.0", "net.3"):
                w.add_scalar(f"diag/activations/mean/{layer}", 0.1 * step, step)
                w.add_scalar(f"diag/activations/dead_fraction/{layer}", 0.01, step)
                w.add_scalar(f"diag/update_ratio/{layer}.weight", 1e-3 * (1 + step / 50), step)
            w.add_scalar("diag/update_ratio/median", 1.2e-3, step)
            log_histogram_counts(w, "diag/activations/act/net.0", torch.randn(500), step)
        rng = np.random.default_rng(0)
        w.add_image("diag/first_layer/filters", rng.random((3, 24, 24)), 0)
        w.add_image("diag/data/flagged/exact_duplicate", rng.random((3, 16, 32)), 0)
        w.add_text("diag/data/summary", "| count | n |\n|---|---|\n| duplicates | 12 |", 0)
        for name, val in (("member_0/val_acc", 0.95), ("member_1/val_acc", 0.96),
                          ("ensemble/val_acc", 0.97)):
            w.add_scalar(f"diag/ensemble/{name}", val, 10)
        w.add_text("diag/tuning/search", "| lr | wd | val_acc |\n|---|---|---|\n| 1e-3 | 0 | 0.9 |")
        w.add_scalar("diag/tuning/sweep/lr_0.001", 1.0, 0)
    return run


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"] or "")
        if tag == "img":
            self.images.append(a["src"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Collect:
    p = _Collect()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_parse_findings_table_roundtrips_finding_rows():
    f = _finding("a.b", Severity.WARN, "x | y\nz", "do it")
    assert parse_findings_table(_table(f)) == [("WARN", "a.b", "x | y z", "do it")]
    assert parse_findings_table(_table(_finding("c", Severity.INFO, "m"))) == [
        ("INFO", "c", "m", "")]
    assert parse_findings_table("no table here") == []


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    """The report of a run with every documented tag family (built once: it is the slow part)."""
    root = tmp_path_factory.mktemp("full")
    write_full_logdir(root)
    return build_report(root, root / "r.html")


def test_full_report_has_every_section_and_embedded_images(full_report):
    out = full_report
    page = _parse(out)
    assert page.sections == ["findings", "data", "before", "curves", "activations",
                             "update_ratio", "first_layer", "ema", "ensemble", "tuning", "other"]
    assert page.images and all(src.startswith("data:image/") for src in page.images)
    for src in page.images:  # every image is a decodable PNG
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    html = out.read_text()
    # Findings sorted FAIL before WARN before INFO, advice kept, escaped pipe restored.
    assert html.index("initial_loss.mismatch") < html.index("data.leakage") < html.index(
        "data.summary")
    assert "Scale down the last layer | check init." in html
    assert "custom/thing" in html  # generic fallback
    assert "<td>duplicates</td>" in html  # markdown text table rendered
    assert "http://" not in html and "https://" not in html  # self-contained


def test_partial_logdir_shows_only_present_sections(tmp_path):
    with SummaryWriter(str(tmp_path / "v0")) as w:
        for e in range(3):
            w.add_scalar("diag/curves/loss/train", 1.0 / (e + 1), e)
    page = _parse(build_report(tmp_path))
    assert page.sections == ["curves"]
    assert (tmp_path / "report.html").exists()


def test_several_runs_are_labelled(tmp_path):
    for name in ("clean", "inject"):
        with SummaryWriter(str(tmp_path / name / "version_0")) as w:
            w.add_text("diagnostics/C", _table(_finding(f"{name}.x", Severity.WARN, "m")), 0)
            w.add_scalar("train_loss", 1.0, 0)
    html = build_report(tmp_path).read_text()
    assert "clean/version_0" in html and "inject/version_0" in html
    assert "clean.x" in html and "inject.x" in html


def test_empty_and_missing_logdirs(tmp_path):
    page = _parse(build_report(tmp_path))
    assert page.sections == ["empty"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nope")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


_CHECK_JS = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const d = document.createElement('div'); d.id = 'img-check';
  d.textContent = ok + '/' + imgs.length; document.body.appendChild(d);
});</script></body>"""


def test_report_renders_in_headless_chromium(full_report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install -y chromium)")
    report = full_report
    probe = tmp_path / "probe.html"  # the report plus a script counting decoded images
    probe.write_text(report.read_text().replace("</body>", _CHECK_JS))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120, env=env, check=True).stdout
    m = re.search(r'<div id="img-check">(\d+)/(\d+)</div>', dom)
    assert m, dom[-500:]
    loaded, total = int(m.group(1)), int(m.group(2))
    assert total >= 8 and loaded == total
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri()],
                   capture_output=True, timeout=120, env=env, check=True)
    from matplotlib.image import imread

    pixels = imread(str(shot))
    assert pixels.shape[0] > 100 and pixels.std() > 0.05  # not a blank page
