"""``report.png`` and a self-contained ``report.html`` (the figure inlined as base64: the page
opens with no network and no files beside it)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from bigscale.report.plots import build_figure
from bigscale.report.runs import Run, differing_settings

PNG = "report.png"
HTML = "report.html"
_SUMMARY_KEYS = ("loss", "eval_loss", "exact_match", "tokens_per_s", "skipped_steps", "loss_spikes")


def write_report(runs: list[Run], out_dir: Path) -> Path:
    """Write ``report.png`` and ``report.html`` into ``out_dir``; returns the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    build_figure(runs).savefig(buffer, format="png", dpi=90)
    png = buffer.getvalue()
    _atomic_write(out_dir / PNG, png)
    page = render_page(runs, base64.b64encode(png).decode("ascii"))
    _atomic_write(out_dir / HTML, page.encode("utf-8"))
    return out_dir / HTML


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def render_page(runs: list[Run], png_b64: str) -> str:
    title = "bigscale report: " + ", ".join(run.label for run in runs)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:16px;background:#fff}"
        "table{border-collapse:collapse;margin:12px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<img alt='curves' src='data:image/png;base64,{png_b64}'>",
        "<h2>Last values</h2>",
        _summary_table(runs),
    ]
    if len(runs) > 1:
        parts += ["<h2>Settings that differ</h2>", _settings_table(runs)]
    parts += ["<h2>Runs</h2><ul>"]
    parts += [f"<li>{html.escape(r.label)}: {html.escape(str(r.directory))}</li>" for r in runs]
    parts += ["</ul></body></html>"]
    return "\n".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return html.escape(value if isinstance(value, str) else json.dumps(value, default=str))


def _summary_table(runs: list[Run]) -> str:
    keys = [k for k in _SUMMARY_KEYS if any(run.series(k)[0] for run in runs)]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["run", "last step", *keys])
    rows = []
    for run in runs:
        steps = [row.get("step") for row in run.rows if isinstance(row.get("step"), int)]
        cells = [run.label, max(steps, default=None)]
        for key in keys:
            values = run.series(key)[1]
            cells.append(values[-1] if values else None)
        rows.append("".join(f"<td>{_cell(c)}</td>" for c in cells))
    return f"<table><tr>{head}</tr>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>"


def _settings_table(runs: list[Run]) -> str:
    keys = differing_settings(runs)
    if not keys:
        return "<p>The runs' config.yaml files hold the same settings.</p>"
    head = "<th>setting</th>" + "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    rows = [
        f"<td>{html.escape(k)}</td>" + "".join(f"<td>{_cell(r.settings.get(k))}</td>" for r in runs)
        for k in keys
    ]
    return f"<table><tr>{head}</tr>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>"


def write_run_report(run_dir: Path) -> None:
    """The run's own report.html at its end or stop; a plotting failure is logged as a warning
    and never fails the run."""
    from bigscale.logging import get_logger
    from bigscale.report.runs import read_run

    log = get_logger(__name__)
    try:
        path = write_report([read_run(run_dir)], run_dir)
    except Exception as exc:  # the run's result matters more than its picture
        log.warning("could not write the run's report: %s: %s", type(exc).__name__, exc)
        return
    log.info("report: %s", path)
