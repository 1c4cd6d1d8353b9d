"""The audit's report: numbers from the cached records, and the json / csv / md / html writers with plots and grids."""

import csv
import html
import io
import math
import os
from dataclasses import asdict

import numpy as np
import torch

from ..metrics import mean_std, sampling_floor, score_predictions
from ..utils import atomic_write_json, atomic_write_text
from ..visualization import PALETTE, annotated_grid


def check_report_dependencies() -> None:
    """The plots need matplotlib (the `report` extra); say so before an audit starts, not after it ran."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ValueError(
            "The audit's report plots need matplotlib: install the `report` extra, `pip install "
            "diffusers-fair[report]` (or `pip install matplotlib`)."
        ) from error


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def score_record(record: dict[str, torch.Tensor], attributes: dict[str, list[str]], target=None) -> tuple[dict, dict]:
    r"""
    The numbers of one prompt and model from its cached record (what a recomputation from the cache gives).

    Returns:
        `(entry, row)`: `entry` in the report's per-prompt form (`{"num_images", "attributes": {group:
        {"frequencies": {class: f}, "bias": b, "deviation": d}}, "clip_t", ...}`), `row` the flat
        [`score_predictions`] row plus the similarity means.
    """
    probabilities = {a: record[f"probabilities/{a}"] for a in attributes}
    mask = record.get("has_face")
    row, classes = score_predictions(probabilities, attributes, target, mask=mask)
    entry: dict = {"num_images": row["num_images"]}
    if mask is not None:
        entry["num_no_face"] = row["num_excluded"]
        row["num_no_face"] = float(row["num_excluded"])
    entry["attributes"] = {}
    for group, names in classes.items():
        scores = {
            "frequencies": {c: _finite(f) for c, f in zip(names, row[f"freq/{group}"])},
            "bias": _finite(row[f"bias/{group}"]),
        }
        if f"deviation/{group}" in row:
            scores["deviation"] = _finite(row[f"deviation/{group}"])
        entry["attributes"][group] = scores
    for key in ("clip_t", "clip_i", "dino"):
        if key in record:
            row[key] = float(record[key].double().mean())
            entry[key] = row[key]
    return entry, row


def build_report(config, records: dict[str, list[dict]], classifier_attributes, target, versions: dict) -> dict:
    r"""
    The report of a finished audit.

    Args:
        config ([`AuditConfig`]): The audit's arguments.
        records (`dict[str, list[dict]]`): Model -> one cached record per prompt (in prompt order).
        classifier_attributes (`dict[str, list[str]]`): The classifier's heads (the audited ones are scored).
        target ([`TargetDistribution`], *optional*): Adds deviations.
        versions (`dict[str, str]`): Library versions.

    Returns:
        `dict` (JSON-serialisable): `"prompts"` (per prompt `{"prompt", "attributes": ...}`, or `{"prompt",
        "models": {model: ...}}` when several models are compared), `"summary"` (model -> metric -> mean / sd over
        prompts, as the paper's Table 1), `"sampling_floor"` (model -> metric -> what a model exactly on target, or
        balanced, measures on average with the images each prompt counted: [`~diffusers_fair.metrics.sampling_floor`],
        averaged over prompts), `"summary_table"` (Markdown), the arguments and versions.
    """
    attributes = {a: list(classifier_attributes[a]) for a in config.attributes}
    models = list(records)
    entries = {m: [] for m in models}
    rows = {m: [] for m in models}
    groups = {}
    for model in models:
        for record in records[model]:
            entry, row = score_record(record, attributes, target)
            entries[model].append(entry)
            rows[model].append(row)
            groups = {g: list(s["frequencies"]) for g, s in entry["attributes"].items()}
    prompts = []
    for index, prompt in enumerate(config.prompts):
        if len(models) == 1:
            prompts.append({"prompt": prompt, **entries[models[0]][index]})
        else:
            prompts.append({"prompt": prompt, "models": {m: entries[m][index] for m in models}})
    summary = {}
    for model in models:
        metrics = [k for k in rows[model][0] if k.startswith(("bias/", "deviation/"))]
        metrics += [k for k in ("clip_t", "clip_i", "dino", "num_no_face") if k in rows[model][0]]
        summary[model] = {}
        for metric in metrics:
            mean, sd = mean_std([r.get(metric, float("nan")) for r in rows[model]])
            summary[model][metric] = {"mean": _finite(mean), "sd": _finite(sd)}
    floors = {}  # counted images -> what an ideal model measures on that many
    sampling_floors = {}
    for model in models:
        per_prompt = []
        for entry in entries[model]:
            counted = entry["num_images"] - entry.get("num_no_face", 0)
            if counted > 0:
                if counted not in floors:
                    floors[counted] = sampling_floor(attributes, counted, target)
                per_prompt.append(floors[counted])
        metrics = per_prompt[0] if per_prompt else {}
        sampling_floors[model] = {m: _finite(mean_std([f[m] for f in per_prompt])[0]) for m in metrics}
    arguments = asdict(config)
    arguments["num_prompts"] = len(arguments.pop("prompts"))
    report = {
        "tool": "diffusers-fair audit",
        "versions": versions,
        "arguments": arguments,
        "attributes": attributes,
        "groups": groups,
        "target": None if target is None else target.to_string(),
        "models": models,
        "summary": summary,
        "sampling_floor": sampling_floors,
        "prompts": prompts,
    }
    report["summary_table"] = summary_table(report)
    return report


METRIC_TITLES = {"clip_t": "CLIP-T ↑", "clip_i": "CLIP-I ↑", "dino": "DINO ↑", "num_no_face": "no face (images)"}


def _metric_title(metric: str) -> str:
    if metric in METRIC_TITLES:
        return METRIC_TITLES[metric]
    kind, group = metric.split("/", 1)
    return f"{group} {kind} ↓"


def _format(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.2f} ± {stat['sd']:.2f}"


def _summary_rows(report: dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The summary's metrics and rows (label, cells): one row per model, then the sampling floor."""
    metrics = []
    for stats in report["summary"].values():
        metrics += [m for m in stats if m not in metrics]
    rows = [
        (model, [_format(stats[m]) if m in stats else "" for m in metrics])
        for model, stats in report["summary"].items()
    ]
    floors = report.get("sampling_floor", {})
    values = list(floors.values())
    if values and all(floor == values[0] for floor in values):  # one row when every model counted the same images
        labelled = [("sampling floor", values[0])]
    else:
        labelled = [(f"sampling floor ({model})", floor) for model, floor in floors.items()]
    for label, floor in labelled:
        rows.append((label, [f"{floor[m]:.2f}" if floor.get(m) is not None else "" for m in metrics]))
    return metrics, rows


def summary_table(report: dict) -> str:
    """
    The summary as a Markdown table: one row per model, `mean ± sd` over prompts (the paper's Table 1 form), and the
    sampling floor: what a model exactly on target (or balanced) measures on average at this many images per prompt.
    """
    metrics, rows = _summary_rows(report)
    lines = [
        "| model | " + " | ".join(_metric_title(m) for m in metrics) + " |",
        "| --- |" + " --- |" * len(metrics),
    ]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


# --- writers ------------------------------------------------------------------------------------------------------


def _per_model_entries(report: dict) -> list[tuple[str, str, dict]]:
    out = []
    for item in report["prompts"]:
        models = item["models"] if "models" in item else {report["models"][0]: item}
        for model, entry in models.items():
            out.append((model, item["prompt"], entry))
    return out


def write_csv(report: dict, path: str) -> None:
    """`report.csv`: one row per prompt (and model), frequencies as `freq/<group>/<class>` columns."""
    rows = []
    for model, prompt, entry in _per_model_entries(report):
        row = {"model": model, "prompt": prompt, "num_images": entry["num_images"]}
        if "num_no_face" in entry:
            row["num_no_face"] = entry["num_no_face"]
        for group, scores in entry["attributes"].items():
            for name, value in scores["frequencies"].items():
                row[f"freq/{group}/{name}"] = value
            row[f"bias/{group}"] = scores["bias"]
            if "deviation" in scores:
                row[f"deviation/{group}"] = scores["deviation"]
        for key in ("clip_t", "clip_i", "dino"):
            if key in entry:
                row[key] = entry[key]
        rows.append(row)
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def write_markdown(report: dict, path: str) -> None:
    """`report.md`: the summary table with a line on what was measured, ready for a model card."""
    args = report["arguments"]
    lines = [
        "## Demographic bias audit",
        "",
        f"Model `{args['model']}`"
        + (f" with LoRA {', '.join(f'`{p}`' for p in args['loras'])}" if args["loras"] else "")
        + f"; {args['num_prompts']} prompts (`{args['prompt_set']}`), {args['num_images_per_prompt']} images each, "
        f"{args['num_inference_steps']} steps, guidance {args['guidance_scale']}, seed {args['seed']}; attributes "
        f"read by `{args['classifier']}`. Bias: mean absolute difference of class frequencies per prompt (0 is "
        "balanced); values are mean ± sd over prompts. The sampling floor is what a model whose attributes follow "
        "the target (balanced where there is none) measures on average at this many images per prompt: a measured "
        "value near it is as low as this sample can show.",
        "",
        report["summary_table"],
        "",
        f"Made with diffusers-fair {report['versions']['diffusers-fair']} (`diffusers-fair audit`).",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def write_report(report: dict, output: str, config, grid_images: int = 8) -> None:
    """Writes `report.json`, `report.csv`, `report.md`, the plots, the grids and `index.html` into `output`."""
    atomic_write_json(os.path.join(output, "report.json"), report)
    write_csv(report, os.path.join(output, "report.csv"))
    write_markdown(report, os.path.join(output, "report.md"))
    plots = write_plots(report, os.path.join(output, "plots"))
    grids = write_grids(report, output, config, grid_images)
    write_html(report, os.path.join(output, "index.html"), plots, grids)


# --- plots and grids ----------------------------------------------------------------------------------------------


def _target_probabilities(report: dict, group: str, classes: list[str]) -> list[float]:
    if report["target"]:
        from ..target_distribution import TargetDistribution

        target = TargetDistribution.from_string(report["target"], attributes=report["attributes"])
        for factor in target.align_to(report["attributes"]).factors:
            if ",".join(factor.attributes) == group and not factor.given:
                return factor.probabilities[0].tolist()
    return [1.0 / len(classes)] * len(classes)


def write_plots(report: dict, folder: str) -> list[tuple[str, str]]:
    r"""
    One PNG per attribute group, as the paper's Fig. 4: the frequency of each class per prompt (one marker per
    model) with the target as a dashed line. Binary attributes show their second class only (the first is its
    complement).

    Returns:
        `list[(group, relative path)]`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    entries = _per_model_entries(report)
    prompts = [item["prompt"] for item in report["prompts"]]
    written = []
    for g, (group, classes) in enumerate(report["groups"].items()):
        shown = classes[1:] if len(classes) == 2 else classes
        target = _target_probabilities(report, group, classes)
        width = min(max(6.0, 0.28 * len(prompts) + 2), 40.0)
        fig, axes = plt.subplots(len(shown), 1, figsize=(width, 2.2 * len(shown) + 1.2), squeeze=False, sharex=True)
        for row, name in enumerate(shown):
            ax = axes[row][0]
            for m, model in enumerate(report["models"]):
                values = [e["attributes"][group]["frequencies"][name] for mm, _, e in entries if mm == model]
                values = [np.nan if v is None else v for v in values]
                ax.plot(range(len(prompts)), values, "o", color=PALETTE[m % len(PALETTE)], label=model, ms=5)
            ax.axhline(target[classes.index(name)], color="k", ls="--", lw=1, label="target")
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel(f"freq. {name}")
            ax.grid(alpha=0.3)
        axes[0][0].set_title(f"{group}: class frequency per prompt")
        axes[0][0].legend(loc="upper right", fontsize=8, ncol=len(report["models"]) + 1)
        axes[-1][0].set_xticks(range(len(prompts)))
        axes[-1][0].set_xticklabels([_short_prompt(p) for p in prompts], rotation=70, ha="right", fontsize=7)
        fig.tight_layout()
        name = f"frequencies_{g:02d}.png"
        fig.savefig(os.path.join(folder, name), dpi=90)
        plt.close(fig)
        written.append((group, f"plots/{name}"))
    return written


def _short_prompt(prompt: str, length: int = 40) -> str:
    for prefix in ("a photo of the face of a ", "a person playing "):
        if prompt.startswith(prefix):
            prompt = prompt[len(prefix) :].removesuffix(", a person")
    return prompt if len(prompt) <= length else prompt[: length - 1] + "…"


def write_grids(report: dict, output: str, config, grid_images: int) -> list[str]:
    r"""
    One PNG per prompt as the paper's Fig. 3: a row per model (same column, same noise), each image with a bar per
    attribute coloured by its predicted class, as long as the classifier's confidence.

    Returns:
        Relative paths, one per prompt.
    """
    from PIL import Image

    from .core import load_images, load_record

    folder = os.path.join(output, "grids")
    os.makedirs(folder, exist_ok=True)
    count = min(grid_images, config.num_images_per_prompt)
    paths = []
    for index, prompt in enumerate(config.prompts):
        rows, probabilities, included = [], [], []
        for model in report["models"]:
            record = load_record(output, model, index, prompt)
            rows.append(load_images(output, model, index, count))
            probabilities.append({a: record[f"probabilities/{a}"][:count] for a in config.attributes})
            # Images without a face are excluded from the numbers: no bars for them.
            included.append(record["has_face"][:count] if "has_face" in record else None)
        grid = annotated_grid(rows, probabilities, included)
        name = f"grids/{index:05d}.png"
        Image.fromarray(grid).save(os.path.join(output, name))
        paths.append(name)
    return paths


# --- html ---------------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; background: #fff; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f0f0f0; } .prompt { margin: 2em 0; border-top: 1px solid #ddd; padding-top: 1em; }
.swatch { display: inline-block; width: 1em; height: 0.8em; margin: 0 4px 0 12px; vertical-align: middle; }
img { image-rendering: pixelated; max-width: 100%; } .models { color: #555; font-size: 0.9em; }
"""


def _summary_html(report: dict) -> str:
    metrics, rows = _summary_rows(report)
    head = "".join(f"<th>{html.escape(_metric_title(m))}</th>" for m in metrics)
    body = ""
    for label, cells in rows:
        body += f"<tr><th>{html.escape(label)}</th>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
    return f"<table><tr><th>model</th>{head}</tr>{body}</table>"


def write_html(report: dict, path: str, plots: list[tuple[str, str]], grids: list[str]) -> None:
    """`index.html`: self-contained (inline style, relative image paths, no scripts)."""
    args = report["arguments"]
    legend = ""
    for attribute, classes in report["attributes"].items():
        swatches = "".join(
            f'<span class="swatch" style="background:{PALETTE[k % len(PALETTE)]}"></span>{html.escape(c)}'
            for k, c in enumerate(classes)
        )
        legend += f"<li><b>{html.escape(attribute)}</b>: {swatches}</li>"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>diffusers-fair audit: {html.escape(args['model'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Demographic bias audit of <code>{html.escape(args['model'])}</code></h1>",
        f"<p>{args['num_prompts']} prompts from <code>{html.escape(args['prompt_set'])}</code>, "
        f"{args['num_images_per_prompt']} images each, {args['num_inference_steps']} steps, guidance "
        f"{args['guidance_scale']}, seed {args['seed']}; classifier <code>{html.escape(args['classifier'])}</code>. "
        "Bias is the mean absolute difference of class frequencies per prompt (0 = balanced), shown as mean ± sd "
        "over prompts.</p>",
        "<h2>Summary</h2>",
        _summary_html(report),
        '<p>Numbers: <a href="report.json">report.json</a>, <a href="report.csv">report.csv</a>, '
        '<a href="report.md">report.md</a>.</p>',
        "<h2>Class frequency per prompt</h2>",
    ]
    for group, src in plots:
        parts.append(f'<figure><img src="{html.escape(src)}" alt="frequencies of {html.escape(group)}"></figure>')
    parts += [
        "<h2>Images</h2>",
        "<p>Each image carries one bar per attribute, in this order, coloured by the predicted class and as long as "
        f"the classifier's confidence:</p><ul>{legend}</ul>",
        f'<p class="models">Rows: {html.escape(", ".join(report["models"]))} (same column = same initial noise).</p>',
    ]
    for item, src in zip(report["prompts"], grids):
        models = item["models"] if "models" in item else {report["models"][0]: item}
        cells = []
        for model, entry in models.items():
            text = "; ".join(
                f"{g}: " + ", ".join(f"{c} {v:.2f}" for c, v in s["frequencies"].items() if v is not None)
                for g, s in entry["attributes"].items()
            )
            cells.append(f"<li><b>{html.escape(model)}</b>: {html.escape(text)}</li>")
        parts.append(
            f'<div class="prompt"><h3>{html.escape(item["prompt"])}</h3><ul class="models">{"".join(cells)}</ul>'
            f'<img src="{html.escape(src)}" alt="{html.escape(item["prompt"])}"></div>'
        )
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")
