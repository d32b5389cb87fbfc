"""The mkdocs hook for what the docs derive from the code instead of repeating it.

- The nav: every callback of ``lightning_diag.callbacks.__all__`` is under "Callbacks";
  those mkdocs.yml does not list (in recipe order) are added at the end of that section.
- A callback without a page of its own (``docs/callbacks/<module>.md``) gets one generated:
  its docstring (mkdocstrings), its finding codes and its TensorBoard tags.
- docs/codes.md's code table and docs/tensorboard.md's tag table are generated from the
  registries (``lightning_diag/codes.py``, ``lightning_diag/tensorboard/tags.py``) at build,
  between their marker lines; the pages in the repository hold the markers only.

``tests/test_docs_hook.py`` checks each, so a new callback needs no docs edit to be complete.
"""

from __future__ import annotations

from typing import Any

from lightning_diag import codes
from lightning_diag.markdown import markdown_table
from lightning_diag.tensorboard import tags

SECTION = "Callbacks"


def callback_pages() -> dict[str, str]:
    """Each callback's page: ``callbacks/<module>.md``, by class name, in ``__all__`` order."""
    import lightning_diag.callbacks as callbacks

    return {name: f"callbacks/{getattr(callbacks, name).__module__.rsplit('.', 1)[1]}.md"
            for name in callbacks.__all__}


def complete_nav(nav: list[Any]) -> list[Any]:
    """``nav`` (mkdocs.yml's) with every callback missing from its "Callbacks" section added."""
    section = next(entry[SECTION] for entry in nav
                   if isinstance(entry, dict) and SECTION in entry)
    listed = {page for entry in section for page in entry.values()}
    section.extend({name: page} for name, page in callback_pages().items() if page not in listed)
    return nav


def generated_page(name: str) -> str:
    """The page of the callback ``name`` when it has none: docstring, codes, tags."""
    import lightning_diag.callbacks as callbacks

    cls = getattr(callbacks, name)
    code_rows = [[f"`{s.code}`", s.lowest.name if s.lowest == s.highest
                  else f"{s.lowest.name}-{s.highest.name}", s.meaning]
                 for s in codes.declared_codes(name)]
    tag_rows = [[f"`{s.pattern}`", s.kind, s.condition or "always", s.description]
                for s in tags.declared(name)]
    return "\n\n".join([
        f"# {name}",
        f"::: {cls.__module__}.{name}",
        "## Finding codes",
        markdown_table(["code", "severity", "meaning"], code_rows),
        "## TensorBoard tags",
        markdown_table(["tag", "kind", "when", "what"], tag_rows),
    ]) + "\n"


def fill_tables(src_uri: str, markdown: str) -> str:
    """``markdown`` of the page ``src_uri`` with its generated table filled in, if it has one."""
    if src_uri == "codes.md":
        return codes.replace_table(markdown)
    if src_uri == "tensorboard.md":
        return tags.replace_table(markdown)
    return markdown


def on_config(config: Any) -> Any:
    complete_nav(config.nav)
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for name, page in callback_pages().items():
        if files.get_file_from_path(page) is None:
            files.append(File.generated(config, page, content=generated_page(name)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return fill_tables(page.file.src_uri, markdown)
