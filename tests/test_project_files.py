"""The files a user or a citation manager reads besides the code: LICENSE and CITATION.cff
agree with the package's metadata (setup.cfg, bnnconvert.__version__)."""

from __future__ import annotations

import ast
import builtins
import configparser
import re
from pathlib import Path

import yaml

import bnnconvert

ROOT = Path(__file__).resolve().parents[1]
PAPER = "Sparse Bayesian Networks: Efficient Uncertainty Quantification in Medical Image Analysis"


def _metadata() -> configparser.SectionProxy:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["metadata"]


def _citation() -> dict:
    return yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))


def test_license_is_the_one_setup_cfg_declares():
    assert _metadata()["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the bnnconvert authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_citation_cites_the_package_at_its_version():
    cff = _citation()
    for key in ("cff-version", "message", "title", "authors", "version", "license"):
        assert cff.get(key), f"CITATION.cff lacks {key!r}"
    assert cff["type"] == "software"
    assert str(cff["version"]) == bnnconvert.__version__, (
        "CITATION.cff's version differs from bnnconvert/_version.py; update it"
    )
    assert cff["license"] == _metadata()["license"]
    assert "bnnconvert" in cff["title"]


def test_citation_prefers_the_paper():
    paper = _citation()["preferred-citation"]
    assert paper["type"] == "conference-paper"
    assert paper["title"] == PAPER
    families = [author["family-names"] for author in paper["authors"]]
    assert families == ["Abboud", "Lombaert", "Kadoury"]
    assert paper["year"] == 2024
    assert "MICCAI 2024" in paper["collection-title"]


# --------------------------------------------------------------------------- README
def undefined_names(code: str) -> list[str]:
    """Names a script reads before any earlier statement binds them (imports, assignments,
    definitions, loop and with targets), statement by statement; names bound inside a
    statement's comprehensions, lambdas and functions count for that statement."""
    bound = set(dir(builtins))
    undefined: list[str] = []
    for statement in ast.parse(code).body:
        nodes = list(ast.walk(statement))
        local = {a.arg for a in nodes if isinstance(a, ast.arg)}
        local |= {
            n.id
            for c in nodes
            if isinstance(c, ast.comprehension)
            for n in ast.walk(c.target)
            if isinstance(n, ast.Name)
        }
        loads = [n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
        undefined += [name for name in loads if name not in bound | local]
        bound |= {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        bound |= {
            (a.asname or a.name).split(".")[0]
            for n in nodes
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        bound |= {n.name for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return sorted(set(undefined))


def test_undefined_names_finds_a_name_read_before_it_is_bound():
    assert undefined_names("print(x)\nx = 1\n") == ["x"]
    assert undefined_names("import a.b as c\nfrom d import e\ny = [i for i in c(e)]\n") == []
    assert undefined_names("def f(k):\n    return k + g\n") == ["g"]


def test_readme_has_a_pip_install_line_and_a_quick_start_that_defines_every_name():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r'^pip install "?bnnconvert', text, flags=re.M), "no pip install line"
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no Python quick start"
    assert undefined_names("\n".join(blocks)) == []
    assert "What to expect" in text


def test_readme_points_to_the_license_and_the_citation():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in ("LICENSE", "CITATION.cff"):
        assert f"]({target})" in text and (ROOT / target).is_file()
