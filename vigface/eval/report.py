"""Write an evaluation report: report.json, figures/*.png and one self-contained report.html.

The HTML page embeds its PNGs as base64 data URIs, so the single file can be mailed or opened
anywhere. Sections appear when their key is in the report dict:

    summary           list of one-line findings
    verification      {"sets": [...], "models": {name: {"description", "table": summarise()}},
                       "comparison": {...}}   our models' 10-fold accuracies, the peer table beside
    peers             peers.peer_rows() + note
    dataset_metrics   {dataset name: metrics.dataset_metrics()}   CST / DIV / SEP
    cfg_sweep         cfg_sweep.cfg_sweep()                       Table 1 and the picked w
    prototypes        prototypes.prototype_stats()                R-R / R-V / V-V with the paper's
    timings, config   stage seconds and the settings used
Figures ({key: (caption, png bytes)}) follow in the order given.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

from vigface.data.files import write_atomically
from vigface.eval.prototypes import PAPER_FIG3B
from vigface.eval.verification import BENCHMARKS

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
.row { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
figure { margin: 12px 0; } figcaption { font-size: 12px; color: #555; }
img { max-width: 100%; border: 1px solid #eee; } .note { font-size: 12px; color: #555; }
"""


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _sci(value) -> str | None:
    """Small quantities (DIV is a variance of scores in (0, 1], often ~1e-4) in scientific notation."""
    return None if value is None else f"{value:.3e}"


def _table(headers: list[str], rows: list[list], digits: int = 2) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v, digits)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _verification_html(v: dict, peers: dict | None) -> str:
    sets = v["sets"]
    headers = ["model", *sets, "average"]
    rows = []
    for name, model in v["models"].items():
        t = model["table"]
        cells = [f"{t['sets'][s]['accuracy']:.2f} &plusmn; {t['sets'][s]['std']:.2f}" for s in sets]
        rows.append(
            "<tr><td>" + html.escape(name) + "</td>" + "".join(f"<td>{c}</td>" for c in cells)
            + f"<td>{_fmt(t['average'])}</td></tr>"
        )  # fmt: skip
    ours = (
        "<table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    notes = "".join(
        f"<p class='note'><b>{html.escape(n)}</b>: {html.escape(m.get('description', ''))}</p>"
        for n, m in v["models"].items()
    )
    comparison = ""
    if v.get("comparison"):
        c = v["comparison"]
        comparison = _table(["quantity", "value"], [[k, c[k]] for k in c], digits=4)
    side = ""
    if peers:
        cols = [c for c in peers["columns"]]
        names = {
            "method": "method",
            "source": "source",
            "images": "# images",
            "average": "avg.",
            **BENCHMARKS,
        }
        side = (
            "<div><h3>Peers (IR-SE50 + AdaFace, published)</h3>"
            + _table([names.get(c, c) for c in cols], [[r[c] for c in cols] for r in peers["rows"]])
            + f"<p class='note'>{html.escape(peers.get('note', ''))}</p></div>"
        )
    return (
        "<h2>1:1 verification (10-fold, flipped-sum embeddings; accuracy % mean &plusmn; std)</h2>"
        f"<div class='row'><div><h3>Ours</h3>{ours}{notes}{comparison}</div>{side}</div>"
    )


def _metrics_html(metrics: dict) -> str:
    rows = [
        [
            name,
            m.get("classes"),
            m.get("images"),
            m.get("cst"),
            _sci(m.get("div")),
            m.get("sep"),
            m.get("ccs"),
            m.get("nnccs"),
        ]
        for name, m in metrics.items()
    ]
    return (
        "<h2>Dataset properties (paper eqs. 10-14, Fig. 8)</h2>"
        + _table(["dataset", "ids", "images", "CST", "DIV", "SEP", "mean CCS", "mean NNCCS"], rows, digits=4)
        + "<p class='note'>CST: mean cosine over all pairs of a class (eq. 10). DIV: variance of the SER-FIQ "
        "score within a class (eqs. 11-12). SEP: mean of cos(own centre) / cos(nearest other centre) "
        "(eqs. 13-14); the ratio is unstable where the nearest other centre's cosine is near 0, so mean "
        "CCS and NNCCS stand beside it. All averaged over classes, measured with the FR model named in the "
        "config.</p>" + _iou_with_real_html(metrics)
    )


def _iou_with_real_html(metrics: dict) -> str:
    """The IoU of each set's genuine / imposter histograms with the real data's (metrics --real);
    they were printed and stored in report.json, but missing from the page."""
    rows = [
        [name, m["iou_with_real"]["genuine"], m["iou_with_real"]["imposter"], m["iou_with_real"]["average"]]
        for name, m in metrics.items()
        if "iou_with_real" in m
    ]
    if not rows:
        return ""
    return "<h3>Similarity distributions against the real data's (IoU, as Table 1)</h3>" + _table(
        ["dataset", "genuine IoU", "imposter IoU", "average"], rows, digits=3
    )


def _sweep_html(sweep: dict) -> str:
    parts = ["<h2>Guidance scale w picked by IoU with real data (Table 1)</h2>"]
    for kind in ("real", "virtual"):
        rows = [[f"{kind} ids"] + [r[key] for r in sweep[kind]] for key in ("genuine", "imposter", "average")]
        for row, key in zip(rows, ("genuine", "imposter", "average"), strict=True):
            row[0] = f"{kind}: {key}"
        parts.append(_table(["IoU \\ w", *[f"{w:g}" for w in sweep["w"]]], rows))
    picked = sweep["picked"]
    parts.append(
        f"<p><b>Picked w: real ids {picked['real']:g}, virtual ids {picked['virtual']:g}</b> "
        f"(paper: {sweep['paper_w']['real']:g} and {sweep['paper_w']['virtual']:g}).</p>"
    )
    first = sweep["real"][0] if sweep.get("real") else {}
    if "genuine_stats" in first:  # sweeps written before pair counts were kept lack them
        parts.append(
            f"<p>Each generated column compares {first['genuine_stats']['pairs']:,} genuine and "
            f"{first['imposter_stats']['pairs']:,} imposter pairs per kind with the real data's. A finite "
            "sample's IoU is below 1 even against its own distribution, the more so the fewer pairs, so read "
            "these across w only, not against the paper's Table 1.</p>"
        )
    return "".join(parts)


def _prototypes_html(stats: dict) -> str:
    rows = []
    for key in ("R-R", "R-V", "V-V"):
        ours = stats.get(key, {})
        paper = PAPER_FIG3B[key]
        rows.append([key, ours.get("mean"), ours.get("std"), paper[0], paper[1]])
    return "<h2>Prototype cosine statistics (Fig. 3b)</h2>" + _table(
        ["pair", "mean (ours)", "std (ours)", "mean (paper)", "std (paper)"], rows, digits=3
    )


def render_html(report: dict, figures: dict[str, tuple[str, bytes]]) -> str:
    parts = [f"<h1>{html.escape(report.get('title', 'vigface report'))}</h1>"]
    if report.get("summary"):
        parts.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in report["summary"]) + "</ul>")
    if report.get("verification"):
        parts.append(_verification_html(report["verification"], report.get("peers")))
    if report.get("dataset_metrics"):
        parts.append(_metrics_html(report["dataset_metrics"]))
    if report.get("cfg_sweep"):
        parts.append(_sweep_html(report["cfg_sweep"]))
    if report.get("prototypes"):
        parts.append(_prototypes_html(report["prototypes"]))
    if figures:
        parts.append("<h2>Figures</h2>")
    for key, (caption, png) in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<figure id='{html.escape(key)}'>"
            f"<img alt='{html.escape(key)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    if report.get("timings"):
        parts.append(
            "<h2>Timings</h2>"
            + _table(["stage", "seconds"], [[k, v] for k, v in report["timings"].items()], 1)
        )
    if report.get("config"):
        parts.append(
            "<h2>Settings</h2><pre>" + html.escape(json.dumps(report["config"], indent=2)) + "</pre>"
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
        + html.escape(report.get("title", "vigface report"))
        + f"</title><style>{_STYLE}</style></head><body>"
        + "".join(parts)
        + "</body></html>"
    )


def _json_safe(value):
    """JSON without NaN/inf tokens (they are not JSON): such floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _json_safe(value.tolist())
    return value


def write_report(out: str | os.PathLike, report: dict, figures: dict[str, tuple[str, bytes]]) -> Path:
    """out/report.json, out/figures/<key>.png, out/report.html (written last); returns the HTML path."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for key, (_, png) in figures.items():
        write_atomically(out / "figures" / f"{key}.png", png)
    data = _json_safe({**report, "figures": {k: f"figures/{k}.png" for k in figures}})
    write_atomically(out / "report.json", json.dumps(data, indent=2))
    write_atomically(out / "report.html", render_html(report, figures))
    return out / "report.html"
