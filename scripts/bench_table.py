"""Turn a pytest-benchmark JSON file into a markdown table of images/s, per group and case.

Each case's figure is the median over its reps of the per-rep median throughput; ratios are to the
group's floor (eager plain inference, or the bare forward-backward for saliency), to plain inference on
the case's own backend (`compiled-x` against `compiled-inference`), to the retain-graph loop
(one forward, K autograd.grad calls) and to the article's code, where the group has them.

    .venv/bin/python scripts/bench_table.py benchmarks/results/cpu-core.json [--doc docs/performance.md]

With --doc FILE (or its older name, --readme FILE; repeat it for each file that shows the table), the table
replaces the block between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in FILE, NAME being the JSON
file's stem, so the figures in docs/performance.md (and the headline table in README.md) always come from a
committed results file. scripts/docs_tables.py regenerates every such block of README.md and docs/*.md at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

FLOORS = ("inference", "eager-inference", "forward-backward-to-input")


def table(data: dict) -> str:
    per_case: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    meta: dict[str, dict] = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "images_per_s" not in info:
            continue
        per_case[info["group"]][info["case"]].append(info["images_per_s"])
        meta[(info["group"], info["case"])] = info
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    lines = [f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores, {machine.get('system', '')} "
             f"{machine.get('release', '')}; torch {next(iter(meta.values()), {}).get('torch', '?')}; "
             f"run {data.get('datetime', '?')[:16]}.", ""]
    gpus = sorted({info["gpu"] for info in meta.values() if info.get("gpu")})
    if gpus:
        lines[0] = lines[0].replace("; torch", f"; GPU {', '.join(gpus)}; torch")
    lines += ["| group | model | batch | case | images/s | x floor | x same backend's inference | x retain-graph loop "
              "| x article | reps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for group, cases in per_case.items():
        median = {case: statistics.median(v) for case, v in cases.items()}
        floor = next((median[f] for f in FLOORS if f in median), None)
        article = median.get("article")
        loop = median.get("retain-graph-loop")
        for case, value in median.items():
            info = meta[(group, case)]
            x_floor = f"{value / floor:.2f}" if floor else "-"
            x_article = f"{value / article:.1f}" if article else "-"
            x_loop = f"{value / loop:.2f}" if loop else "-"
            backend = median.get(case.split("-")[0] + "-inference") if "-" in case else None
            x_backend = f"{value / backend:.2f}" if backend else "-"
            lines.append(f"| {group} | {info['model']} {info['size']}px | {info['batch']} | {case} | {value:.2f} | "
                         f"{x_floor} | {x_backend} | {x_loop} | {x_article} | {len(cases[case])} |")
    return "\n".join(lines) + "\n"


def forward_bound_table(data: dict) -> str:
    """The table of a forward-bound run (benchmarks/test_perturbation_speed.py): each case's images/s, its forwards per
    image, the fraction of the forward-bound limit it reaches (images/s x forwards per image / its model's plain
    inference images/s) and its speed against the other cases of its group (the peers)."""
    per_case: dict[str, list[float]] = defaultdict(list)
    meta: dict[str, dict] = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "images_per_s" in info:
            per_case[info["case"]].append(info["images_per_s"])
            meta[info["case"]] = info
    median = {case: statistics.median(v) for case, v in per_case.items()}
    # Each model's limit is its own plain inference.
    plain = {meta[c]["model"]: v for c, v in median.items() if meta[c]["group"].startswith("plain inference")}
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    lines = [f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores; torch "
             f"{next(iter(meta.values()), {}).get('torch', '?')}; run {data.get('datetime', '?')[:16]}; the median of "
             f"{max(map(len, per_case.values()), default=0)} interleaved reps.", "",
             "| group | case | images/s | forwards per image | x forward-bound limit | x each other case of the group |",
             "|---|---|---|---|---|---|"]
    for case, value in median.items():
        info = meta[case]
        base = plain.get(info["model"])
        limit = f"{value * info['forwards_per_image'] / base:.2f}" if base and not info["group"].startswith(
            "plain inference") else "-"
        others = [(c, median[c]) for c in median if c != case and meta[c]["group"] == info["group"]]
        versus = ", ".join(f"{value / v:.1f}x {c}" for c, v in others) or "-"
        lines.append(f"| {info['group']} | {case} | {value:.3f} | {info['forwards_per_image']} | {limit} | {versus} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--doc", "--readme", dest="docs", action="append", type=Path, metavar="FILE",
                        help="fill the <!-- bench:NAME --> block of this markdown file (e.g. docs/performance.md) "
                             "instead of printing; repeat for each file that shows the table")
    args = parser.parse_args()
    text = table(json.loads(args.results.read_text()))
    if not args.docs:
        print(text, end="")
        return
    from bench_report import fill_docs  # scripts/ is this script's own folder, first on sys.path

    fill_docs(args.docs, args.results.stem, text)

if __name__ == "__main__":
    main()
