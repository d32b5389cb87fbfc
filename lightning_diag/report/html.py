"""HTML and figure primitives of the report (:mod:`lightning_diag.report`): PNGs as data URIs.

Example:
    >>> from matplotlib.figure import Figure
    >>> fig = Figure(); _ = fig.subplots().plot([0, 1], [1, 0])
    >>> img(fig, "a line").startswith("<img class='plot' src='data:image/png;base64,")
    True
"""

from __future__ import annotations

import base64
import html
import io

import markdown
import nh3
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lightning_diag.tensorboard.events import Histogram

__all__ = ["CSS", "bars", "img", "markdown_html", "section"]


def bars(ax: Axes, h: Histogram) -> None:
    # TensorBoard stores right edges only; the first bucket gets the width of its neighbour.
    # One filled step artist per histogram: ax.bar (one patch per bucket) was ~10x slower.
    limits = h.limits
    first = limits[0] - (limits[1] - limits[0]) if len(limits) > 1 else limits[0] - 1.0
    ax.stairs(h.counts, [first, *limits], fill=True, color="tab:blue")


def img(fig: Figure, alt: str, tight: bool = True, outside: bool = False) -> str:
    """``fig`` as an embedded PNG; ``outside``: the saved area grows to hold what lies outside
    the figure (a legend right of the plots)."""
    # tight_layout costs a full extra draw; grids of small multiples use fixed spacing instead.
    if tight:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight" if outside else None)
    src = base64.b64encode(buf.getvalue()).decode()
    return f"<img class='plot' src='data:image/png;base64,{src}' alt='{html.escape(alt, True)}'>"


#: The elements markdown (with tables) makes, the attributes they need, and the URL schemes a
#: link or image of logged text may use (relative URLs and in-document anchors pass too).
_TAGS = {"p", "a", "img", "em", "strong", "code", "pre", "blockquote", "ul", "ol", "li", "h1",
         "h2", "h3", "h4", "h5", "h6", "hr", "br", "table", "thead", "tbody", "tr", "th", "td"}
_ATTRIBUTES = {"a": {"href", "title"}, "img": {"src", "alt", "title"}, "th": {"style"},
               "td": {"style"}}
_SCHEMES = {"http", "https"}
_CLEANER = nh3.Cleaner(tags=_TAGS, attributes=_ATTRIBUTES, url_schemes=_SCHEMES,
                       filter_style_properties={"text-align"}, link_rel="noopener noreferrer")


def markdown_html(text: str) -> str:
    """Text logged to TensorBoard (markdown, as its Text dashboard reads it) as safe HTML.

    Anyone who can write to a log directory can log text, so the markdown's HTML goes through
    a maintained sanitizer (`nh3`, the bindings of Rust's ammonia, which parses like a browser)
    with an allow-list: the elements markdown makes, the attributes they need, and links and
    images to http(s), relative URLs and anchors only; ``javascript:``, ``data:``,
    ``vbscript:`` and every other scheme are dropped however they are written, and so are
    scripts, event handlers and any other raw HTML.

    Example:
        >>> print(markdown_html("**ok** [x](JavaScript:alert(1))<script>alert(1)</script>"))
        <p><strong>ok</strong> <a rel="noopener noreferrer">x</a></p>
        >>> print(markdown_html("[up](#top)"))
        <p><a href="#top" rel="noopener noreferrer">up</a></p>
        >>> 'href="../r.html"' in markdown_html("[r](../r.html)")
        True
        >>> print(markdown_html("![a](https://e.org/a.png) ![b](data:image/png,x)"))
        <p><img alt="a" src="https://e.org/a.png"> <img alt="b"></p>
    """
    return _CLEANER.clean(markdown.markdown(text, extensions=["tables"]))


def section(anchor: str, title: str, content: str) -> str:
    return f"<section id='{anchor}'><h2>{html.escape(title)}</h2>{content}</section>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
.meta{color:#666;font-size:.9em}nav ul{display:flex;flex-wrap:wrap;gap:.4em 1.2em;padding:0;
list-style:none}table{border-collapse:collapse;width:100%;font-size:.9em}
th,td{border:1px solid #ddd;padding:.35em .5em;vertical-align:top;text-align:left;
overflow-wrap:anywhere}
th{background:#f4f4f4}.sev{font-weight:bold;border-radius:3px;padding:0 .4em;color:#fff}
.sev-fail{background:#c62828}.sev-warn{background:#ef8f00}.sev-info{background:#1565c0}
.sev-ok{background:#2e7d32}.verdict{font-size:1.05em;margin:.4em 0}.vcounts{color:#666}
details summary{cursor:pointer;color:#555;font-size:.9em;margin:.4em 0}
tr.row-fail{background:#fdecea}tr.row-warn{background:#fff6e5}
.findings td{overflow-wrap:normal}.sev,.findings th,.findings .nw{white-space:nowrap}
.findings td.msg{overflow-wrap:anywhere;min-width:12em}.findings td.nw{width:1%}
.findings td.run{min-width:6em}
.findings .check,.findings .idx{color:#666;font-size:.85em}.findings .idx{margin-top:.3em}
.findings .check{white-space:normal;overflow-wrap:anywhere}
table.values{width:auto;margin:.5em 0}img.plot{max-width:100%;display:block;margin:.6em 0}
.gallery{display:flex;flex-wrap:wrap;gap:1em}.gallery figure{margin:0;max-width:100%}
.gallery img{max-width:100%;image-rendering:pixelated;min-width:160px;border:1px solid #eee}
figcaption,.note{font-size:.8em;color:#666}.text{overflow-x:auto}
"""
