"""The HTML report of a real run of every callback: the sections it fills, the findings table
read from the runs' findings.jsonl, nothing logged dropped; robust to empty logdirs; a real
render in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_diag.findings import FINDINGS_FILE, Finding, Severity, append_findings
from lightning_diag.report.build import build_report
from lightning_diag.tensorboard import tags
from lightning_diag.tensorboard.events import load_runs
from tests.real_run import LEAKED_TRAIN_INDEX, TRAIN_DUPLICATE

#: What the test model and Lightning log themselves: the report's "other" section.
USER_SCALARS = {"train_loss", "train_acc", "val_loss", "val_acc", "epoch"}


class _Section:
    def __init__(self) -> None:
        self.alts: list[str] = []  # of embedded images: plots name what they draw
        self.srcs: list[str] = []
        self.captions: list[str] = []  # of logged images
        self.headings: list[str] = []  # h3/h4: texts, groups
        self.cells: list[str] = []  # of every table
        # of the findings table: severity, (run,) code, check, message (a line "indices: ..."
        # under it when listed), advice, value, expected, step
        self.rows: list[list[str]] = []


class _Collect(HTMLParser):
    """The report's sections in order, each with what it shows."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, _Section] = {}
        self._section: _Section | None = None
        self._capture: str | None = None  # the element whose text is being read
        self._text = ""
        self._findings = False
        self._body = False  # in a table's body

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self._section = self.sections.setdefault(a["id"] or "", _Section())
        s = self._section
        if s is None:
            return
        if tag == "img":
            s.alts.append(a["alt"] or "")
            s.srcs.append(a["src"] or "")
        if tag == "table":
            self._findings = a.get("class") == "findings"
        if tag == "tr" and self._findings and self._body:
            s.rows.append([])
        if tag == "tbody":
            self._body = True
        if tag in ("figcaption", "h3", "h4", "td"):
            self._capture, self._text = tag, ""
        if self._findings and self._capture == "td" and s.rows:
            if a.get("class") == "check":  # the check under the code: a cell of its own
                s.rows[-1].append(self._text.strip())
                self._text = ""
            elif a.get("class") == "idx":
                self._text += "\n"

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._body = False
        s = self._section
        if s is None or tag != self._capture:
            return
        text, self._capture = self._text.strip(), None
        if tag == "figcaption":
            s.captions.append(text.split(" \u00b7 ")[0])
        elif tag == "td":
            s.cells.append(text)
            if self._findings and s.rows:
                s.rows[-1].append(text)
        else:
            s.headings.append(text.split(" step ")[0].strip())

    def handle_data(self, data: str) -> None:
        if self._capture:
            self._text += data


def _parse(path: Path) -> _Collect:
    p = _Collect()
    p.feed(path.read_text(encoding="utf-8"))
    return p


@pytest.fixture(scope="module")
def full_report(real_run, tmp_path_factory) -> Path:
    """The report of the real run (built once: it is the slow part)."""
    return build_report(real_run.root, tmp_path_factory.mktemp("report") / "r.html")


def test_a_real_run_fills_every_section_with_embedded_images(full_report):
    page = _parse(full_report)
    # no "other": the model's own metrics are its learning curves, `epoch` their x-axis; a
    # tag group no section shows (a new check's) gets a section of its own, after them
    shown = ["findings", "data", "before", "curves", "activations", "update_ratio",
             "first_layer", "ema", "ensemble"]
    assert list(page.sections)[:len(shown)] == shown
    assert set(list(page.sections)[len(shown):]) <= set(tags.ROOTS)
    srcs = [src for s in page.sections.values() for src in s.srcs]
    assert len(srcs) >= 19 and all(src.startswith("data:image/png;base64,") for src in srcs)
    for src in srcs:  # every image is a decodable PNG
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    s = page.sections
    assert {tags.DATA_SUMMARY} <= set(s["data"].headings)
    assert {tags.DATA_CLASS_COUNTS, tags.data_grid("leakage_train_vs_validation"),
            tags.data_grid("exact_duplicates")} <= set(s["data"].captions)
    assert tags.GRADIENT_CHECK_ERRORS in s["before"].headings
    assert "net.0.weight" in s["before"].cells  # the per-tensor error table
    assert any("loss" in alt for alt in s["before"].alts)  # the overfitting curve
    assert "Histograms (last logged step)" in s["activations"].headings
    assert tags.FIRST_LAYER_FILTERS in s["first_layer"].captions
    assert tags.CURVES_FIGURE in s["curves"].captions
    assert {"val_acc", "val_loss"} <= {t for alt in s["ema"].alts for t in alt.split(", ")}
    assert s["ensemble"].captions == [tags.ENSEMBLE_FIGURE]
    html = full_report.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained


def test_findings_table_shows_each_recorded_finding_fail_first(full_report, real_run):
    rows = _parse(full_report).sections["findings"].rows
    found = [f for cb in real_run.callbacks for f in cb.findings]
    assert len(rows) == len(found) >= 10  # one row per finding, none dropped or merged
    order = [r[0] for r in rows]
    assert order == sorted(order, key=["FAIL", "WARN", "INFO"].index)
    checks = [r for r in rows if not r[1].startswith("diagnosis.")]  # the diagnosis heads
    assert rows[:len(rows) - len(checks)] == [r for r in rows if r not in checks]
    assert {r[1] for r in checks[:2]} == {"data.leakage", "overfit.not_reached"}
    # severity, code, check, message (and indices), advice, value, expected, step
    by_code = {r[1]: r for r in rows}

    def one(code: str) -> Finding:
        return next(f for f in found if f.code == code)

    leak = by_code["data.leakage"]
    message, indices = leak[3].split("\n")
    assert leak[2] == "DataInspection" and message == one("data.leakage").message
    # a fraction of the validation set, shown as a percentage (lightning_diag.presentation)
    assert leak[5:] == [f"{100 * one('data.leakage').value:.4g}%", "0%", "0"]
    assert indices == "indices: " + ", ".join(map(str, one("data.leakage").indices))
    assert str(LEAKED_TRAIN_INDEX) in indices.removeprefix("indices: ").split(", ")
    low, high = one("initial_loss.ok").expected  # type: ignore[misc]
    assert by_code["initial_loss.ok"][5:7] == [f"{one('initial_loss.ok').value:.4g}",
                                               f"[{low:.4g}, {high:.4g}]"]
    underfit = one("advisor.underfit")
    assert underfit.step and underfit.epoch  # found after training started
    assert by_code["advisor.underfit"][7] == str(underfit.step)
    train_duplicates = next(r for r in rows if r[1] == "data.exact_duplicate")  # then val's
    assert train_duplicates[3].split("\n")[1] == "indices: " + ", ".join(
        map(str, TRAIN_DUPLICATE))
    assert by_code["data.summary"][5:7] == ["-", "-"]  # no number: nothing invented


def test_sibling_runs_are_series_of_their_run_not_runs(real_run):
    data = load_runs(real_run.root)
    assert data.runs == ["tb/version_0"]
    for tag, series in ((tags.curve("loss"), {tags.TRAIN_RUN, tags.VALIDATION_RUN}),
                        (tags.UPDATE_RATIO_MEDIAN, {"", tags.GUIDE_RUN}),
                        (tags.ema_comparison("val_acc"), {tags.VALIDATION_RUN, tags.EMA_RUN})):
        assert {(s.run, s.series) for s in data.scalars[tag]} == {
            ("tb/version_0", name) for name in series}, tag


def test_nothing_logged_is_dropped(full_report, real_run):
    page = _parse(full_report)
    data = load_runs(real_run.root)
    shown_texts = {h for s in page.sections.values() for h in s.headings}
    captions = {c for s in page.sections.values() for c in s.captions}
    findings = [t for t in data.texts if t.startswith(tags.FINDINGS.prefix)]
    assert findings and not shown_texts & set(findings)  # shown as the findings table
    assert set(data.texts) - set(findings) <= shown_texts
    # the first screen's card is TensorBoard's copy of the findings, as the table is
    assert set(data.images) - {tags.FINDINGS_CARD} <= captions
    # each tag of lightning_diag in its own section; the model's own metrics are the ones
    # LearningCurves read (drawn as its curves, not again), and `epoch` is their x-axis
    assert "other" not in page.sections
    read = {name for cb in real_run.callbacks for f in cb.findings if f.code == "curves.keys"
            for name in f.details["keys"].values()}
    assert USER_SCALARS & set(data.scalars) == read | {"epoch"}


def test_partial_logdir_shows_only_present_sections(tmp_path):
    with SummaryWriter(str(tmp_path / "v0")) as w:
        for e in range(3):
            w.add_scalar(tags.curve("loss"), 1.0 / (e + 1), e)
    page = _parse(build_report(tmp_path))
    assert list(page.sections) == ["curves"]
    assert (tmp_path / "report.html").exists()


def test_several_runs_are_labelled(tmp_path):
    for name in ("clean", "inject"):
        run = tmp_path / name / "version_0"
        append_findings(run / FINDINGS_FILE, [Finding("C", f"{name}.x", Severity.WARN, "m")])
        with SummaryWriter(str(run)) as w:
            w.add_scalar("train_loss", 1.0, 0)
    rows = _parse(build_report(tmp_path)).sections["findings"].rows
    assert sorted((r[1], r[2]) for r in rows) == [("clean/version_0", "clean.x"),
                                                  ("inject/version_0", "inject.x")]


def test_findings_without_events_and_tables_without_findings(tmp_path):
    append_findings(tmp_path / "csv" / FINDINGS_FILE,
                    [Finding("C", "c.nan", Severity.FAIL, "NaN loss", value=float("nan"))])
    page = _parse(build_report(tmp_path / "csv"))
    assert list(page.sections) == ["findings"] and page.sections["findings"].rows[0][5] == "NaN"
    with SummaryWriter(str(tmp_path / "old")) as w:  # a run from before findings.jsonl
        w.add_text(tags.FINDINGS_TABLE, "| severity |\n|---|\n| WARN |", 0)
    html = build_report(tmp_path / "old").read_text()
    assert "have no findings.jsonl" in html and "Other" not in html


def test_empty_and_missing_logdirs(tmp_path):
    page = _parse(build_report(tmp_path))
    assert list(page.sections) == ["empty"]
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


#: Measures, after layout, every findings row's badge, code and step cell, and the page width:
#: written into the page as JSON for ``--dump-dom`` to bring back.
_LAYOUT_JS = """<script>window.addEventListener('load', () => {
  const lines = (el) => {  // line boxes of el's content, and their height in line heights
    const range = document.createRange(); range.selectNodeContents(el);
    const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
    const style = getComputedStyle(el);
    const lh = parseFloat(style.lineHeight) || 1.2 * parseFloat(style.fontSize);
    return [tops.size, range.getBoundingClientRect().height / lh];
  };
  const rows = [...document.querySelectorAll('table.findings tbody tr')].map(tr => ({
    badge: lines(tr.querySelector('.sev')), code: lines(tr.querySelector('code.code')),
    step: lines(tr.lastElementChild),
    idx: tr.querySelector('.idx') ? lines(tr.querySelector('.idx')) : [1, 1],
    height: tr.getBoundingClientRect().height}));
  const out = document.createElement('pre'); out.id = 'layout';
  out.textContent = JSON.stringify({rows, page: document.documentElement.scrollWidth,
                                    view: window.innerWidth});
  document.body.appendChild(out);
});</script></body>"""


def _worst_case_findings(tmp_path: Path, real_run) -> Path:
    """A run folder holding the real run's findings and the hardest ones to lay out."""
    run = tmp_path / "tb" / "version_0"
    found = [f for cb in real_run.callbacks for f in cb.findings]
    path = "/".join(["a_rather_long_folder_name"] * 6) + "/advisor_divergence_step1.pt"
    found += [
        Finding("DataInspection", "data.exact_duplicate", Severity.WARN,
                "400 group(s) of identical inputs: 800 samples, 400 redundant.",
                advice="Remove the copies.", value=400.0, expected=0.0, indices=range(800)),
        Finding("LRPlateauAdvisor", "advisor.divergence", Severity.FAIL,
                f"Step loss jumped to nan. Batch saved to {path}.", value=float("nan"),
                expected=(0.0, 89.27777), step=123456),
        Finding("UpdateRatioMonitor", "update_ratio.too_high", Severity.WARN, "Median 1.31.",
                value=1.31, expected=(1e-5, 0.2), step=1,
                details={"steps": list(range(1, 240000, 2400))}),
    ]
    append_findings(run / FINDINGS_FILE, found)
    return build_report(run, tmp_path / "worst.html")


@pytest.mark.parametrize("width", [1024, 1400])
def test_findings_table_layout_in_headless_chromium(real_run, tmp_path, width):
    """Badges, codes and steps sit on one line; message and advice wrap; long index lists do
    not make rows tall; the page does not scroll sideways."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (`make browser`, or apt-get install chromium)")
    report = _worst_case_findings(tmp_path, real_run)
    probe = tmp_path / "layout.html"
    probe.write_text(report.read_text().replace("</body>", _LAYOUT_JS))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             f"--window-size={width},1000", "--run-all-compositor-stages-before-draw",
             "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(flags, capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "HOME": str(tmp_path)}).stdout
    m = re.search(r'<pre id="layout">(.*?)</pre>', dom, re.S)
    assert m, dom[-500:]
    layout = json.loads(unescape(m.group(1)))
    rows = layout["rows"]
    assert len(rows) >= 13
    for part in ("badge", "code", "step"):
        bad = [(i, r[part]) for i, r in enumerate(rows) if r[part][0] != 1 or r[part][1] >= 1.5]
        assert bad == [], (part, width)
    assert max(r["idx"][0] for r in rows) <= 3  # 800 indices: a few shown, the rest counted
    assert layout["page"] <= layout["view"]  # nothing pushed past the right edge


def test_one_run_is_named_after_its_folder(tmp_path):
    run = tmp_path / "inject" / "version_0"
    append_findings(run / FINDINGS_FILE, [Finding("C", "c.x", Severity.WARN, "m")])
    with SummaryWriter(str(run)) as w:
        w.add_scalar("train_loss", 1.0, 0)
    text = build_report(run).read_text()
    assert "<title>lightning_diag report: inject/version_0</title>" in text
    assert "runs: inject/version_0 " in text and "runs: . " not in text
    folder = build_report(tmp_path / "inject", tmp_path / "r.html").read_text()  # of runs
    assert "<title>lightning_diag report: inject</title>" in folder


#: Text anyone who can write to the log directory can plant (TensorBoard text is markdown):
#: links of every form with a scheme that runs code, obfuscated as filters are usually fooled,
#: and raw HTML that runs code by itself.
PAYLOADS = [
    "[a](javascript:alert(1))",
    "[a](JaVaScRiPt:alert(1))",
    "[a](&#106;avascript:alert(1))",
    "[a](&#x6A;avascript&#x3A;alert(1))",
    "[a](javascript&colon;alert(1))",
    "[a](java\tscript:alert(1))",
    "[a](java&#9;script:alert(1))",
    "[a](\x01javascript:alert(1))",
    "[a](\x00javascript:alert(1))",
    "[a](<javascript:alert(1)>)",
    "[a]( javascript:alert(1) )",
    "[a](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[a](DATA:text/html,<script>alert(1)</script>)",
    "[a](vbscript:msgbox(1))",
    "[a](VBScript:msgbox(1))",
    "![i](javascript:alert(1))",
    "![i](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+)",
    "[a][r]\n\n[r]: javascript:alert(1)",
    "[a][r]\n\n[r]: <JAVASCRIPT:alert(1)>",
    "![i][r]\n\n[r]: data:text/html,x",
    "[a][r]\n\n[r]: vbscript:msgbox(1)",
    "<javascript:alert(1)>",
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<IMG SRC=\"jav&#x09;ascript:alert(1)\">",
    "<svg onload=alert(1)><circle r=5/></svg>",
    "<svg><a xlink:href='javascript:alert(1)'><text>x</text></a></svg>",
    '<a href="javascript:alert(1)">x</a>',
    '<a href="jav&#x0A;ascript:alert(1)">x</a>',
    '<a href=" &#14; javascript:alert(1)">x</a>',
    '<iframe src="javascript:alert(1)"></iframe>',
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    '<div style="background:url(javascript:alert(1))">x</div>',
    '<form action="javascript:alert(1)"><button formaction="javascript:alert(1)">x</button>'
    "</form>",
    '<object data="data:text/html,x"></object><embed src="javascript:alert(1)">',
    '<a href="#" onclick="alert(1)">x</a><p onmouseover=alert(1)>p</p>',
    "<base href=\"javascript:/\"><meta http-equiv=refresh content='0;url=javascript:alert(1)'>",
    '<details open ontoggle=alert(1)>x</details>',
    "| a | b |\n|---|---|\n| [c](javascript:alert(1)) | <img src=x onerror=alert(1)> |",
]

#: What markdown (with tables) makes: the only elements logged text may bring into the report.
SAFE_TAGS = {"p", "a", "img", "em", "strong", "code", "pre", "blockquote", "ul", "ol", "li",
             "h1", "h2", "h3", "h4", "h5", "h6", "hr", "br", "table", "thead", "tbody", "tr",
             "th", "td", "div", "small"}
_URL_ATTRIBUTES = {"href", "src", "action", "formaction", "xlink:href", "data", "srcset",
                   "background", "poster", "content"}


class _Untrusted(HTMLParser):
    """The elements and attributes inside the report's logged-text blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # inside <div class='text'>
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.depth or ("class", "text") in attrs:
            self.tags.add(tag)
            self.attrs += [(tag, k, v or "") for k, v in attrs]
            self.depth += tag == "div"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.depth:
            self.tags.add(tag)
            self.attrs += [(tag, k, v or "") for k, v in attrs]

    def handle_endtag(self, tag: str) -> None:
        if self.depth and tag == "div":
            self.depth -= 1


def _scheme(url: str) -> str:
    """The scheme a browser reads in ``url`` (entities already decoded): it drops leading and
    trailing controls and spaces and every tab and newline inside, and ignores case."""
    url = re.sub(r"[\t\n\r]", "", url.strip("".join(map(chr, range(0x21)))))
    m = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*):", url)
    return m.group(1).lower() if m else ""


def _unsafe(page: str) -> list[tuple[str, str, str]]:
    found = _Untrusted()
    found.feed(page)
    bad = [("tag", t, "") for t in sorted(found.tags - SAFE_TAGS)]
    for tag, name, value in found.attrs:
        if name.startswith("on") or (name == "style" and "url" in value.lower()):
            bad.append((tag, name, value))
        if name in _URL_ATTRIBUTES and _scheme(value) not in ("", "http", "https"):
            bad.append((tag, name, value))
    return bad


@pytest.mark.parametrize("payload", PAYLOADS)
def test_logged_text_cannot_bring_a_live_link_or_script(payload: str) -> None:
    from lightning_diag.report.html import markdown_html

    assert _unsafe(f"<div class='text'>{markdown_html(payload)}</div>") == []


def test_logged_text_in_a_report_is_sanitized_and_keeps_safe_links(tmp_path: Path) -> None:
    safe = "[anchor](#findings) [page](other/report.html) [web](https://example.org/x?a=1)"
    with SummaryWriter(str(tmp_path / "run")) as w:
        for i, payload in enumerate([*PAYLOADS, safe]):
            w.add_text(f"notes/{i:02d}", payload, 0)
        w.add_text("notes/table", "| x | y |\n|:--|--:|\n| **1** | `2` |", 0)
    page = build_report(tmp_path / "run").read_text()
    assert _unsafe(page) == []
    assert 'href="#findings"' in page and 'href="other/report.html"' in page
    assert 'href="https://example.org/x?a=1"' in page
    assert "<strong>1</strong>" in page and "<code>2</code>" in page  # markdown still renders
    assert page.count("<table>") >= 2 and "<th" in page


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every matplotlib figure the report embeds, with its alt text, as drawn."""
    from lightning_diag.report import canvas, html, sections

    drawn: list = []

    def keep(fig, alt, *args, **kwargs):
        drawn.append((fig, alt))
        return html.img(fig, alt, *args, **kwargs)

    monkeypatch.setattr(canvas, "img", keep)
    monkeypatch.setattr(sections, "img", keep)
    return drawn


def _legend_texts(fig) -> list[str]:
    """The entries of the figure's one legend (fig.legend, or the only axes legend)."""
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 1, legends
    return [t.get_text() for t in legends[0].get_texts()]


def _outside_every_plot(fig) -> bool:
    (legend,) = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    return not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes
                   if ax.get_visible())


LAYERS = [f"net.{i}_{kind}" for i, kind in enumerate(
    ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten",
     "Dropout", "Linear", "ReLU", "Linear"]) if kind not in ("Flatten", "Dropout")]


def _activations(run: Path, shift: float = 0.0) -> None:
    with SummaryWriter(str(run)) as w:
        for step in range(0, 50, 10):
            for i, layer in enumerate(LAYERS):
                for stat in ("mean", "std"):
                    w.add_scalar(tags.activation_stat(stat, layer), i + shift + step / 100, step)


def test_activation_legend_in_natural_order_outside_the_plots(tmp_path, figures):
    _activations(tmp_path / "run")
    build_report(tmp_path / "run")
    ((fig, _),) = [(f, a) for f, a in figures if "mean" in a.split(", ")]
    assert _legend_texts(fig) == LAYERS  # net.0 ... net.9, net.10, net.11: not net.0, net.10
    assert LAYERS[1] == "net.1_BatchNorm2d" and LAYERS[-2:] == ["net.10_ReLU", "net.11_Linear"]
    assert _outside_every_plot(fig)
    for ax in fig.axes:  # each layer one colour, the same in every chart
        colours = [line.get_color() for line in ax.get_lines()]
        assert len(set(map(str, colours))) == len(LAYERS)
    assert [str(line.get_color()) for line in fig.axes[0].get_lines()] == [
        str(line.get_color()) for line in fig.axes[1].get_lines()]


def test_two_runs_keep_a_legend_layers_by_colour_runs_by_style(tmp_path, figures):
    _activations(tmp_path / "clean" / "version_0")
    _activations(tmp_path / "inject" / "version_0", shift=0.5)
    build_report(tmp_path)
    ((fig, _),) = [(f, a) for f, a in figures if "mean" in a.split(", ")]
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 * len(LAYERS) == 20
    assert _legend_texts(fig) == [*LAYERS, "run clean/version_0", "run inject/version_0"]
    assert _outside_every_plot(fig)
    by_layer: dict[str, set] = {}
    for line in lines:
        by_layer.setdefault(str(line.get_color()), set()).add(line.get_linestyle())
    assert len(by_layer) == len(LAYERS) and all(s == {"-", "--"} for s in by_layer.values())


def _curves_run(run: Path) -> None:
    train, val = [2.0, 1.0, 0.5, 0.3], [2.1, 1.2, 0.7, 0.6]
    acc_train, acc_val = [0.3, 0.6, 0.8, 0.95], [0.3, 0.55, 0.7, 0.72]
    for sibling, loss, acc in ((tags.TRAIN_RUN, train, acc_train),
                               (tags.VALIDATION_RUN, val, acc_val)):
        with SummaryWriter(str(run / sibling)) as w:
            for epoch in range(4):
                w.add_scalar(tags.curve("loss"), loss[epoch], epoch)
                w.add_scalar(tags.curve("accuracy"), acc[epoch], epoch)
    from matplotlib.figure import Figure

    overview = Figure(figsize=(2, 2))
    overview.subplots().plot(train)
    with SummaryWriter(str(run)) as w:
        for epoch in range(4):
            w.add_scalar(tags.CURVES_GAP, acc_train[epoch] - acc_val[epoch], epoch)
            for step in (epoch * 10 + 9,):  # the model's own metrics, at global steps
                w.add_scalar("train_loss", train[epoch], step)
                w.add_scalar("val_loss", val[epoch], step)
                w.add_scalar("lr", 0.1 / (epoch + 1), step)
                w.add_scalar("epoch", epoch, step)
        w.add_figure(tags.CURVES_FIGURE, overview, 3)
    append_findings(run / FINDINGS_FILE, [Finding(
        "LearningCurves", "curves.keys", Severity.INFO, "Learning curves read `train_loss`.",
        details={"keys": {"train_loss": "train_loss", "val_loss": "val_loss"}})])


def test_learning_curves_drawn_once_with_the_gap_on_its_own_scale(tmp_path, figures):
    _curves_run(tmp_path / "run")
    page = build_report(tmp_path / "run").read_text()
    ((fig, _),) = [(f, a) for f, a in figures if a == "learning curves"]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "accuracy", "accuracy gap (train - val)"]
    accuracy = fig.axes[1]
    assert len(accuracy.get_lines()) == 2 and min(accuracy.get_lines()[0].get_ydata()) > 0.2
    assert _legend_texts(fig) == ["train", "validation"] and _outside_every_plot(fig)
    # LearningCurves' own drawing of the same curves is kept, folded: the curves show once
    curves = re.search(r"<section id='curves'>(.*?)</section>", page, re.S).group(1)
    assert curves.count("<img") == 2
    folded = re.search(r"<details>(.*?)</details>", curves, re.S).group(1)
    assert folded.count("<img") == 1 and tags.CURVES_FIGURE in folded


def test_other_scalars_hold_no_epoch_chart_and_name_the_curves_read(tmp_path, figures):
    _curves_run(tmp_path / "run")
    page = _parse(build_report(tmp_path / "run"))
    other = page.sections["other"]
    assert other.alts == ["lr"]  # not `epoch` (the x-axis), not train_loss/val_loss again
    html_text = (tmp_path / "run" / "report.html").read_text()
    note = re.search(r"<section id='other'>.*?<p class='note'>(.*?)</p>", html_text, re.S)
    assert note and "<code>train_loss</code>, <code>val_loss</code>" in note.group(1)
    ((fig, _),) = [(f, a) for f, a in figures if a == "lr"]
    assert fig.axes[0].get_xlabel() == "epoch" and not fig.legends


def _verdicts(page: str) -> list[str]:
    found = re.findall(r"<p class='verdict'>(.*?)</p>", page, re.S)
    return [re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", "", v))).strip() for v in found]


def test_every_run_gets_a_verdict_line_read_the_same_way(tmp_path):
    healthy = [Finding("DataInspection", "data.summary", Severity.INFO, "Data inspected."),
               Finding("InitialLossCheck", "initial_loss.ok", Severity.INFO, "Fine.")]
    broken = [Finding("Diagnosis", "diagnosis.summary", Severity.FAIL,
                      "2 likely root causes, in the order to fix them: (1) Data. (2) Rate."),
              Finding("DataInspection", "data.leakage", Severity.FAIL, "30 leaked.", value=30.0,
                      expected=0.0, step=0),
              Finding("UpdateRatioMonitor", "update_ratio.too_high", Severity.WARN, "High.")]
    one_check = [Finding("ActivationHistogram", "activations.dead_units", Severity.WARN,
                         "Dead.", value=0.9, expected=(0.0, 0.5), step=10, subject="net.5"),
                 Finding("ActivationHistogram", "activations.dead_units", Severity.WARN,
                         "Dead.", value=0.8, expected=(0.0, 0.5), step=10, subject="net.10"),
                 Finding("ActivationHistogram", "activations.summary", Severity.INFO, "Sum.")]
    for name, found in (("clean", healthy), ("inject", broken), ("one", one_check)):
        append_findings(tmp_path / name / FINDINGS_FILE, found)
    assert _verdicts(build_report(tmp_path / "clean").read_text()) == [
        "Verdict: OK no problem found by any of the 2 check(s) · 0 FAIL, 0 WARN, 2 INFO · "
        "findings"]
    assert _verdicts(build_report(tmp_path / "inject").read_text()) == [
        "Verdict: FAIL diagnosis.summary: 2 likely root causes, in the order to fix them: (1) "
        "Data. · 1 FAIL, 1 WARN, 0 INFO · findings"]  # the diagnosis sums up, is not counted
    assert _verdicts(build_report(tmp_path / "one").read_text()) == [
        "Verdict: WARN activations.dead_units net.5: dead units 90% (expected 0% to 50%) at step "
        "10 (and 1 more problem) · 0 FAIL, 2 WARN, 1 INFO · findings"]
    both = _verdicts(build_report(tmp_path, tmp_path / "all.html").read_text())
    assert [v.split(":")[0] for v in both] == [
        "Verdict for clean", "Verdict for inject", "Verdict for one"]
