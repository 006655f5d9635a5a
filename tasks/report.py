"""The run report: a markdown page and a self-contained HTML page (styled tables, PNGs embedded as base64).

Both are rendered from the same list of blocks: a header (the run, where its outputs are), a summary, the
paper-shaped tables of ``tasks.results`` with the paper's numbers and deltas, VTAB-1k, few-shot and the plots. The
markdown links each plot as ``plots/<name>.png``; ``write_report`` puts the PNGs there, next to ``report.md``.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks import results as R

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PlotSource = bytes | str | Path

_PAPER_NOTE = (
    "Paper numbers are shown where the model and the pre-training data match; (T5) is Table 5 (fine-tuned at "
    "384 px), (T2) Table 2 (ImageNet at 512/518 px with Polyak averaging), (T6) Table 6, (T9) Table 9. "
    "Δ is ours − paper in percentage points; ours is the mean ± std over seeds."
)


@dataclass(frozen=True)
class Link:
    """A header value a browser opens: ``[text](url)`` in the markdown, ``<a href="url">text</a>`` in the HTML."""

    text: str
    url: str


@dataclass(frozen=True)
class Code:
    """A header value a user copies (a URI, a path): a code span in both outputs."""

    text: str


Inline = str | Link | Code
Field = Inline | tuple[Inline, ...]  # a tuple's parts are shown one after the other


@dataclass(frozen=True)
class ReportedRun:
    """A flow run a report shows: its MLflow run and the folder of its outputs in the artifact store."""

    experiment_id: str
    run_id: str
    artifacts: str


@dataclass(frozen=True, eq=False)
class _Block:
    kind: str  # "h1", "h2", "p", "fields", "table", "image"
    text: str = ""
    table: pd.DataFrame | None = None
    png: bytes = b""
    fields: tuple[tuple[str, Field], ...] = ()


def mlflow_ui(tracking_uri: str) -> str | None:
    """The MLflow UI's address: the tracking URI when it is a server; None for a SQLite file (no UI to link to)."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith("http") else None


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str, tab: str = "") -> str | None:
    """The run's page in the MLflow UI (``tab``: one of its tabs, e.g. ``artifacts``), when there is a UI."""
    if (ui := mlflow_ui(tracking_uri)) is None:
        return None
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")


def _joined(values: Sequence[tuple[Inline, ...]]) -> tuple[Inline, ...]:
    return tuple(part for i, value in enumerate(values) for part in ((", ",) if i else ()) + value)


def report_header(
    tracking_uri: str, runs: Sequence[ReportedRun], experiment: str, fields: Mapping[str, str] | None = None
) -> dict[str, Field]:
    """The report's first table: the MLflow run(s), the experiment, ``fields`` and the artifacts. With an MLflow
    server each run id links to the run's page and the artifacts to its artifacts tab, the store location beside it
    as code (what ``aws s3 ls`` takes); with a SQLite store (no UI) both are plain text."""
    ids, locations = [], []
    for run in runs:
        page = mlflow_run_url(tracking_uri, run.experiment_id, run.run_id)
        tab = mlflow_run_url(tracking_uri, run.experiment_id, run.run_id, "artifacts")
        ids.append((Link(run.run_id, page),) if page else (run.run_id,))
        locations.append((Link("open in MLflow", tab), " · ", Code(run.artifacts)) if tab else (run.artifacts,))
    return {"MLflow run": _joined(ids), "experiment": experiment, **(fields or {}), "artifacts": _joined(locations)}


def plot_filename(name: str) -> str:
    """File name of a plot in ``plots/`` (what the markdown links to)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") + ".png"


def _png_bytes(source: PlotSource) -> bytes:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("plots must be PNG images")
    return data


def _summary(results: pd.DataFrame) -> list[str]:
    benchmarks = sorted({b for b in results["benchmark"] if not b.startswith("vtab/")})
    vtab_tasks = {R.benchmark_key(b) for b in results["benchmark"] if b.startswith("vtab/")}
    if vtab_tasks:
        benchmarks.append(f"VTAB-1k tasks ({len(vtab_tasks)} of 19)")
    lines = [
        f"{len(results)} results from {results['run'].nunique()} run(s). "
        f"Models: {', '.join(sorted(set(results['model'])))}. "
        f"Pre-training data: {', '.join(sorted(set(results['pretrain'])))}. "
        f"Benchmarks: {', '.join(benchmarks)}."
    ]
    compared = R.with_paper_numbers(R.summarize(results)).dropna(subset=["paper"])
    if compared.empty:
        lines.append("No result matches a setup (model and pre-training data) the paper reports.")
    else:
        low = compared.loc[compared["delta"].idxmin()]
        lines.append(
            f"{len(compared)} results match a setup the paper reports: mean Δ {compared['delta'].mean():+.2f} "
            f"points, lowest {low['delta']:+.2f} on {low['benchmark']} "
            f"({R.setup_label(low['model'], low['pretrain'])})."
        )
    return lines


def _blocks(
    results: pd.DataFrame,
    plots: Mapping[str, PlotSource],
    title: str,
    meta: Mapping[str, Field],
    sections: Mapping[str, tuple[pd.DataFrame, str]],
) -> list[_Block]:
    results = R.results_frame(results)
    blocks = [_Block("h1", title)]
    if meta:
        blocks.append(_Block("fields", fields=tuple(meta.items())))
    blocks += [_Block("h2", "Summary"), *(_Block("p", line) for line in _summary(results))]
    for heading, (table, note) in sections.items():
        blocks += [_Block("h2", heading), _Block("table", table=table)] + ([_Block("p", note)] if note else [])
    sections = [
        ("Fine-tuning (paper Tables 2 and 5)", R.paper_table(results), "No fine-tuning results.", _PAPER_NOTE),
        ("VTAB-1k (paper Table 9)", R.vtab_table(results), "No VTAB-1k results.", ""),
        ("Few-shot linear evaluation", R.fewshot_table(results), "No few-shot results.", ""),
    ]
    for heading, table, empty, note in sections:
        blocks.append(_Block("h2", heading))
        blocks.append(_Block("p", empty) if table.empty else _Block("table", table=table))
        if note and not table.empty:
            blocks.append(_Block("p", note))
    if plots:
        blocks.append(_Block("h2", "Plots"))
        blocks += [_Block("image", name, png=_png_bytes(source)) for name, source in plots.items()]
    return blocks


def _parts(value: Field) -> tuple[Inline, ...]:
    return value if isinstance(value, tuple) else (value,)


def _markdown_inline(part: Inline) -> str:
    if isinstance(part, Link):
        text = part.text.replace("[", "\\[").replace("]", "\\]")
        return f"[{text}]({part.url.replace(' ', '%20').replace(')', '%29')})"
    if isinstance(part, Code):
        return f"`{part.text}`"
    return str(part)


def _fields_markdown(fields: tuple[tuple[str, Field], ...]) -> str:
    """The header as a two-column table; ``tasks.results.to_markdown`` escapes what would break a table cell."""
    values = ["".join(_markdown_inline(p) for p in _parts(value)) for _, value in fields]
    return R.to_markdown(pd.DataFrame({"value": values}, index=pd.Index([name for name, _ in fields], name="field")))


def _markdown(blocks: list[_Block]) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"{'#' * int(b.kind[1])} {b.text}\n")
        elif b.kind == "p":
            out.append(b.text + "\n")
        elif b.kind == "fields":
            out.append(_fields_markdown(b.fields))
        elif b.kind == "table":
            out.append(R.to_markdown(b.table))
        else:
            out.append(f"![{b.text}](plots/{plot_filename(b.text)})\n")
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1rem; color: #1f2328; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .5rem; white-space: nowrap; }
th { background: #f6f8fa; text-align: left; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.pos { color: #1a7f37; }
td.neg { color: #cf222e; font-weight: 600; }
figure { margin: 1rem 0 2rem; }
img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #59636e; font-size: .9rem; }
"""


def _html_grid(header: list[str], rows: list[list[str]]) -> str:
    """A table of header texts and rows of ``<td>`` elements."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_cell(text: str, right: bool) -> str:
    classes = ["num"] if right else []
    if re.match(r"^[+-]\d", text):
        classes.append("neg" if text.startswith("-") else "pos")
    attr = f' class="{" ".join(classes)}"' if classes else ""
    return f"<td{attr}>{html.escape(text)}</td>"


def _html_table(df: pd.DataFrame) -> str:
    header, rows, numeric = R.table_cells(df)
    return _html_grid(header, [[_html_cell(t, r) for t, r in zip(row, numeric, strict=True)] for row in rows])


def _html_inline(part: Inline) -> str:
    if isinstance(part, Link):
        return f'<a href="{html.escape(part.url)}">{html.escape(part.text)}</a>'
    if isinstance(part, Code):
        return f"<code>{html.escape(part.text)}</code>"
    return html.escape(str(part))


def _fields_html(fields: tuple[tuple[str, Field], ...]) -> str:
    rows = [
        [f"<td>{html.escape(name)}</td>", "<td>" + "".join(_html_inline(p) for p in _parts(value)) + "</td>"]
        for name, value in fields
    ]
    return _html_grid(["field", "value"], rows)


def _html(blocks: list[_Block], title: str) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "fields":
            out.append(_fields_html(b.fields))
        elif b.kind == "table":
            out.append(_html_table(b.table))
        else:
            data = base64.b64encode(b.png).decode("ascii")
            name = html.escape(b.text)
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{name}"><figcaption>{name}</figcaption></figure>'
            )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(out) + "\n</body>\n</html>\n"
    )


def build_report(
    results: pd.DataFrame,
    plots: Mapping[str, PlotSource] | None = None,
    title: str = "vitflow report",
    meta: Mapping[str, Field] | None = None,
    sections: Mapping[str, tuple[pd.DataFrame, str]] | None = None,
) -> tuple[str, str]:
    """``(markdown, html)`` of a results table (the tidy table of ``tasks.results``).

    Sections: ``meta`` (run ids, spec hash, commit, ...: :func:`report_header`) under the title, a summary, the
    paper-shaped tables with the paper's numbers and deltas, VTAB-1k, few-shot, and the plots (PNG bytes or files, by
    caption). The HTML embeds everything; the markdown links plots as ``plots/<name>.png`` (``write_report`` writes
    them there).
    ``sections``: heading -> (table, note) of a flow's own tables, placed after the summary.
    """
    blocks = _blocks(results, plots or {}, title, meta or {}, sections or {})
    return _markdown(blocks), _html(blocks, title)


def write_report(
    directory: str | Path,
    results: pd.DataFrame,
    plots: Mapping[str, PlotSource] | None = None,
    title: str = "vitflow report",
    meta: Mapping[str, Field] | None = None,
    sections: Mapping[str, tuple[pd.DataFrame, str]] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``plots/<name>.png`` into ``directory``; returns the paths."""
    directory = Path(directory)
    (directory / "plots").mkdir(parents=True, exist_ok=True)
    markdown, page = build_report(results, plots, title, meta, sections)
    paths = {"markdown": directory / "report.md", "html": directory / "report.html"}
    paths["markdown"].write_text(markdown, encoding="utf-8")
    paths["html"].write_text(page, encoding="utf-8")
    for name, source in (plots or {}).items():
        paths[f"plot:{name}"] = directory / "plots" / plot_filename(name)
        paths[f"plot:{name}"].write_bytes(_png_bytes(source))
    return paths
