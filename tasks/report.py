"""Stage 8, the report: Markdown with PNG plots beside it, and one self-contained HTML page (plots inlined)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure renders with Agg and keeps no global pyplot state
from prefect import task

from gspo.io import read_jsonl
from gspo.task_table import TASKS
from tasks.common import CACHE, build, cached, output_dir

# (title, [(metric key, label)], log y axis): token-level ratios (GRPO) reach tens while sequence-level ones
# (GSPO) stay within a fraction of a percent of 1, so only a log axis shows both.
SIGNALS = [
    ("reward", [("reward_mean", "batch mean"), ("eval_reward", "held-out (greedy)")], False),
    ("clip fraction", [("clip_frac", "all"), ("clip_frac_low", "low"), ("clip_frac_high", "high")], False),
    ("importance ratio", [("ratio_mean", "mean"), ("ratio_min", "min"), ("ratio_max", "max")], True),
    ("KL to reference", [("kl", "k3 KL")], False),
    ("entropy", [("entropy", "mean per token")], False),
    ("completion length", [("completion_len_mean", "mean"), ("completion_len_max", "max")], False),
]
STYLES = ["-", ":", "--"]


def _points(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def curves_figure(runs: dict[str, list[dict]], path: Path) -> None:
    """One panel per signal, every run overlaid on the same axes (a colour per run, a line style per series).
    Panels with nothing measured (KL when gspo.beta is 0) are left out."""
    panels = [
        (title, series, log)
        for title, series, log in SIGNALS
        if any(_points(rows, key) for rows in runs.values() for key, _ in series)
    ]
    cols = min(3, len(panels))
    fig = Figure(figsize=(5 * cols, 3.6 * math.ceil(len(panels) / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    for ax, (title, series, log) in zip(axes, panels):
        for i, (name, rows) in enumerate(runs.items()):
            for (key, label), style in zip(series, STYLES):
                pts = _points(rows, key)
                if pts:
                    ax.plot(
                        *zip(*pts),
                        style,
                        color=f"C{i}",
                        marker="." if len(pts) < 30 else None,
                        label=f"{name} {label}" if len(runs) > 1 or len(series) > 1 else None,
                    )
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.savefig(path, dpi=80)


def scores_figure(results: dict, names: dict[str, str], path: Path) -> None:
    """Per task, one bar per scored model (base in grey; the trained ones in the curves' colours)."""
    fig = Figure(figsize=(max(4, 1.2 * len(names) * len(results) + 1.5), 3.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(names)
    for i, (label, name) in enumerate(names.items()):
        vals = [results[t][label]["score"] for t in results]
        bars = ax.bar(
            [j + (i - (len(names) - 1) / 2) * width for j in range(len(results))],
            vals,
            width,
            label=name,
            color="0.6" if label == "base" else f"C{i - ('base' in names)}",
        )
        ax.bar_label(bars, [f"{v:.3f}" for v in vals], fontsize="small")
    ax.set_xticks(range(len(results)), list(results))
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.15)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=80)


def score_rows(results: dict, names: dict[str, str]) -> list[list[str]]:
    """task | metric | one column per model | trained - base, for the score and every other numeric metric."""
    out: list[list[str]] = []
    for t, m in results.items():
        keys = ["score"] + [
            k
            for k, v in m["trained"].items()
            if k not in ("score", "n") and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        out.extend(
            [t, k, *(f"{m[label][k]:.4f}" for label in names), f"{m['trained'][k] - m['base'][k]:+.4f}"] for k in keys
        )
    return out


def meanings(results: dict, names: dict[str, str]) -> list[str]:
    """One sentence per task: what its score measures, and each model's score."""
    return [
        f"{t}, {TASKS[t].meaning.format(n=m['trained']['n'])}: "
        + ", ".join(f"{name} {m[label]['score']:.3f}" for label, name in names.items())
        for t, m in results.items()
    ]


def render(blocks: list[tuple], images: dict[str, str] | None) -> tuple[str, str]:
    """(markdown, html) of blocks ("h", text) ("p", text) ("ul", items) ("table", header, rows) ("img", file).
    `images` maps a file to its PNG as base64 for the HTML; None leaves images out of the markdown too."""
    md, page = [], []
    for kind, *rest in blocks:
        if kind == "h":
            md.append(f"## {rest[0]}")
            page.append(f"<h2>{html.escape(rest[0])}</h2>")
        elif kind == "p":
            md.append(rest[0])
            page.append(f"<p>{html.escape(rest[0])}</p>")
        elif kind == "ul":
            md.append("\n".join(f"- {x}" for x in rest[0]))
            page.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            md.append(
                "\n".join(
                    ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                    + ["| " + " | ".join(r) + " |" for r in rows]
                )
            )
            page.append(
                "<table><tr>"
                + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
        elif kind == "img" and images is not None:
            md.append(f"![{rest[0]}]({rest[0]})")
            page.append(f'<img alt="{html.escape(rest[0])}" src="data:image/png;base64,{images[rest[0]]}">')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}img{max-width:100%}"
    )
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>GSPO report</title><style>{style}</style>"
        f"</head><body><h1>GSPO train-and-evaluate report</h1>{''.join(page)}</body></html>\n"
    )
    return "# GSPO train-and-evaluate report\n\n" + "\n\n".join(md) + "\n", doc


def blocks(
    facts: list[str], training: dict[str, dict], results: dict, names: dict[str, str], versions: dict[str, str]
) -> list[tuple]:
    trained = next(iter(training.values()))
    out = [
        ("ul", facts),
        ("h", "Scores on the test sets"),
        ("ul", meanings(results, names)),
        ("table", ["task", "metric", *names.values(), "trained - base"], score_rows(results, names)),
        ("img", "scores.png"),
        ("h", "Training" if len(training) == 1 else f"Training: {' vs '.join(training)}, same data and reference"),
        (
            "ul",
            [
                f"steps: {trained['steps']}",
                f"registered checkpoint: {trained['selected']}",
                f"best held-out reward: {trained['best_eval']}",
                f"skipped updates: {trained['skipped_updates']}",
                f"stopped early: {trained['stopped_early']}",
            ],
        ),
        ("img", "training.png"),
        ("h", "Versions"),
        ("p", ", ".join(f"{name} {v}" for name, v in versions.items())),
    ]
    return out


@task(name="report", cache_policy=cached("report", CACHE), persist_result=True, result_serializer="json")
def build_report(
    facts: list[str],
    training: dict[str, dict],
    results: dict,
    names: dict[str, str],
    versions: dict[str, str],
    root: str,
) -> dict:
    """{"dir", "markdown", "html"}: `facts` head the report as a list; `training` maps a run's name (the
    registered one first, then e.g. the GRPO baseline) to its train-stage result; `results` is
    {task: {label: metrics}} and `names` maps each label to the name shown; `versions` (python and the key
    packages) closes it. The Markdown without plots is `markdown_text` in the result, for places that cannot
    show the PNG files (the Prefect artifact)."""

    def make(work: Path) -> dict:
        curves_figure(
            {name: [row for _, row in read_jsonl(t["metrics"])] for name, t in training.items()}, work / "training.png"
        )
        if results:
            scores_figure(results, names, work / "scores.png")
        b = [x for x in blocks(facts, training, results, names, versions) if x[0] != "img" or (work / x[1]).exists()]
        images = {x[1]: base64.b64encode((work / x[1]).read_bytes()).decode() for x in b if x[0] == "img"}
        md, page = render(b, images)
        (work / "report.md").write_text(md)
        (work / "report.html").write_text(page)
        return {
            "dir": str(work),
            "markdown": str(work / "report.md"),
            "html": str(work / "report.html"),
            "markdown_text": render(b, None)[0],
        }

    return build(output_dir(root, "report"), make)
