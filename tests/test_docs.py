"""The documentation site builds strictly, and the README and the CLI reference stay in sync
with the docs folder and the real click commands."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

import bnnconvert
from bnnconvert.cli import data_options, main, model_options

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CLI_PAGE = DOCS / "cli.md"


def _nav_pages() -> list[str]:
    """The docs pages of mkdocs.yml's nav ({title: page.md} entries)."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    return [page for entry in config["nav"] for page in entry.values()]


# --------------------------------------------------------------------------- the site
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built by ``mkdocs build --strict`` (broken links, missing anchors and API
    references to names that do not exist are errors)."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return out


@pytest.mark.integration
def test_every_nav_page_is_built(site):
    pages = _nav_pages()
    assert "index.md" in pages and "api.md" in pages and "cli.md" in pages
    for page in pages:
        assert (DOCS / page).is_file(), f"mkdocs.yml lists {page}, which is not in docs/"
        built = site / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert built.is_file(), f"{page} was not built to {built}"


@pytest.mark.integration
def test_api_reference_documents_every_top_level_name(site):
    """mkdocstrings rendered a heading for each name of ``bnnconvert.__all__``."""
    html = (site / "api" / "index.html").read_text()
    anchors = set(re.findall(r'id="(bnnconvert\.[\w.]+)"', html))
    missing = [
        name for name in bnnconvert.__all__ if not any(a.endswith(f".{name}") for a in anchors)
    ]
    assert not missing, f"docs/api.md renders no heading for bnnconvert.{missing}"


# --------------------------------------------------------------------------- README
def test_readme_links_to_existing_docs_and_every_page():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\((docs/[^)#\s]*)(?:#[^)]*)?\)", text)
    assert targets, "the README links to no docs page"
    for target in targets:
        assert (ROOT / target).is_file(), f"README.md links to {target}, which does not exist"
    linked = {Path(t).name for t in targets}
    unlinked = [page for page in _nav_pages() if page not in linked]
    assert not unlinked, f"README.md does not link the docs pages {unlinked}"


def test_python_blocks_in_docs_and_readme_parse():
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)
        for block in blocks:
            try:
                ast.parse(block)
            except SyntaxError as exc:
                pytest.fail(f"a python block of {path.name} does not parse: {exc}\n{block}")


# --------------------------------------------------------------------------- CLI reference
def _listed_commands() -> list[str]:
    """The command names in the "Commands:" section of ``bnnconvert --help``."""
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    section = result.output.split("Commands:\n", 1)[1].split("\n\n", 1)[0]
    return [line.split()[0] for line in section.splitlines() if line.strip()]


def _sections(text: str) -> dict[str, str]:
    """{heading: its text up to the next heading of level 2} of a markdown page."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2])}


def _shared(decorator) -> dict[str, str | None]:
    """{option name: help} of the options a shared decorator adds."""
    params = decorator(lambda **kwargs: None).__click_params__
    return {name: p.help for p in params for name in (*p.opts, *p.secondary_opts)}


def _long_names(param: click.Parameter) -> list[str]:
    return [n for n in (*param.opts, *param.secondary_opts) if n.startswith("--")]


def test_cli_reference_lists_every_command_and_option():
    """Each command of ``bnnconvert --help`` has a section "## `bnnconvert NAME`" in
    docs/cli.md naming each of its options; options of the shared decorators may instead
    be documented once, in "Model options" / "Data options", linked from the section."""
    sections = _sections(CLI_PAGE.read_text())
    shared = {
        "Model options": ("#model-options", _shared(model_options)),
        "Data options": ("#data-options", _shared(data_options)),
    }
    for title, (_, names) in shared.items():
        for name in names:
            if name.startswith("--"):
                assert f"`{name}`" in sections[title], f"{name} missing from {title}"
    ctx = click.Context(main, info_name="bnnconvert")
    commands = _listed_commands()
    assert {"saliency", "convert", "train", "evaluate", "info"} <= set(commands)
    for name in commands:
        body = sections.get(f"`bnnconvert {name}`")
        assert body is not None, f"docs/cli.md has no section '## `bnnconvert {name}`'"
        command = main.get_command(ctx, name)
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            for option in _long_names(param):
                if f"`{option}`" in body:
                    continue
                link = next(
                    (a for a, names in shared.values() if names.get(option, 0) == param.help),
                    None,
                )
                assert link is not None and f"]({link})" in body, (
                    f"option {option} of `bnnconvert {name}` is not documented in its section "
                    "of docs/cli.md"
                )


def test_cli_reference_lists_the_global_options():
    body = _sections(CLI_PAGE.read_text())["Global options"]
    for param in main.params:
        for option in _long_names(param):
            assert f"`{option}`" in body, f"global option {option} missing from docs/cli.md"
