"""A new callback is complete when every place that must know it does, and these tests say which.

What a new check must add by hand, each enforced by a test that fails until it is there
(docs/architecture.md, "Where a new check goes"): its callback exported in
``callbacks/__init__.py`` (``tests/test_exports.py``), its codes (``tests/test_codes.py``),
its tags (``tests/test_tags.py``), and the ``SHARED`` declaration of its test file (here).
Everything else is derived, and checked here: the package's exports, the docs' nav, a page for
a callback without one, the code and tag tables of the docs.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import yaml

import lightning_diag.callbacks as callbacks
from lightning_diag import codes
from lightning_diag.markdown import replace_between
from lightning_diag.tensorboard import tags
from tests import shared_cases

ROOT = Path(__file__).resolve().parents[1]


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hook", ROOT / "docs/hooks/generated.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hook = _hook()


def _nav() -> list:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]


def _section(nav: list) -> list:
    return next(e[hook.SECTION] for e in nav if isinstance(e, dict) and hook.SECTION in e)


# -- the shared tests' declarations ---------------------------------------------------------

def test_every_callback_declares_its_shared_test_arguments() -> None:
    missing = shared_cases.missing()
    assert not missing, (
        f"declare SHARED = Shared(...) (tests/shared_cases.py) in the test file of {missing}: "
        f"{[shared_cases.declaring_module(getattr(callbacks, n)) for n in missing]}")


def test_a_test_file_without_its_declaration_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    before = set(shared_cases.missing())
    module = importlib.import_module(shared_cases.declaring_module(callbacks.EMAWeights))
    monkeypatch.delattr(module, "SHARED")
    assert set(shared_cases.missing()) == before | {"EMAWeights"}
    assert "EMAWeights" not in shared_cases.declared()


# -- the docs -------------------------------------------------------------------------------

def test_the_built_nav_lists_every_callback_once() -> None:
    section = _section(hook.complete_nav(_nav()))
    pages = [page for entry in section for page in entry.values()]
    assert set(hook.callback_pages().values()) <= set(pages)
    assert len(pages) == len(set(pages))


def test_a_callback_missing_from_the_nav_is_added() -> None:
    nav = _nav()
    section = _section(nav)
    section[:] = [e for e in section if "EMAWeights" not in e]
    assert {"EMAWeights": "callbacks/ema.md"} in _section(hook.complete_nav(nav))


def test_every_callback_has_a_page_written_or_generated() -> None:
    for name, page in hook.callback_pages().items():
        if not (ROOT / "docs" / page).exists():
            text = hook.generated_page(name)
            assert text.startswith(f"# {name}\n") and "::: lightning_diag.callbacks." in text


def test_a_generated_page_holds_the_docstring_the_codes_and_the_tags() -> None:
    text = hook.generated_page("UpdateRatioMonitor")
    assert "::: lightning_diag.callbacks.update_ratio.UpdateRatioMonitor" in text
    assert all(f"`{s.code}`" in text for s in codes.declared_codes("UpdateRatioMonitor"))
    assert all(f"`{s.pattern}`" in text for s in tags.declared("UpdateRatioMonitor"))


@pytest.mark.parametrize(("page", "begin", "end", "table"), [
    ("codes.md", codes._BEGIN, codes._END, codes.code_table),
    ("tensorboard.md", tags._BEGIN, tags._END, tags.tag_table),
])
def test_the_built_pages_hold_the_generated_tables_and_the_sources_only_markers(
        page: str, begin: str, end: str, table: object) -> None:
    source = (ROOT / "docs" / page).read_text(encoding="utf-8")
    inside = source[source.index(begin) + len(begin):source.index(end)]
    assert not inside.strip(), (
        f"docs/{page} holds a copy of the generated table: remove it (between the markers); "
        "the docs build generates it")
    built = hook.fill_tables(page, source)
    assert callable(table)
    assert built == replace_between(source, begin, end, table())
    if page == "codes.md":
        assert all(f"`{s.code}`" in built for s in codes.CODES)
    else:
        assert all(f"`{s.pattern}`" in built for s in tags.TAGS)


def test_other_pages_are_left_as_written() -> None:
    assert hook.fill_tables("index.md", "# x\n") == "# x\n"
