"""MkDocs hooks: the pages that must not drift from the code are generated from it at build time.

- ``configuration.md``: one table per config section, from the same text ``mlabel train --help``
  prints (:func:`mlabel.config.describe_keys`: key, default, meaning, type and valid range).
- ``api.md``: one mkdocstrings block per name of ``mlabel.__all__``, at the module that defines it.
- The README's screenshots (``assets/*.png`` at the repository root) are published with the site,
  so ``../assets/x.png`` works on GitHub and in the built site alike.
"""
from __future__ import annotations

import html
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

CONFIG_MARKER = "<!-- generated: configuration keys -->"
API_MARKER = "<!-- generated: public API -->"
SCREENSHOTS = ("report-explorer.png", "report-galleries.png")


def on_files(files, config):
    """Publish the README's screenshots under ``assets/`` of the site."""
    for name in SCREENSHOTS:
        files.append(File(f"../assets/{name}", config["docs_dir"], config["site_dir"],
                          config["use_directory_urls"], dest_uri=f"assets/{name}",
                          inclusion=InclusionLevel.NOT_IN_NAV))  # set, or the ".*" rule drops "../" 
    return files


def on_page_markdown(markdown: str, page, config, files):
    """Expand the markers of the generated pages; a page that lost its marker fails the build."""
    generated = {"configuration.md": (CONFIG_MARKER, configuration_tables),
                 "api.md": (API_MARKER, api_blocks)}
    if page.file.src_uri not in generated:
        return markdown
    marker, build = generated[page.file.src_uri]
    if marker not in markdown:
        raise ValueError(f"{page.file.src_uri} must hold the line {marker}")
    return markdown.replace(marker, build())


def key_rows() -> list[tuple[str, str, str, str]]:
    """(key, default, meaning, type) per config key, cut from :func:`describe_keys`' lines."""
    from mlabel.config import all_keys, describe_keys
    keys = all_keys()
    lines = describe_keys().splitlines()
    if len(lines) != len(keys):
        raise ValueError(f"describe_keys printed {len(lines)} lines for {len(keys)} keys")
    rows = []
    for line, (key, (field, _)) in zip(lines, keys.items()):
        meaning = field.metadata.get("help", "")
        head, _, rest = line.strip().partition(" = ")
        cut = rest.find(f" {meaning} [")
        if head.strip() != key or cut < 0 or not rest.endswith("]"):
            raise ValueError(f"describe_keys' line for {key} has an unexpected shape: {line!r}")
        rows.append((key, rest[:cut].strip(), meaning, rest[cut + len(meaning) + 3:-1]))
    return rows


def _cell(text: str) -> str:
    """Plain text inside a Markdown table cell: no markup, no column breaks."""
    text = html.escape(text, quote=False).replace("|", "&#124;")
    for char in "\\*_[]`":
        text = text.replace(char, "\\" + char)
    return text


def configuration_tables() -> str:
    """One table per section (top level, model, data, ...), in the order ``--help`` lists them."""
    sections: dict[str, list] = {}
    for key, default, meaning, kind in key_rows():
        section = key.rpartition(".")[0] or "top level"
        sections.setdefault(section, []).append((key, default, meaning, kind))
    out = []
    for section, rows in sections.items():
        title = "Top-level keys" if section == "top level" else f"`{section}`"
        out += [f"## {title}", "", "| key | default | meaning | type and range |", "|---|---|---|---|"]
        out += [f"| `{key}` | {_cell(default)} | {_cell(meaning)} | {_cell(kind)} |"
                for key, default, meaning, kind in rows]
        out.append("")
    return "\n".join(out)


def api_blocks() -> str:
    """A mkdocstrings block per public name, read where the name is defined."""
    import mlabel
    out = []
    for name in mlabel.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(mlabel, name)
        out += [f"::: {obj.__module__}.{obj.__qualname__}", "    options:", "      show_root_heading: true",
                "      show_root_full_path: false", "      heading_level: 2", ""]
    return "\n".join(out)

