"""Evaluation runs: render a source with each method and score it, or score two folders of images.

Output folder (written whole, atomically; an earlier output of this command may be replaced)::

    summary.json            {"format", "count", "methods": {label: {"spec", "metrics": {m: mean},
                             "median": {m: median}, "count", "seconds_median"}}, "data", ...};
                            with one method (or --pred/--target) also "metrics" and "median" at the top
    per_image.csv           name, method, focus, strength, one column per metric, render seconds
    index.html              the metric table and the worst cases side by side (input, disparity, each
                            method, reference), plus the robustness plot when run
    pred/<label>/<name>.png every prediction, as scored (8 bit)
    report/                 the page's thumbnails
    robustness.csv, robustness_per_image.csv, robustness.png    with --robustness (``robustness``)

Every image is scored as its 8-bit rendering (``io.images.to_uint8``, the project's one rounding rule), as
a file on disk would be, so scoring saved predictions with ``--pred/--target`` gives the same numbers.
"""

from __future__ import annotations

import html
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.evaluate import report
from bokehdiff_jax.evaluate.methods import Method, Renderer
from bokehdiff_jax.evaluate.metrics import Scorer
from bokehdiff_jax.evaluate.robustness import perturb_disparity, plot, summarize, write_csv
from bokehdiff_jax.evaluate.sources import Example, Source

OUT_NAMES = (
    r"summary\.json|per_image\.csv|index\.html|pred|report|robustness(_per_image)?\.csv|robustness\.png"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
ROBUSTNESS_METRICS = ("psnr", "lpips")  # the paper's Fig. 7 (others when these are not computed)


def as_8bit(image: np.ndarray, what: str = "image") -> np.ndarray:
    """``image`` as its 8-bit rendering, back in [0, 1] float32."""
    from bokehdiff_jax.io.images import to_uint8

    return to_uint8(image, what).astype(np.float32) / 255.0


def file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:120] or "_"


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


def _render(renderer: Renderer, ex: Example, disparity: np.ndarray, label: str) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    pred = np.asarray(renderer(ex.image, disparity, ex.focus, ex.strength), np.float32)
    dt = time.perf_counter() - t0
    if pred.shape != ex.image.shape:
        raise InputError(f"method {label} returned {pred.shape} for {ex.name}, expected {ex.image.shape}")
    return as_8bit(pred, f"{label}'s output for {ex.name}"), dt


def evaluate_source(
    source: Source,
    methods: Sequence[Method],
    renderers: dict[str, Renderer],
    scorer: Scorer,
    out: Path,
    *,
    worst: int = 8,
    ks: Sequence[int] | None = None,
    progress: bool = True,
    data_spec: str = "",
) -> dict[str, Any]:
    """Renders every example of ``source`` with each method, scores it, writes the outputs (module doc)
    into the existing folder ``out``; ``ks``: also the robustness study over these ``k``. Returns the
    summary."""
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise InputError(f"method labels must be distinct, got {labels} (name them LABEL=SPEC)")
    if len(source) == 0:
        raise InputError("the data source holds no example")
    metrics = scorer.metrics
    for label in labels:
        (out / "pred" / label).mkdir(parents=True)
    from PIL import Image

    from bokehdiff_jax.io.images import to_uint8

    rows: list[dict[str, Any]] = []
    rob_rows: list[dict[str, Any]] = []
    index_of: dict[str, int] = {}
    seen: set[str] = set()
    for i in _progress(range(len(source)), len(source), "evaluate", progress):
        ex = source[i]
        fname = file_name(ex.name)
        if fname in seen:
            raise InputError(f"two examples are both named {ex.name!r}")
        seen.add(fname)
        index_of[ex.name] = i
        target = as_8bit(ex.target, f"reference of {ex.name}")
        for m in methods:
            pred, dt = _render(renderers[m.label], ex, ex.disparity, m.label)
            Image.fromarray(to_uint8(pred)).save(out / "pred" / m.label / f"{fname}.png")
            scores = scorer(pred, target)
            base = {"name": ex.name, "method": m.label, "focus": ex.focus, "strength": ex.strength}
            rows.append({**base, **scores, "seconds": dt})
            if ks and 0 in ks:
                rob_rows.append({"name": ex.name, "method": m.label, "k": 0, **scores})
        for k in ks or ():
            if k == 0:
                continue
            disp_k = perturb_disparity(ex.disparity, k)
            for m in methods:
                pred, _ = _render(renderers[m.label], ex, disp_k, m.label)
                rob_rows.append({"name": ex.name, "method": m.label, "k": k, **scorer(pred, target)})

    per_method = {}
    for m in methods:
        sel = [r for r in rows if r["method"] == m.label]
        s = report.aggregate(sel, metrics)
        s["spec"] = m.spec
        s["seconds_median"] = float(np.median([r["seconds"] for r in sel]))
        per_method[m.label] = s
    summary: dict[str, Any] = {
        "format": report.FORMAT,
        "data": data_spec,
        "description": source.description,
        "count": len(source),
        "methods": per_method,
    }
    if len(methods) == 1:
        summary.update(metrics=per_method[labels[0]]["metrics"], median=per_method[labels[0]]["median"])
    write_csv(out / "per_image.csv", rows)

    sections = [
        ("Data", f"<pre>{html.escape(source.description)} ({html.escape(data_spec)})</pre>"),
        (
            "Metrics",
            report.metric_table(per_method, metrics) + '<p><a href="per_image.csv">per_image.csv</a> · '
            '<a href="summary.json">summary.json</a></p>',
        ),
    ]
    if ks:
        rob_metrics = [m for m in ROBUSTNESS_METRICS if m in metrics] or list(metrics[:1])
        rob_summary = summarize(rob_rows, rob_metrics)
        write_csv(out / "robustness_per_image.csv", rob_rows)
        write_csv(out / "robustness.csv", rob_summary)
        plot(out / "robustness.png", rob_summary, rob_metrics)
        summary["robustness"] = {"ks": list(ks), "metrics": rob_metrics, "csv": "robustness.csv"}
        sections.append(
            (
                "Robustness to disparity erosion / dilation",
                '<img src="robustness.png" style="max-width:100%">'
                '<p><a href="robustness.csv">robustness.csv</a></p>',
            )
        )
    sections.append(_worst_section(source, index_of, methods, rows, metrics, out, worst))
    report.write_page(out / "index.html", f"Evaluation: {source.description}", sections)
    report.write_json(out / "summary.json", summary)
    return summary


def _worst_section(source, index_of, methods, rows, metrics, out: Path, worst: int) -> tuple[str, str]:
    """The worst ``worst`` examples of the first method, every method side by side (examples are loaded
    again from the source: only these few are ever held twice)."""
    by = report.rank_metric(metrics)
    first = [r for r in rows if r["method"] == methods[0].label]
    names = report.worst_names(first, by, worst)
    (out / "report").mkdir()
    body = []
    for n in names:
        ex = source[index_of[n]]
        f = file_name(n)
        figs = [
            report.figure(
                "report/" + report.save_thumb(out / "report" / f"{f}_input.jpg", ex.image),
                f"{n}: input (focus {ex.focus:.3f}, K {ex.strength:.1f} px)",
            ),
            report.figure(
                "report/" + report.save_thumb(out / "report" / f"{f}_disparity.jpg", ex.disparity),
                "disparity",
            ),
        ]
        for m in methods:
            r = next(r for r in rows if r["name"] == n and r["method"] == m.label)
            pred = np.asarray(_read_png(out / "pred" / m.label / f"{f}.png"))
            vals = ", ".join(f"{k} {r[k]:.3f}" for k in metrics)
            figs.append(
                report.figure(
                    "report/" + report.save_thumb(out / "report" / f"{f}_{m.label}.jpg", pred),
                    f"{m.label}: {vals}",
                )
            )
        figs.append(
            report.figure(
                "report/" + report.save_thumb(out / "report" / f"{f}_target.jpg", ex.target), "reference"
            )
        )
        body.append(f'<div class="row">{"".join(figs)}</div>')
    title = f"Worst {len(names)} by {by.upper()} of {methods[0].label}"
    return title, "".join(body) or "<p>none</p>"


def _read_png(path: Path) -> np.ndarray:
    from bokehdiff_jax.io.images import read_image

    return read_image(path)


def _images_by_stem(folder: Path, flag: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{flag} {folder}: no such folder")
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in files:
                raise InputError(
                    f"{flag} {folder}: two images named {p.stem} ({files[p.stem].name}, {p.name})"
                )
            files[p.stem] = p
    if not files:
        raise InputError(f"{flag} {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def evaluate_folders(
    pred_dir: Path, target_dir: Path, scorer: Scorer, out: Path, *, worst: int = 8, progress: bool = True
) -> dict[str, Any]:
    """Scores every image of ``pred_dir`` against the image of the same name (stem) in ``target_dir``;
    both folders must hold the same names. Writes summary.json, per_image.csv, index.html, report/."""
    from bokehdiff_jax.io.images import read_image

    preds, targets = _images_by_stem(pred_dir, "--pred"), _images_by_stem(target_dir, "--target")
    only_p, only_t = sorted(set(preds) - set(targets)), sorted(set(targets) - set(preds))
    if only_p or only_t:
        raise InputError(
            f"--pred and --target must hold the same names; only in --pred: {only_p[:3] or 'none'}, "
            f"only in --target: {only_t[:3] or 'none'}"
        )
    rows = []
    for stem in _progress(sorted(preds), len(preds), "score", progress):
        p, t = read_image(preds[stem]), read_image(targets[stem])
        if p.shape != t.shape:
            raise InputError(
                f"{preds[stem]} is {p.shape[1]}x{p.shape[0]} but {targets[stem]} is {t.shape[1]}x{t.shape[0]}"
            )
        rows.append({"name": stem, **scorer(as_8bit(p), as_8bit(t))})
    metrics = scorer.metrics
    agg = report.aggregate(rows, metrics)
    summary = {"format": report.FORMAT, "pred": str(pred_dir), "target": str(target_dir), **agg}
    write_csv(out / "per_image.csv", rows)

    by = report.rank_metric(metrics)
    (out / "report").mkdir()
    body = []
    for n in report.worst_names(rows, by, worst):
        p, t = read_image(preds[n]), read_image(targets[n])
        f = file_name(n)
        r = next(r for r in rows if r["name"] == n)
        vals = ", ".join(f"{k} {r[k]:.3f}" for k in metrics)
        figs = [
            report.figure(
                "report/" + report.save_thumb(out / "report" / f"{f}_pred.jpg", p),
                f"{n}: prediction ({vals})",
            ),
            report.figure("report/" + report.save_thumb(out / "report" / f"{f}_target.jpg", t), "reference"),
            report.figure(
                "report/" + report.save_thumb(out / "report" / f"{f}_error.jpg", report.error_map(p, t)),
                "4 x |error|",
            ),
        ]
        body.append(f'<div class="row">{"".join(figs)}</div>')
    per = {"pred": agg}
    report.write_page(
        out / "index.html",
        f"Evaluation: {pred_dir} vs {target_dir}",
        [
            (
                "Metrics",
                report.metric_table(per, metrics) + '<p><a href="per_image.csv">per_image.csv</a></p>',
            ),
            (f"Worst {len(body)} by {by.upper()}", "".join(body)),
        ],
    )
    report.write_json(out / "summary.json", summary)
    return summary
