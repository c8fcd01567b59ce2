"""Report on a benchmark-matrix JSON (benchmarks/test_matrix.py): a pivot table, a bar chart, a comparison.

    .venv/bin/python scripts/bench_report.py table benchmarks/results/cpu-matrix.json [--doc docs/performance.md]
    .venv/bin/python scripts/bench_report.py serving benchmarks/results/cpu-serving.json [--doc docs/performance.md]
    .venv/bin/python scripts/bench_report.py chart benchmarks/results/cpu-matrix.json -o matrix.png [--width 1200]
    .venv/bin/python scripts/bench_report.py compare OLD.json NEW.json [--threshold 0.10]

`table` prints one markdown row per group (model, target layer or "input" for saliency, method and top-k,
batch, device) with the images/s of each case, the median over its reps, and the best fastattr backend's
ratio to the floor (plain eager inference for Grad-CAM, a bare forward + backward to the input for
saliency), to plain inference on its own backend, to the article's code and to the best peer (captum or
pytorch-grad-cam). Under the table it lists every group where fastattr is not ahead: the best peer within
10 % of it or faster, or the best fastattr backend under 0.9x the floor. With --doc FILE (or its older
name, --readme FILE; repeatable), the table replaces the block between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->` in FILE, NAME being the JSON file's stem, as scripts/bench_table.py does; the
benchmark tables live in docs/performance.md, and scripts/docs_tables.py regenerates every block of
README.md and docs/*.md at once.

`serving` prints (or, with --doc, writes) the table of a benchmarks/load_test.py results file.

`chart` draws images/s per case for each group (log scale) into a PNG; it needs matplotlib (the `bench`
extra).

`compare` prints new/old images/s for every (group, case) in both files, marks the ones slower than
1 - threshold as REGRESSION, lists the ones in one file only, and exits 1 when there is a regression.
It reads any pytest-benchmark JSON whose extra_info has group, case and images_per_s, not only the matrix.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

FASTATTR = ("fastattr-eager", "fastattr-compiled", "fastattr-onnxruntime")
PEERS = ("captum", "pytorch-grad-cam")
SAME_BACKEND = {"fastattr-eager": "eager-inference", "fastattr-compiled": "compiled-inference",
                "fastattr-onnxruntime": "onnxruntime-inference"}
FLOOR = {"gradcam": "eager-inference", "saliency": "forward-backward-to-input"}
CASES = (*FASTATTR, "article", *PEERS, "eager-inference", "compiled-inference", "onnxruntime-inference",
         "forward-backward-to-input")
PEER_MARGIN = 1.10  # best fastattr / best peer under this: not ahead
FLOOR_MARGIN = 0.90  # best fastattr / floor under this: not ahead
COLUMNS = ("model", "target", "method", "batch", "device", "floor", "fastattr eager", "fastattr compiled",
           "fastattr onnxruntime", "article", "captum", "pytorch-grad-cam", "best fastattr / floor",
           "best fastattr / same-backend inference", "best fastattr / article", "best fastattr / best peer")
BATCH_IN_GROUP = re.compile(r", batch (\d+),")


class Group(NamedTuple):
    """One row of the matrix: what is explained, how many images a batch holds, where it runs."""

    model: str
    target: str  # the Grad-CAM layer, or "input" for saliency
    method: str
    k: int
    batch: int
    device: str


@dataclass
class GroupResult:
    label: str  # the group string of extra_info
    group: Group
    medians: dict[str, float]  # case -> median images/s over its reps

    @property
    def floor_case(self) -> str | None:
        return FLOOR.get(self.group.method)

    @property
    def floor(self) -> float | None:
        return self.medians.get(self.floor_case) if self.floor_case else None

    def best(self, cases: Sequence[str]) -> tuple[str, float] | None:
        present = [(case, self.medians[case]) for case in cases if case in self.medians]
        return max(present, key=lambda item: item[1]) if present else None

    def ratios(self) -> dict[str, float | None]:
        """The best fastattr backend's images/s over the floor, its own backend's inference, the article's
        code and the best peer; None where either side is missing."""
        best = self.best(FASTATTR)
        if best is None:
            return dict.fromkeys(("floor", "same-backend", "article", "peer"))
        case, value = best
        peer = self.best(PEERS)
        others = {"floor": self.floor, "same-backend": self.medians.get(SAME_BACKEND[case]),
                  "article": self.medians.get("article"), "peer": peer[1] if peer else None}
        return {name: value / other if other else None for name, other in others.items()}


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _timed(data: dict):
    """(benchmark, extra_info) for each benchmark that recorded a throughput."""
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "images_per_s" in info and "group" in info and "case" in info:
            yield bench, info


def case_medians(data: dict) -> dict[tuple[str, str], float]:
    """(group, case) -> the median over reps of images/s, for any benchmark file."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for _, info in _timed(data):
        values[(info["group"], info["case"])].append(info["images_per_s"])
    return {key: statistics.median(v) for key, v in values.items()}


def group_of(bench: dict) -> Group | None:
    """The matrix group of one benchmark, from its params (extra_info's batch counts the images of one
    timed call, 2 for the article's code whatever the group's batch); None outside the matrix."""
    params, info = bench.get("params") or {}, bench["extra_info"]
    method = params.get("method", info.get("method"))
    name = params.get("name", info.get("model"))
    if method is None or name is None:
        return None
    if "n" in params:
        batch = int(params["n"])
    elif match := BATCH_IN_GROUP.search(info["group"]):
        batch = int(match.group(1))
    else:
        batch = int(info.get("batch", 0))
    layer = params.get("layer", info.get("layer", "?"))
    return Group(model=name, target=layer if method == "gradcam" else "input", method=method,
                 k=int(params.get("k", info.get("k", 0))), batch=batch,
                 device=params.get("device", info.get("device", "?")))


def matrix_groups(data: dict) -> list[GroupResult]:
    """The matrix's groups, sorted by device, model, target, method, k, batch."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    groups: dict[str, Group] = {}
    for bench, info in _timed(data):
        group = group_of(bench)
        if group is None:
            continue
        groups.setdefault(info["group"], group)
        values[info["group"]][info["case"]].append(info["images_per_s"])
    results = [GroupResult(label, groups[label], {case: statistics.median(v) for case, v in cases.items()})
               for label, cases in values.items()]
    return sorted(results, key=lambda r: (r.group.device, r.group.model, r.group.target, r.group.method,
                                          r.group.k, r.group.batch))


def machine_line(data: dict) -> str:
    """Machine, torch version and run date, as scripts/bench_table.py writes them."""
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    torch = next((info["torch"] for _, info in _timed(data) if "torch" in info), "?")
    return (f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores, {machine.get('system', '')} "
            f"{machine.get('release', '')}; torch {torch}; run {data.get('datetime', '?')[:16]}.")


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def table_row(result: GroupResult) -> list[str]:
    """The cells of one group's row, in COLUMNS' order; the best fastattr backend's figure in bold."""
    g, medians = result.group, result.medians
    best = result.best(FASTATTR)
    fastattr = [f"**{_num(medians[c])}**" if best and c == best[0] else _num(medians.get(c)) for c in FASTATTR]
    ratios = result.ratios()
    return [g.model, g.target, f"{g.method} top-{g.k}", str(g.batch), g.device, _num(result.floor), *fastattr,
            *(_num(medians.get(c)) for c in ("article", *PEERS)),
            *(_ratio(ratios[name]) for name in ("floor", "same-backend", "article", "peer"))]


def pivot_table(results: Sequence[GroupResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in results]
    return "\n".join(lines)


def not_ahead(results: Sequence[GroupResult]) -> list[str]:
    """One line per group where the best peer is within 10 % of the best fastattr backend or faster, or the
    best fastattr backend is under 0.9x the floor (or there is no fastattr result at all)."""
    lines = []
    for result in results:
        best = result.best(FASTATTR)
        if best is None:
            lines.append(f"- {result.label}: no fastattr result")
            continue
        reasons = []
        ratios, peer = result.ratios(), result.best(PEERS)
        if peer and ratios["peer"] < PEER_MARGIN:
            reasons.append(f"{best[0]} is {ratios['peer']:.2f}x {peer[0]} ({_num(best[1])} against "
                           f"{_num(peer[1])} images/s)")
        if ratios["floor"] is not None and ratios["floor"] < FLOOR_MARGIN:
            reasons.append(f"{best[0]} is {ratios['floor']:.2f}x the floor, {result.floor_case} "
                           f"({_num(best[1])} against {_num(result.floor)} images/s)")
        if reasons:
            lines.append(f"- {result.label}: " + "; ".join(reasons))
    return lines


def _reps(data: dict) -> str:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for _, info in _timed(data):
        counts[(info["group"], info["case"])] += 1
    low, high = min(counts.values(), default=0), max(counts.values(), default=0)
    return f"{low}" if low == high else f"{low}-{high}"


def report(data: dict) -> str:
    """The markdown for `table`: machine line, legend, pivot table, the not-ahead list."""
    results = matrix_groups(data)
    if not results:
        raise ValueError("no benchmark-matrix results (benchmarks/test_matrix.py) in this file")
    reps = _reps(data)
    lines = [machine_line(data), "",
             f"Images/s, median over {reps} rep{'' if reps == '1' else 's'}; bold: the best fastattr backend. "
             "floor: eager-inference (plain inference) for gradcam rows, forward-backward-to-input for saliency "
             "rows. Same-backend inference: the best fastattr backend's own plain inference (eager, compiled "
             "or onnxruntime). Best peer: the faster of captum and pytorch-grad-cam. article runs on 2 images, "
             "one class per call, whatever the batch. -: not run.", "", pivot_table(results), ""]
    behind = not_ahead(results)
    lines.append(f"Where fastattr is not ahead (best peer within {PEER_MARGIN - 1:.0%} of the best fastattr "
                 f"backend or faster, or best fastattr under {FLOOR_MARGIN:.1f}x the floor):")
    lines.append("")
    lines += behind or ["- nowhere in this run"]
    return "\n".join(lines) + "\n"


def replace_block(doc: str, name: str, text: str) -> str:
    """The markdown text `doc` with the block between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` replaced
    by `text` (scripts/bench_table.py uses it too)."""
    pattern = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)
    if not pattern.search(doc):
        raise ValueError(f"no block <!-- bench:{name} --> ... <!-- /bench:{name} --> to fill")
    return pattern.sub(lambda m: m.group(1) + text + m.group(2), doc)


def fill_docs(paths: Sequence[Path], name: str, text: str) -> None:
    """Replace the bench:NAME block of each markdown file in `paths` by `text`; exit naming the first file
    without that block, before writing any."""
    filled = []
    for path in paths:
        try:
            filled.append((path, replace_block(path.read_text(), name, text)))
        except ValueError as error:
            raise SystemExit(f"{path}: {error}") from None
    for path, new in filled:
        path.write_text(new)


def _colour(case: str) -> str:
    if case.startswith("fastattr-"):
        return {"fastattr-eager": "#1f4e9c", "fastattr-compiled": "#3b7dd8", "fastattr-onnxruntime": "#7fb2f0"}.get(
            case, "#1f4e9c")
    if case in PEERS:
        return "#d9822b"
    if case == "article":
        return "#8c8c8c"
    return "#4a9c5d"  # the floors


def chart(data: dict, out: Path, width: int = 1200, dpi: int = 100) -> None:
    """Small multiples, one panel per group: horizontal bars of images/s per case, log x shared by all."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("bench_report.py chart needs matplotlib: pip install 'matplotlib>=3.7' "
                         "(or the bench extra, pip install -e '.[bench]')") from None
    results = matrix_groups(data)
    if not results:
        raise SystemExit("no benchmark-matrix results (benchmarks/test_matrix.py) in this file")
    seen = {case for r in results for case in r.medians}
    cases = [c for c in CASES if c in seen] + sorted(seen - set(CASES))
    ncols = 1 if len(results) == 1 else 2
    nrows = math.ceil(len(results) / ncols)
    values = [v for r in results for v in r.medians.values() if v > 0]
    fig = Figure(figsize=(width / dpi, 1.1 + nrows * (0.6 + 0.22 * len(cases))), dpi=dpi, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    for ax, result in zip(axes.flat, results):
        rows = [(i, case, result.medians[case]) for i, case in enumerate(cases) if case in result.medians]
        ax.barh([i for i, _, _ in rows], [v for _, _, v in rows], color=[_colour(c) for _, c, _ in rows])
        for i, _, v in rows:
            ax.text(v * 1.08, i, _num(v), va="center", fontsize=7)
        ax.set_title(result.label, fontsize=9)
        ax.set_xscale("log")
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", which="both", alpha=0.25)
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    axes[0, 0].set_yticks(range(len(cases)), cases)
    axes[0, 0].invert_yaxis()
    axes[0, 0].set_xlim(min(values) / 1.5, max(values) * 2)
    for ax in axes[-1]:
        ax.set_xlabel("images/s (log scale)", fontsize=8)
    fig.suptitle(f"fastattr benchmark matrix: images/s per case, median over reps\n{machine_line(data)}",
                 fontsize=10)
    fig.savefig(out, dpi=dpi)


@dataclass
class Comparison:
    rows: list[tuple[str, str, float, float]]  # group, case, old, new
    only_old: list[tuple[str, str]]
    only_new: list[tuple[str, str]]
    threshold: float

    def regressed(self, old: float, new: float) -> bool:
        return new / old < 1 - self.threshold

    @property
    def regressions(self) -> list[tuple[str, str, float, float]]:
        return [row for row in self.rows if self.regressed(row[2], row[3])]


def _case_order(key: tuple[str, str]) -> tuple[str, int, str]:
    group, case = key
    return group, CASES.index(case) if case in CASES else len(CASES), case


def compare(old: dict, new: dict, threshold: float = 0.10) -> Comparison:
    before, after = case_medians(old), case_medians(new)
    both = sorted(before.keys() & after.keys(), key=_case_order)
    return Comparison(rows=[(g, c, before[(g, c)], after[(g, c)]) for g, c in both],
                      only_old=sorted(before.keys() - after.keys(), key=_case_order),
                      only_new=sorted(after.keys() - before.keys(), key=_case_order), threshold=threshold)


def format_comparison(comparison: Comparison, old: dict, new: dict) -> str:
    lines = [f"old: {machine_line(old)}", f"new: {machine_line(new)}", "",
             "| group | case | old images/s | new images/s | new/old | |", "|---|---|---|---|---|---|"]
    for group, case, before, after in comparison.rows:
        flag = "REGRESSION" if comparison.regressed(before, after) else ""
        lines.append(f"| {group} | {case} | {_num(before)} | {_num(after)} | {after / before:.2f} | {flag} |")
    for label, keys in (("old", comparison.only_old), ("new", comparison.only_new)):
        if keys:
            lines += ["", f"Only in the {label} file:"] + [f"- {group} / {case}" for group, case in keys]
    n = len(comparison.regressions)
    lines += ["", f"{n} regression{'s' if n != 1 else ''} (new/old under {1 - comparison.threshold:.2f}) "
              f"in {len(comparison.rows)} cases compared."]
    return "\n".join(lines) + "\n"


def _threshold(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("the threshold is a fraction in [0, 1), e.g. 0.10")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="markdown pivot table, one row per group, and where fastattr is not ahead")
    t.add_argument("results", type=Path)
    t.add_argument("--doc", "--readme", dest="docs", action="append", type=Path, metavar="FILE",
                   help="fill the <!-- bench:NAME --> block of this markdown file (e.g. docs/performance.md) "
                        "instead of printing; repeat for each file that shows the table")
    c = sub.add_parser("chart", help="PNG bar chart of images/s per case for each group")
    c.add_argument("results", type=Path)
    c.add_argument("-o", "--output", type=Path, required=True)
    c.add_argument("--width", type=int, default=1200, help="in pixels (default 1200)")
    s = sub.add_parser("serving", help="markdown table of a benchmarks/load_test.py results file")
    s.add_argument("results", type=Path)
    s.add_argument("--doc", "--readme", dest="docs", action="append", type=Path, metavar="FILE",
                   help="write the table into this file's bench:NAME block (e.g. docs/performance.md); repeatable")
    m = sub.add_parser("compare", help="new/old images/s per (group, case); exit 1 on a regression")
    m.add_argument("old", type=Path)
    m.add_argument("new", type=Path)
    m.add_argument("--threshold", type=_threshold, default=0.10,
                   help="flag new/old under 1 - THRESHOLD (default 0.10)")
    return p


def serving_table(data: dict) -> str:
    """One row per load-test configuration: served against offline throughput, latency, lost or wrong answers."""
    m = data["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} torch threads, {m['system']}; Python {m['python']}, torch "
             f"{m['torch']}. Served: {data['runs'][0]['clients']} client threads on the same cores, loopback HTTP, "
             "k=3 Grad-CAM, maps as uint8 arrays; offline: the same backend on batches of max_batch_size, "
             "decoding included, no Ray or HTTP.", "",
             "| model | input | backend | max batch | batch wait ms | mean batch | served images/s | offline images/s "
             "| served / offline | p50 ms | p90 ms | p99 ms | overhead ms / request | errors | wrong |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        lines.append(f"| {r['model']} | {r['input_size']} | {r['backend']} | {r['max_batch_size']} | "
                     f"{r['batch_wait_ms']:g} | {r['mean_batch_size']:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['offline_images_per_s']:.1f} | {r['served_over_offline']:.2f} | {r['p50_ms']:.0f} | "
                     f"{r['p90_ms']:.0f} | {r['p99_ms']:.0f} | {r['overhead_ms_per_request']:.1f} | {r['errors']} | "
                     f"{r['wrong']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("table", "serving"):
        try:
            data = json.loads(args.results.read_text()) if args.command == "serving" else load(args.results)
            text = serving_table(data) if args.command == "serving" else report(data)
        except ValueError as error:
            raise SystemExit(f"{args.results}: {error}") from None
        if not args.docs:
            print(text, end="")
            return 0
        fill_docs(args.docs, args.results.stem, text)
        return 0
    if args.command == "chart":
        chart(load(args.results), args.output, width=args.width)
        return 0
    old, new = load(args.old), load(args.new)
    comparison = compare(old, new, args.threshold)
    print(format_comparison(comparison, old, new), end="")
    return 1 if comparison.regressions else 0


if __name__ == "__main__":
    sys.exit(main())
