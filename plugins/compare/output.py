"""What a comparison leaves: a rich table on the terminal, ``compare.json`` (every per-seed figure and every
statistic with its name and method), ``compare.md`` and ``compare.png``, all drawn from the one result dict."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from microtrain_plugins.callbacks.report.figures import DPI
from microtrain_plugins.callbacks.report.render import save_figure, write_text_atomically
from microtrain_plugins.compare.analysis import SIDES, fmt, level_unit

FILES = ("compare.json", "compare.md", "compare.png")
SIDE_COLOURS = {"a": "tab:blue", "b": "tab:orange"}


def json_safe(value: Any) -> Any:
    """JSON has no nan or inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "compare.json", json.dumps(json_safe(result), indent=1) + "\n")
    write_text_atomically(out / "compare.md", markdown(result))
    save_figure(figure(result), out / "compare.png")
    return [out / name for name in FILES]


def _stat(result: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((entry for entry in result["statistics"] if entry["name"] == name), None)


def _stat_text(entry: dict[str, Any]) -> str:
    unit = entry.get("unit", "")
    if "low" in entry:
        return f"{fmt(entry['low'], unit, True)} to {fmt(entry['high'], unit, True)}"
    value = entry["value"]
    if entry["name"].startswith("p_value"):
        return "n/a (every difference is 0)" if value is None or not math.isfinite(value) else f"{value:.4g}"
    if entry["name"] == "variance_reduction_factor":
        return "n/a" if value is None or math.isnan(value) else f"{value:.3g}x"
    return fmt(value, unit, signed=entry["name"] == "mean_difference" or entry["name"].startswith("upper_bound"))


# --- terminal ---------------------------------------------------------------------------------------------------

def print_result(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    metric, labels = result["metric"], result["labels"]
    unit = metric["unit"]
    seeds = Table(title=f"{metric['name']}: {metric['description']}", title_justify="left")
    for column in ("seed", f"A: {labels['a']}", f"B: {labels['b']}", "B - A"):
        seeds.add_column(escape(column), justify="right")
    for row in result["per_seed"]:
        seeds.add_row(str(row["seed"]), fmt(row["a"], level_unit(unit)), fmt(row["b"], level_unit(unit)),
                      fmt(row["difference"], unit, True) if row["difference"] is not None else "target not reached")
    mean_a, sd_a, mean_b, sd_b = (_stat(result, n) for n in ("mean_a", "sd_a", "mean_b", "sd_b"))
    if mean_a:
        seeds.add_section()
        diff, sd_diff = _stat(result, "mean_difference"), _stat(result, "sd_difference")
        seeds.add_row("mean ± sd", f"{fmt(mean_a['value'], level_unit(unit))} ± {fmt(sd_a['value'], unit)}",
                      f"{fmt(mean_b['value'], level_unit(unit))} ± {fmt(sd_b['value'], unit)}",
                      f"{fmt(diff['value'], unit, True)} ± {fmt(sd_diff['value'], unit)}")
    console.print(seeds)
    if result["statistics"]:
        table = Table(title="statistics of B - A (methods in full: compare.md, compare.json)", title_justify="left")
        for column in ("statistic", "value", "method"):
            table.add_column(column, overflow="fold")
        for entry in result["statistics"]:
            table.add_row(entry["name"], _stat_text(entry), escape(entry["method"].split(":")[0]))  # in full in compare.md
        console.print(table)
    if result["per_class"]:
        split = result.get("per_class_split", "test")
        table = Table(title=f"per-class {split} accuracy (the metric's epochs), B - A with its 95% paired t interval",
                      title_justify="left")
        for column in ("class", "A %", "B %", "B - A", "95% interval"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for row in result["per_class"]:
            if row["difference"] is None:
                table.add_row(escape(row["class"]), "n/a", "n/a", "n/a", "no images of this class")
                continue
            style = "" if row["low"] <= 0 <= row["high"] else "bold"
            table.add_row(escape(row["class"]), f"{row['mean_a']:.2f}", f"{row['mean_b']:.2f}",
                          f"[{style}]{row['difference']:+.2f}[/]" if style else f"{row['difference']:+.2f}",
                          f"{row['low']:+.2f} to {row['high']:+.2f}")
        console.print(table)
    if result["cost"]:
        table = Table(title="cost, B - A with its 95% paired t interval", title_justify="left")
        for column in ("figure", "A (mean)", "B (mean)", "B - A", "95% interval", "B / A"):
            table.add_column(column, justify="left" if column == "figure" else "right")
        for row in result["cost"]:
            table.add_row(row["description"], fmt(row["mean_a"], row["unit"]), fmt(row["mean_b"], row["unit"]),
                          fmt(row["difference"], row["unit"], True),
                          f"{fmt(row['low'], row['unit'], True)} to {fmt(row['high'], row['unit'], True)}",
                          "n/a" if row["ratio_b_over_a"] is None else f"{row['ratio_b_over_a']:.3f}")
        console.print(table)
    for note in result["notes"]:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"[bold]{escape(result['verdict'])}[/]", highlight=False)


# --- Markdown ---------------------------------------------------------------------------------------------------

def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    metric, labels = result["metric"], result["labels"]
    unit = metric["unit"]
    parts = [f"# Comparison: {labels['a']} (A) against {labels['b']} (B)", "", f"**{result['verdict']}**", ""]
    header = result.get("header", {})
    sides = [[key.upper(), labels[key], f"`{header.get(key, {}).get('recipe', '-')}`",
              " ".join(f"`{o}`" for o in header.get(key, {}).get("overrides", [])) or "-"] for key in SIDES]
    parts += [_md_table(["side", "label", "recipe", "overrides"], sides), ""]
    parts += [f"Metric: `{metric['name']}`, {metric['description']}. Seeds: {', '.join(map(str, result['seeds']))}, "
              "each pair of runs with the same seed."]
    if header.get("command"):
        parts += ["", "Command:", "", "```", header["command"], "```"]
    parts += ["", "## Per seed", ""]
    rows = [[str(r["seed"]), fmt(r["a"], level_unit(unit)), fmt(r["b"], level_unit(unit)),
             fmt(r["difference"], unit, True) if r["difference"] is not None else "target not reached"]
            for r in result["per_seed"]]
    parts += [_md_table(["seed", "A", "B", "B - A"], rows), ""]
    if result["statistics"]:
        parts += ["## Statistics of B - A", ""]
        parts += [_md_table(["statistic", "value", "method"],
                            [[f"`{e['name']}`", _stat_text(e), e["method"]] for e in result["statistics"]]), ""]
    parts += ["![paired runs, the difference with its intervals, per-class differences](compare.png)", ""]
    if result["per_class"]:
        split = result.get("per_class_split", "test").capitalize()
        parts += ["## Per class", "", f"{split} accuracy per class over the metric's epochs; B - A with its 95% paired t "
                  "interval.", ""]
        rows = [[r["class"], "n/a", "n/a", "n/a", "no images of this class"] if r["difference"] is None else
                [r["class"], f"{r['mean_a']:.2f}", f"{r['mean_b']:.2f}", f"{r['difference']:+.2f}",
                 f"{r['low']:+.2f} to {r['high']:+.2f}"] for r in result["per_class"]]
        parts += [_md_table(["class", "A %", "B %", "B - A", "95% interval"], rows), ""]
    if result["cost"]:
        parts += ["## Cost", ""]
        rows = [[r["description"], fmt(r["mean_a"], r["unit"]), fmt(r["mean_b"], r["unit"]), fmt(r["difference"], r["unit"], True),
                 f"{fmt(r['low'], r['unit'], True)} to {fmt(r['high'], r['unit'], True)}",
                 "n/a" if r["ratio_b_over_a"] is None else f"{r['ratio_b_over_a']:.3f}"] for r in result["cost"]]
        parts += [_md_table(["figure", "A (mean)", "B (mean)", "B - A", "95% interval", "B / A"], rows), ""]
    if result["notes"]:
        parts += ["## Notes", ""] + [f"- {note}" for note in result["notes"]] + [""]
    parts += ["## Runs", ""]
    rows = [[key.upper(), str(run["seed"]), f"`{run['run_dir']}`", str(run["epochs"])]
            for key in SIDES for run in result["runs"][key]]
    parts += [_md_table(["side", "seed", "run dir", "epochs"], rows), ""]
    if header:
        machine = header.get("machine", {})
        capability = f", {machine['cpu_capability']}" if machine.get("cpu_capability") else ""
        parts += [f"Written by `microtrain compare` on {header.get('date', '?')}, on {machine.get('cpu', '?')} "
                  f"({machine.get('cores', '?')} cores{capability}), microtrain {machine.get('microtrain', '?')}, "
                  f"torch {machine.get('torch', '?')}.", ""]
    return "\n".join(parts)


# --- figure -----------------------------------------------------------------------------------------------------

def figure(result: dict[str, Any]):
    """Three panels: each seed's pair of values, the differences with their intervals, per-class differences."""
    from matplotlib.figure import Figure

    classes = len(result["per_class"])
    height = min(max(5.2, 1.8 + 0.34 * classes), 20.0)
    fig = Figure(figsize=(17.0, height), dpi=DPI, layout="constrained")
    fig.suptitle("\n".join(textwrap.wrap(result["verdict"], 160)), fontsize=10.5)
    paired_ax, diff_ax, class_ax = fig.subplots(1, 3, width_ratios=[1.0, 1.25, 1.25])
    _paired_panel(paired_ax, result)
    _difference_panel(diff_ax, result)
    _class_panel(class_ax, result)
    return fig


def _axis_label(metric: dict[str, Any]) -> str:
    unit = {"points": "%", "": ""}.get(metric["unit"], metric["unit"])
    return f"{metric['name']} ({unit})" if unit else metric["name"]


def _paired_panel(ax, result: dict[str, Any]) -> None:
    metric, labels = result["metric"], result["labels"]
    rows = [row for row in result["per_seed"] if row["difference"] is not None]
    colours = [f"C{i % 10}" for i in range(len(rows))]
    for row, colour in zip(rows, colours, strict=True):
        ax.plot([0, 1], [row["a"], row["b"]], marker="o", color=colour, linewidth=1.5, alpha=0.85)
        ax.annotate(f"seed {row['seed']}", (1, row["b"]), xytext=(6, 0), textcoords="offset points", va="center",
                    fontsize=8, color=colour)
    if rows:
        means = [float(np.mean([row[key] for row in rows])) for key in SIDES]
        ax.plot([0, 1], means, color="black", linestyle="--", linewidth=2, marker="D", markersize=7, label="mean")
        ax.legend(loc="best", fontsize=8)
    ax.set_xticks([0, 1], [f"A\n{_wrap(labels['a'])}", f"B\n{_wrap(labels['b'])}"], fontsize=9)
    ax.set_xlim(-0.3, 1.45)
    ax.set_ylabel(_axis_label(metric))
    ax.set_title("each seed's pair of runs", fontsize=11)
    ax.grid(axis="y", alpha=0.3)


def _wrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, 26)[:3])


def _difference_panel(ax, result: dict[str, Any]) -> None:
    metric = result["metric"]
    unit = metric["unit"]
    rows = [row for row in result["per_seed"] if row["difference"] is not None]
    ax.axhline(0.0, color="grey", linewidth=1)
    diffs = [row["difference"] for row in rows]
    offsets = np.linspace(-0.12, 0.12, len(diffs)) if len(diffs) > 1 else np.zeros(len(diffs))
    for i, (row, offset) in enumerate(zip(rows, offsets, strict=True)):
        ax.scatter([offset], [row["difference"]], color=f"C{i % 10}", s=40, zorder=3)
    intervals = [("ci95_paired_t", "paired t", "tab:blue"), ("ci95_bootstrap", "bootstrap", "tab:green"),
                 ("ci95_unpaired_welch", "unpaired\n(Welch)", "tab:grey")]
    ticks = ["B - A\nper seed"]
    mean = _stat(result, "mean_difference")
    for x, (name, label, colour) in enumerate(intervals, start=1):
        ticks.append(label)
        entry = _stat(result, name)
        if entry is None or mean is None:
            continue
        centre = mean["value"]
        low, high = entry["low"], entry["high"]
        ax.errorbar([x], [centre], yerr=[[centre - low], [high - centre]], fmt="o", color=colour, capsize=8,
                    linewidth=2.2, markersize=7)
        ax.annotate(f"{fmt(high, unit, True)}\n{fmt(low, unit, True)}", (x, centre), xytext=(10, 0), textcoords="offset points",
                    va="center", fontsize=8, color=colour)
    bound = _stat(result, "upper_bound95_one_sided")
    if bound is not None:
        ax.axhline(bound["value"], color="tab:red", linestyle=":", linewidth=1.5,
                   label=f"one-sided 95% upper bound {fmt(bound['value'], unit, True)}")
        ax.legend(loc="best", fontsize=8)
    ax.set_xticks(range(len(ticks)), ticks, fontsize=9)
    ax.set_xlim(-0.5, len(ticks) - 0.2)
    ax.set_ylabel(f"B - A, {metric['name']}" + (f" ({metric['unit']})" if metric["unit"] else ""))
    ax.set_title("the difference and its 95% intervals", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    if not rows:
        ax.text(0.5, 0.5, "no seed reached the target on both sides", ha="center", va="center", transform=ax.transAxes)


def _class_panel(ax, result: dict[str, Any]) -> None:
    rows = [row for row in result["per_class"] if row["difference"] is not None]
    if not rows:
        ax.text(0.5, 0.5, "no per-class figures", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    y = np.arange(len(rows))[::-1]
    ax.axvline(0.0, color="grey", linewidth=1)
    for yi, row in zip(y, rows, strict=True):
        excludes_zero = row["low"] > 0 or row["high"] < 0
        colour = ("tab:green" if row["low"] > 0 else "tab:red") if excludes_zero else "tab:blue"
        ax.errorbar([row["difference"]], [yi], xerr=[[row["difference"] - row["low"]], [row["high"] - row["difference"]]],
                    fmt="o", color=colour, capsize=4, markersize=5)
    # An accuracy difference lies within ±100 points; a t interval of few seeds can reach past that.
    lows, highs = min(row["low"] for row in rows), max(row["high"] for row in rows)
    margin = 0.05 * max(highs - lows, 1e-6)
    ax.set_xlim(max(lows - margin, -100.0), min(highs + margin, 100.0))
    ax.set_yticks(y, [row["class"] for row in rows], fontsize=9 if len(rows) <= 30 else 6)
    ax.set_xlabel(f"B - A, {result.get('per_class_split', 'test')} accuracy (points)")
    ax.set_title("per class, 95% paired t intervals\n(green: B higher, red: B lower, blue: holds 0)", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
