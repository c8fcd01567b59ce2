"""The README and docs/: short, linked, and every generated block what its generator writes today.

scripts/docs_tables.py renders the methods table from fastattr.METHODS and each `<!-- bench:NAME -->` block
from benchmarks/results/NAME.json; `python scripts/docs_tables.py` rewrites whatever these tests find stale.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
LINKED = [*PAGES, ROOT / "examples" / "README.md", ROOT / "benchmarks" / "results" / "README.md"]


def _load_script():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_tables"] = module
    spec.loader.exec_module(module)
    return module


dt = _load_script()

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(text: str) -> list[str]:
    """Link and image targets outside code."""
    return LINK.findall(INLINE_CODE.sub("", FENCE.sub("", text)))


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _block(text: str, marker: str) -> str:
    match = re.search(rf"<!-- {re.escape(marker)} -->\n(.*?)<!-- /{re.escape(marker)} -->", text, re.S)
    assert match, f"no <!-- {marker} --> ... <!-- /{marker} --> block"
    return match.group(1)


def test_the_docs_pages_exist():
    names = {page.name for page in DOCS}
    assert {"methods.md", "transformers.md", "serving.md", "export.md", "performance.md", "internals.md"} <= names


def test_methods_table_is_what_docs_tables_renders_from_the_registry():
    assert _block((ROOT / "docs" / "methods.md").read_text(), "methods-table") == dt.methods_table(), (
        "docs/methods.md's methods table is stale: run .venv/bin/python scripts/docs_tables.py")


def test_methods_table_has_one_row_per_registered_method():
    from fastattr import METHODS

    table = dt.methods_table()
    for name in METHODS:
        assert f"| `{name}` |" in table


def test_readme_fits_in_260_lines():
    assert len(README.read_text().splitlines()) <= 260


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    text = page.read_text()
    broken = []
    for target in _links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_bench_block_names_a_committed_results_file(page):
    text = page.read_text()
    names = dt.bench_blocks(text)
    for name in names:
        assert (ROOT / "benchmarks" / "results" / f"{name}.json").is_file(), name
        assert text.count(f"<!-- /bench:{name} -->") == 1, f"bench:{name}: one closing marker expected"


def test_the_readme_has_a_headline_benchmark_table():
    assert dt.bench_blocks(README.read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_bench_block_is_what_its_generator_writes_from_the_results_file(page):
    text = page.read_text()
    stale = [name for name in dt.bench_blocks(text) if _block(text, f"bench:{name}") != dt.bench_text(name)]
    assert not stale, f"stale in {page.name}: {stale}; run .venv/bin/python scripts/docs_tables.py"
