"""Pieces every HTML page of the project is made of (the run report, the comparison of runs):
the 68% interval, tables, embedded figures, CSV files and the style sheet."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path

import numpy as np

from pipeline.io import atomic_path


def confidence_interval_68(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 68% Student-t interval of the mean (half-width NaN for one value)."""
    from scipy import stats

    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, math.nan
    sem = arr.std(ddof=1) / math.sqrt(arr.size)
    return mean, float(stats.t.ppf(0.84, arr.size - 1) * sem)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def png_data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.up{color:#080}.down{color:#b00}.n{color:#888;font-size:.8em}.note{background:#fff8e1;border-left:4px solid #f5b800;padding:.5em 1em}
.muted{color:#666;font-size:.9em}img{max-width:100%}
"""
