"""Fill the generated blocks of README.md and docs/*.md: the methods table and the benchmark tables.

    .venv/bin/python scripts/docs_tables.py            # rewrite every stale block in place
    .venv/bin/python scripts/docs_tables.py --check    # write nothing; exit 1 and name each stale block

The methods table (`<!-- methods-table -->` ... `<!-- /methods-table -->` in docs/methods.md) is rendered
from `fastattr.METHODS`: one row per name, in the registry's order, with the kind of map (a layer method
reads only the layer's activations and their gradients), the tensors it reads (`Method.reads`, explained
in a legend taken from fastattr/methods.py's module docstring), its normalisation (`Method.normalize`) and
the first paragraph of its function's docstring, the formula and the paper.

Each benchmark block (`<!-- bench:NAME -->` ... `<!-- /bench:NAME -->`) is rendered from the committed
results file benchmarks/results/NAME.json by the script that wrote it: scripts/bench_report.py `serving`
for a load-test file, `table` for the benchmark matrix, scripts/bench_table.py for the other
pytest-benchmark files. Nothing is measured here; a block naming no results file is an error.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS_DOC = ROOT / "docs" / "methods.md"
METHODS_BLOCK = "methods-table"
BENCH_BLOCK = re.compile(r"<!-- bench:([A-Za-z0-9_.-]+) -->\n")

if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))  # bench_table and bench_report, this script's neighbours


def _first_paragraph(doc: str | None) -> str:
    paragraph = inspect.cleandoc(doc or "").split("\n\n")[0]
    return " ".join(paragraph.split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _legend() -> list[tuple[str, str]]:
    """(name, "shape: meaning") for each tensor a method may read, from fastattr/methods.py's docstring."""
    from fastattr import methods

    rows = []
    for line in (methods.__doc__ or "").splitlines():
        match = re.match(r"^\s{4}(\w+)\s+(\[[^\]]*\])(?:\s+(.*\S))?\s*$", line)
        if match:
            shape, meaning = match.group(2), match.group(3)
            rows.append((match.group(1), f"`{shape}`" + (f": {meaning}" if meaning else "")))
    return rows


def methods_table() -> str:
    """The markdown between the methods-table markers (without them), from fastattr.METHODS."""
    from fastattr import METHODS

    # A map at the layer's resolution reads nothing at the input's.
    layer_reads = {"acts", "acts_grads", "class_scores", "ablated_scores", "masked_scores"}
    lines = ["| name | map | reads | normalised by | definition |", "|---|---|---|---|---|"]
    for name, method in METHODS.items():
        kind = "layer" if set(method.reads) <= layer_reads else "input"
        reads = ", ".join(f"`{r}`" for r in method.reads)
        normalize = f"`{method.normalize.__module__.rsplit('.', 1)[-1]}.{method.normalize.__name__}`"
        definition = _cell(_first_paragraph(method.fn.__doc__))
        lines.append(f"| `{name}` | {kind} | {reads} | {normalize} | {definition} |")
    used = {r for method in METHODS.values() for r in method.reads}
    legend = [f"- `{name}` {text}" for name, text in _legend() if name in used]
    if legend:
        lines += ["", "What the methods read (batch first, K explained classes):", "", *legend]
    return "\n".join(lines) + "\n"


def bench_text(name: str) -> str:
    """The markdown of the block bench:NAME, from benchmarks/results/NAME.json."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"<!-- bench:{name} -->: no results file {path.relative_to(ROOT)}")
    data = json.loads(path.read_text())
    import bench_report
    import bench_table

    if "runs" in data:
        return bench_report.serving_table(data)
    if bench_report.matrix_groups(data):
        return bench_report.report(data)
    if any("forwards_per_image" in b["extra_info"] for b in data["benchmarks"]):
        return bench_table.forward_bound_table(data)
    return bench_table.table(data)


def _replace(text: str, marker: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {re.escape(marker)} -->\n).*?(<!-- /{re.escape(marker)} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no block <!-- {marker} --> ... <!-- /{marker} --> to fill")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def bench_blocks(text: str) -> list[str]:
    """The NAMEs of the bench:NAME blocks in a markdown text, in order."""
    return BENCH_BLOCK.findall(text)


def filled(path: Path) -> str:
    """The text of `path` with its methods block (docs/methods.md only) and every bench block regenerated."""
    text = path.read_text()
    if path.resolve() == METHODS_DOC.resolve():
        text = _replace(text, METHODS_BLOCK, methods_table())
    for name in bench_blocks(text):
        text = _replace(text, f"bench:{name}", bench_text(name))
    return text


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is stale")
    parser.add_argument("files", nargs="*", type=Path, help="default: README.md and docs/*.md")
    args = parser.parse_args(argv)
    stale = []
    for path in args.files or documents():
        try:
            new = filled(path)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"{path}: {error}") from None
        if new != path.read_text():
            stale.append(path)
            if not args.check:
                path.write_text(new)
    for path in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
