"""One tidy table of every result, views shaped like the paper's tables, the paper's numbers beside ours.

The tidy table has one row per number: ``run`` (the run id), ``model`` (registry key or paper name), ``pretrain``
(pre-training data: ``imagenet``, ``imagenet21k``, ``jft300m`` or anything else), ``benchmark`` (``imagenet``,
``imagenet_real``, ``cifar10``, ``cifar100``, ``oxford_iiit_pet``, ``oxford_flowers102``, ``vtab`` for the 19-task
mean, ``vtab/<task>`` per VTAB-1k task, or any dataset name), ``split`` (``test`` is the benchmark's evaluation
split, e.g. ImageNet's validation set as in the paper; ``val`` the held-out minival), ``metric`` (``top1``),
``value`` (accuracies in percent, like the paper, so deltas are percentage points), ``seed`` and ``shots`` (few-shot
rows only; empty for fine-tuning).

The paper's Tables 2, 5, 6 and 9 ship as ``tasks/paper_numbers.csv`` (columns table, model, pretrain, benchmark,
metric, value, std, epochs, note). A result is compared with a paper number only when the model AND the pre-training
data match. Several tables can hold a number for the same setup; the first of ``PAPER_TABLE_ORDER`` wins: Table 5
(fine-tuned at 384 px without Polyak averaging, the setup this pipeline runs), then Table 2 (512/518 px with Polyak
averaging for ImageNet; the only source of BiT-L and the VTAB means), Table 6 (the JFT scaling study; the longest
schedule when a model has two) and Table 9 (VTAB per task).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from vit import vtab
from vit.configs import paper_name, resolve_model_name
from vit.vtab import vtab_summary, vtab_task_name

RESULT_COLUMNS = ("run", "model", "pretrain", "benchmark", "split", "metric", "value", "seed", "shots")
_TEXT_COLUMNS = ("run", "model", "pretrain", "benchmark", "split", "metric")
_OPTIONAL = {"split": "test", "seed": pd.NA, "shots": pd.NA}
_SETUP = ["model", "pretrain", "benchmark", "split", "metric", "shots"]  # what seeds are aggregated over

PAPER_TABLE_ORDER = ("table5", "table2", "table6", "table9")
HIGHER_IS_BETTER = frozenset({"top1", "top5", "accuracy"})
SCRATCH = "scratch"  # the ``pretrain`` of the from-scratch baseline's rows

_PRETRAIN_KEYS = {
    **dict.fromkeys(("imagenet", "i1k", "in1k", "imagenet1k", "imagenet2012", "ilsvrc2012"), "imagenet"),
    **dict.fromkeys(("imagenet21k", "i21k", "in21k"), "imagenet21k"),
    **dict.fromkeys(("jft", "jft300m"), "jft300m"),
}
_PRETRAIN_LABELS = {"imagenet": "ImageNet", "imagenet21k": "I21k", "jft300m": "JFT"}
_BENCHMARK_KEYS = {
    "imagenet2012": "imagenet",
    "ilsvrc2012": "imagenet",
    "imagenet2012_real": "imagenet_real",
    "real": "imagenet_real",
    "pets": "oxford_iiit_pet",
    "oxford_pet": "oxford_iiit_pet",
    "flowers": "oxford_flowers102",
    "flowers102": "oxford_flowers102",
    "vtab_1k": "vtab",
    "vtab1k": "vtab",
}
BENCHMARK_LABELS = {  # the paper's row names, in the paper's order
    "imagenet": "ImageNet",
    "imagenet_real": "ImageNet ReaL",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "oxford_iiit_pet": "Oxford-IIIT Pets",
    "oxford_flowers102": "Oxford Flowers-102",
    "vtab": "VTAB (19 tasks)",
}


# --------------------------------------------------------------------------------------------------------------
# The tidy table


def results_frame(records: Iterable[Mapping] | pd.DataFrame) -> pd.DataFrame:
    """Validate records into the tidy results table (columns ``RESULT_COLUMNS``, in that order).

    ``split`` defaults (also where a record leaves it empty) to ``test``, ``seed`` and ``shots`` to missing.
    Raises ``ValueError`` on unknown or missing columns, empty text, non-finite values, negative seeds, shots < 1
    and duplicate rows for the same setup.
    """
    df = records.copy() if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    unknown = set(df.columns) - set(RESULT_COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns {sorted(unknown)}; expected {list(RESULT_COLUMNS)}")
    for column, default in _OPTIONAL.items():
        df[column] = df[column].fillna(default) if column in df.columns else default
    missing = set(RESULT_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"results lack the columns {sorted(missing)}")
    df = df[list(RESULT_COLUMNS)].reset_index(drop=True)
    for column in _TEXT_COLUMNS:
        if df[column].isna().any() or not df[column].map(lambda v: isinstance(v, str) and v.strip() != "").all():
            raise ValueError(f"column {column!r} must hold non-empty strings")
        df[column] = df[column].astype(str)
    df["value"] = pd.to_numeric(df["value"], errors="raise").astype(np.float64)
    if not np.isfinite(df["value"]).all():
        raise ValueError("column 'value' must hold finite numbers")
    for column, low in (("seed", 0), ("shots", 1)):
        numbers = pd.to_numeric(df[column], errors="raise")
        present = numbers.dropna()
        if ((present % 1) != 0).any() or (present < low).any():
            raise ValueError(f"column {column!r} must hold integers >= {low} or be empty")
        df[column] = numbers.astype("Int64")
    keys = ["run", *_SETUP, "seed"]
    duplicated = df.duplicated(subset=keys, keep=False)
    if duplicated.any():
        raise ValueError(f"duplicate results for the same setup:\n{df[duplicated].to_string()}")
    return df


def write_results(results: pd.DataFrame, directory: str | Path) -> dict[str, Path]:
    """Write ``results.parquet`` and ``results.csv`` into ``directory``; returns their paths by format."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    df = results_frame(results)
    paths = {"parquet": directory / "results.parquet", "csv": directory / "results.csv"}
    df.to_parquet(paths["parquet"], index=False)
    df.to_csv(paths["csv"], index=False)
    return paths


def read_results(path: str | Path) -> pd.DataFrame:
    """Read a results file written by ``write_results`` (parquet or CSV) back into a validated table."""
    path = Path(path)
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={"run": str})
    return results_frame(df)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN for one seed) and count over seeds and runs of each setup.

    Columns: model, pretrain, benchmark, split, metric, shots, mean, std, n. Filter ``results`` by run first to
    keep runs apart.
    """
    grouped = results.groupby(_SETUP, dropna=False, sort=False)["value"]
    return grouped.agg(mean="mean", std="std", n="count").reset_index()


# --------------------------------------------------------------------------------------------------------------
# Names


def model_key(name: str) -> str:
    """Registry key for a model name ("ViT-B/16", "vit_b_16", Table 6's "R50x1+ViT-B/16"), else lower-cased."""
    name = re.sub(r"^r50x1\+", "R50+", name.strip(), flags=re.IGNORECASE)
    try:
        return resolve_model_name(name)
    except ValueError:
        return name.lower()


def pretrain_key(name: str) -> str:
    """``imagenet``, ``imagenet21k`` or ``jft300m`` for their usual spellings ("I21k", "JFT-300M", ...)."""
    cleaned = re.sub(r"[\s_\-]", "", name.strip().lower())
    return _PRETRAIN_KEYS.get(cleaned, cleaned)


def benchmark_key(name: str) -> str:
    """Canonical name of a benchmark the paper reports (its usual spellings match its numbers; ``vtab/<task>``
    with the task's canonical VTAB name); any other benchmark keeps the name it was given."""
    stripped = name.strip()
    cleaned = stripped.lower().replace("-", "_")
    if cleaned.startswith("vtab/"):
        return "vtab/" + vtab_task_name(stripped[5:])
    key = _BENCHMARK_KEYS.get(cleaned, cleaned)
    return key if key in BENCHMARK_LABELS else stripped


def setup_label(model: str, pretrain: str) -> str:
    """Column label in the paper's style, e.g. "ViT-L/16 (I21k)"."""
    key = model_key(model)
    try:
        shown = paper_name(key)
    except ValueError:
        shown = model
    return f"{shown} ({_PRETRAIN_LABELS.get(pretrain_key(pretrain), pretrain)})"


def _benchmark_rank(key: str) -> tuple[int, str]:
    """Sort key: the paper's benchmarks in the paper's order, then the rest alphabetically."""
    known = list(BENCHMARK_LABELS)
    return (known.index(key) if key in known else len(known), key)


# --------------------------------------------------------------------------------------------------------------
# The paper's numbers


def paper_reference() -> pd.DataFrame:
    """The paper's Tables 2, 5, 6 and 9 as shipped in ``tasks/paper_numbers.csv`` (numbers in percent)."""
    with resources.files("tasks").joinpath("paper_numbers.csv").open("r", encoding="utf-8") as f:
        df = pd.read_csv(f, dtype={"note": str}, keep_default_na=False, na_values={"std": [""], "epochs": [""]})
    df["epochs"] = df["epochs"].astype("Int64")
    return df


def _paper_lookup(tables: Sequence[str]) -> dict[tuple[str, str, str, str], tuple[float, float, str]]:
    """(model, pretrain, benchmark, metric) keys -> (value, std, table), the first table in ``tables`` winning."""
    ref = paper_reference()
    ref = ref[ref["table"].isin(tables)].copy()
    ref["rank"] = ref["table"].map({t: i for i, t in enumerate(tables)})
    ref = ref.sort_values(["rank", "epochs"], ascending=[True, False], na_position="last")
    lookup: dict[tuple[str, str, str, str], tuple[float, float, str]] = {}
    for row in ref.itertuples():
        key = (model_key(row.model), pretrain_key(row.pretrain), benchmark_key(row.benchmark), row.metric)
        lookup.setdefault(key, (float(row.value), float(row.std), row.table))
    return lookup


def with_paper_numbers(frame: pd.DataFrame, tables: Sequence[str] = PAPER_TABLE_ORDER) -> pd.DataFrame:
    """Add ``paper``, ``paper_std``, ``paper_table`` and ``delta`` (ours − paper, in points) to a long frame.

    ``frame`` is the tidy table or ``summarize``'s output (ours is ``mean`` when present, else ``value``). Only
    rows whose model, pre-training data, benchmark and metric all match a paper number get one; few-shot rows and
    splits other than ``test`` never do.
    """
    lookup = _paper_lookup(tables)
    ours = frame["mean"] if "mean" in frame.columns else frame["value"]
    comparable = frame["shots"].isna() if "shots" in frame.columns else pd.Series(True, index=frame.index)
    if "split" in frame.columns:
        comparable &= frame["split"] == "test"
    found = [
        lookup.get((model_key(m), pretrain_key(p), benchmark_key(b), metric)) if ok else None
        for m, p, b, metric, ok in zip(
            frame["model"], frame["pretrain"], frame["benchmark"], frame["metric"], comparable, strict=True
        )
    ]
    out = frame.copy()
    out["paper"] = [f[0] if f else math.nan for f in found]
    out["paper_std"] = [f[1] if f else math.nan for f in found]
    out["paper_table"] = [f[2] if f else "" for f in found]
    out["delta"] = ours - out["paper"]
    return out


# --------------------------------------------------------------------------------------------------------------
# Views shaped like the paper


def _number(x: float, decimals: int, sign: str = "") -> str:
    """Fixed decimals, NaN as empty, and no "-0.00" from rounding noise."""
    return "" if pd.isna(x) else f"{round(x, decimals) + 0.0:{sign}.{decimals}f}"


def _mean_std(mean: float, std: float, n: int, decimals: int) -> str:
    """Mean ± std over seeds as text; the mean alone for a single seed."""
    if pd.isna(mean):
        return ""
    if n > 1 and not pd.isna(std):
        return f"{mean:.{decimals}f} ± {std:.{decimals}f}"
    return f"{mean:.{decimals}f}"


def _paper_cell(value: float, std: float, table: str, decimals: int) -> str:
    if pd.isna(value):
        return ""
    spread = "" if pd.isna(std) else f" ± {std:.{decimals}f}"
    return f"{value:.{decimals}f}{spread} (T{table.removeprefix('table')})"


def _delta(x: float, decimals: int) -> str:
    return _number(x, decimals, sign="+")


def _select(results: pd.DataFrame, metric: str, split: str, few_shot: bool) -> pd.DataFrame:
    rows = results[(results["metric"] == metric) & (results["split"] == split)]
    rows = rows[rows["shots"].notna() if few_shot else rows["shots"].isna()]
    return rows.assign(benchmark=rows["benchmark"].map(benchmark_key))


def _with_vtab_means(rows: pd.DataFrame) -> pd.DataFrame:
    """Add Table 2's "VTAB (19 tasks)": a ``vtab`` row with the 19-task mean per model, pre-training data and seed
    that has all 19 tasks and no ``vtab`` row of its own."""
    tasks = rows[rows["benchmark"].str.startswith("vtab/")]
    has_mean = set(rows.loc[rows["benchmark"] == "vtab", ["model", "pretrain"]].itertuples(index=False, name=None))
    derived = []
    for (model, pretrain, seed), group in tasks.groupby(["model", "pretrain", "seed"], dropna=False, sort=False):
        summary = vtab_summary(dict(zip(group["benchmark"].str.removeprefix("vtab/"), group["value"], strict=True)))
        if not summary["missing"] and (model, pretrain) not in has_mean:
            derived.append({**group.iloc[0].to_dict(), "benchmark": "vtab", "value": summary["mean"], "seed": seed})
    return pd.concat([rows, pd.DataFrame(derived, columns=rows.columns)], ignore_index=True) if derived else rows


def paper_table(
    results: pd.DataFrame, metric: str = "top1", split: str = "test", paper: bool = True, decimals: int = 2
) -> pd.DataFrame:
    """Table 2/5 shape: rows benchmarks (paper order), columns setups (model + pre-training data), text cells.

    Ours is "mean ± std" over seeds. With ``paper``, "<setup> paper" (value and source table, e.g. "(T5)") and
    "<setup> Δ" (ours − paper) columns follow each setup the paper reports. VTAB-1k per-task rows are left to
    ``vtab_table``; their 19-task mean appears as "VTAB (19 tasks)" when all tasks are present.
    """
    rows = _with_vtab_means(_select(results, metric, split, few_shot=False))
    rows = rows[~rows["benchmark"].str.startswith("vtab/")]
    summary = summarize(rows)
    summary = with_paper_numbers(summary) if paper else summary.assign(paper=math.nan)
    summary["setup"] = [setup_label(m, p) for m, p in zip(summary["model"], summary["pretrain"], strict=True)]
    benchmarks = sorted(set(summary["benchmark"]), key=_benchmark_rank)
    table = pd.DataFrame(index=pd.Index([BENCHMARK_LABELS.get(b, b) for b in benchmarks], name="benchmark"))
    for setup, group in summary.groupby("setup", sort=False):
        by_benchmark = group.set_index("benchmark")
        cells = by_benchmark.reindex(benchmarks)
        table[setup] = [_mean_std(r.mean, r.std, r.n, decimals) for r in cells.itertuples()]
        if cells["paper"].notna().any():
            table[f"{setup} paper"] = [
                _paper_cell(r.paper, r.paper_std, r.paper_table, decimals) for r in cells.itertuples()
            ]
            table[f"{setup} Δ"] = [_delta(d, decimals) for d in cells["delta"]]
    return table


_VTAB_GROUP_COLUMNS = {"natural": "Natural", "specialized": "Specialized", "structured": "Structured", "mean": "Mean"}


def _vtab_row(per_task: Mapping[str, float], decimals: int) -> dict[str, str]:
    summary = vtab_summary(per_task)
    row = {t.paper_name: _number(per_task.get(t.name, math.nan), decimals) for t in vtab.TASKS}
    row |= {label: _number(summary[key], decimals) for key, label in _VTAB_GROUP_COLUMNS.items()}
    row["Tasks"] = f"{len(vtab.TASKS) - len(summary['missing'])}/{len(vtab.TASKS)}"
    return row


def _vtab_delta_row(ours: Mapping[str, float], theirs: Mapping[str, float], decimals: int) -> dict[str, str]:
    """Ours − paper per task; group means are compared over the tasks ours has, so a missing task cannot skew them."""
    a, b = vtab_summary(ours), vtab_summary({task: v for task, v in theirs.items() if task in ours})
    row = {
        t.paper_name: _delta(ours.get(t.name, math.nan) - theirs.get(t.name, math.nan), decimals) for t in vtab.TASKS
    }
    row |= {label: _delta(a[key] - b[key], decimals) for key, label in _VTAB_GROUP_COLUMNS.items()}
    row["Tasks"] = ""
    return row


def vtab_table(
    results: pd.DataFrame, metric: str = "top1", split: str = "test", paper: bool = True, decimals: int = 2
) -> pd.DataFrame:
    """Table 9 shape: one row per setup (model + pre-training data), the 19 VTAB-1k tasks, group means, text cells.

    Columns: the tasks (mean over seeds), Natural / Specialized / Structured, the 19-task Mean and "Tasks" (how many
    are present; group means of an incomplete row are over the present tasks). With ``paper``, Table 9's row
    ("<setup> paper (T9)", group means computed from its tasks) and a "<setup> Δ" row (group means over the same
    tasks) follow each setup the paper reports.
    """
    rows = _select(results, metric, split, few_shot=False)
    rows = rows[rows["benchmark"].str.startswith("vtab/")]
    rows = rows.assign(task=rows["benchmark"].str.removeprefix("vtab/"))
    reference = _paper_lookup(("table9",)) if paper else {}
    table: dict[str, dict[str, str]] = {}
    for (model, pretrain), group in rows.groupby(["model", "pretrain"], sort=False):
        setup = setup_label(model, pretrain)
        ours = group.groupby("task")["value"].mean().to_dict()
        table[setup] = _vtab_row(ours, decimals)
        keys = {t.name: (model_key(model), pretrain_key(pretrain), f"vtab/{t.name}", metric) for t in vtab.TASKS}
        theirs = {task: reference[key][0] for task, key in keys.items() if key in reference}
        if theirs:
            table[f"{setup} paper (T9)"] = _vtab_row(theirs, decimals)
            table[f"{setup} Δ"] = _vtab_delta_row(ours, theirs, decimals)
    columns = [t.paper_name for t in vtab.TASKS] + [*_VTAB_GROUP_COLUMNS.values(), "Tasks"]
    return pd.DataFrame.from_dict(table, orient="index", columns=columns).rename_axis("setup")


def fewshot_table(results: pd.DataFrame, metric: str = "top1", split: str = "test", decimals: int = 2) -> pd.DataFrame:
    """Few-shot linear accuracy: rows (setup, dataset), columns "<k>-shot", cells "mean ± std" over seeds."""
    summary = summarize(_select(results, metric, split, few_shot=True))
    summary["setup"] = [setup_label(m, p) for m, p in zip(summary["model"], summary["pretrain"], strict=True)]
    summary["cell"] = [_mean_std(r.mean, r.std, r.n, decimals) for r in summary.itertuples()]
    table = summary.pivot(index=["setup", "benchmark"], columns="shots", values="cell")
    table = table.reindex(columns=sorted(table.columns)).fillna("")
    table.columns = [f"{k}-shot" for k in table.columns]
    return table.rename_axis(index=["setup", "dataset"])


# --------------------------------------------------------------------------------------------------------------
# Comparing runs: one name per number, in MLflow, the Prefect artifacts and the report


def setting_name(shots: float | None, pretrain: str) -> str:
    """``finetune`` or ``<k>shot``; ``-scratch`` marks the from-scratch baseline's numbers."""
    base = "finetune" if pd.isna(shots) else f"{int(shots)}shot"
    return f"{base}-scratch" if pretrain == SCRATCH else base


def metric_name(benchmark: str, setting: str, metric: str = "top1", split: str = "test") -> str:
    """``<benchmark>/<setting>/<metric>``, e.g. ``cifar10/finetune/top1``, ``cifar10/10shot/top1``,
    ``vtab/natural/finetune/top1``; a split other than ``test`` prefixes the metric (``cifar10/finetune/val_top1``).
    Values under these names are percentages."""
    return f"{benchmark}/{setting}/{metric if split == 'test' else f'{split}_{metric}'}"


def curve_name(benchmark: str, pretrain: str, metric: str = "top1") -> str:
    """Few-shot accuracy over shots as one metric whose step is the number of shots: ``cifar10/fewshot/top1``."""
    return metric_name(benchmark, "fewshot" + ("-scratch" if pretrain == SCRATCH else ""), metric)


def _named(results: pd.DataFrame) -> pd.DataFrame:
    settings = [setting_name(s, p) for s, p in zip(results["shots"], results["pretrain"], strict=True)]
    columns = zip(results["benchmark"], settings, results["metric"], results["split"], strict=True)
    return results.assign(name=[metric_name(*c) for c in columns])


def run_metrics(results: pd.DataFrame, groups: Mapping[str, str | None]) -> dict[str, float]:
    """One number per benchmark and setting (mean over seeds), and VTAB group means: ``vtab/<group>/<setting>/...``
    over the benchmarks ``groups`` puts in a VTAB group, ``vtab/mean/...`` over all of them (Table 9's "Mean")."""
    rows = _named(results)
    means = rows.groupby("name", sort=False)["value"].mean()
    out = {str(name): float(value) for name, value in means.items()}
    pooled: dict[str, list[float]] = {}
    for bench, name in dict.fromkeys(zip(rows["benchmark"], rows["name"], strict=True)):
        if group := groups.get(bench):
            tail = name.removeprefix(f"{bench}/")
            for key in (f"vtab/{group}/{tail}", f"vtab/mean/{tail}"):
                pooled.setdefault(key, []).append(out[name])
    out.update({key: float(np.mean(values)) for key, values in pooled.items()})
    return out


def fewshot_curves(results: pd.DataFrame) -> dict[str, dict[int, float]]:
    """``curve_name`` -> {shots: mean accuracy over seeds}, for MLflow's chart of accuracy over shots."""
    few = results[results["shots"].notna() & (results["split"] == "test")]
    means = few.groupby(["benchmark", "pretrain", "metric", "shots"])["value"].mean()
    curves: dict[str, dict[int, float]] = {}
    for (bench, pretrain, metric, shots), value in means.items():
        curves.setdefault(curve_name(bench, pretrain, metric), {})[int(shots)] = float(value)
    return curves


def paper_cells(results: pd.DataFrame, decimals: int = 2) -> dict[str, str]:
    """``metric_name`` -> the paper's number for the same cell, e.g. ``"99.00 ± 0.06 (T5)"``, where it has one."""
    summary = with_paper_numbers(
        _named(results)
        .groupby([*_SETUP, "name"], dropna=False)["value"]
        .mean()
        .reset_index()
        .rename(columns={"value": "mean"})
    )
    found = summary[summary["paper"].notna()]
    return {r.name: _paper_cell(r.paper, r.paper_std, r.paper_table, decimals) for r in found.itertuples(index=False)}


def compare_runs(
    results: pd.DataFrame,
    runs: Sequence[str] | None = None,
    baseline_run: str | None = None,
    threshold: float = 0.5,
    higher_is_better: Collection[str] = HIGHER_IS_BETTER,
) -> pd.DataFrame:
    """Metrics side by side, one column per run (mean over its seeds), with deltas, the seeds' spread and a
    ``regressed`` flag.

    ``runs`` picks and orders the runs (default: order of appearance; a ``baseline_run`` not among them goes
    first). Each other run gets a "Δ <run>" column: the difference to ``baseline_run`` when given, else to the run
    before it. Rows are ``metric_name``s; a run's rows for several models would be averaged, so compare runs of
    one model each. ``spread`` is the largest standard deviation over seeds among the runs (0 for single seeds).
    ``regressed`` is True where a metric named in ``higher_is_better`` drops by MORE than both ``threshold`` and
    ``spread`` in any delta column: a drop within the seeds' noise is not a regression. Values are percentages,
    so both are in absolute percentage points. A metric missing from a run has no delta and is not flagged.
    """
    runs = list(dict.fromkeys(results["run"])) if runs is None else list(runs)
    if baseline_run is not None and baseline_run not in runs:
        runs.insert(0, baseline_run)
    unknown = set(runs) - set(results["run"])
    if unknown:
        raise ValueError(f"runs not in the results: {sorted(unknown)}")
    rows = _named(results[results["run"].isin(runs)])
    stats = rows.groupby(["name", "run"])["value"].agg(["mean", "std"])
    table = stats["mean"].unstack("run")[runs]
    spread = stats["std"].unstack("run").reindex(columns=runs).max(axis=1).fillna(0.0)
    order = sorted(table.index, key=lambda n: (_benchmark_rank(benchmark_key(n.split("/")[0])), n))
    table, spread = table.loc[order], spread.loc[order]
    metric_of = dict(zip(rows["name"], rows["metric"], strict=True))
    regressed = pd.Series(False, index=table.index)
    watched = table.index.map(lambda n: metric_of[n] in higher_is_better)
    for i, run in enumerate(runs[1:], start=1):
        reference = baseline_run if baseline_run else runs[i - 1]
        if run == reference:
            continue
        delta = table[run] - table[reference]
        table[f"Δ {run}"] = delta
        regressed |= (delta < -threshold) & (delta < -spread) & watched
    table["spread"] = spread
    table["regressed"] = regressed
    return table.rename_axis(index="metric", columns=None)


# --------------------------------------------------------------------------------------------------------------
# Markdown


def _cell(value: object, decimals: int) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return _number(float(value), decimals)
    if value is None or value is pd.NA:
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def table_cells(
    df: pd.DataFrame, decimals: int = 2, index: bool = True
) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, formatted rows and right-alignment per column of a frame: what the markdown and HTML writers share."""
    frame = df.reset_index() if index else df
    header = [" ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in frame.columns]
    rows = [[_cell(v, decimals) for v in row] for row in frame.itertuples(index=False)]
    numeric = [
        pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]) for c in frame.columns
    ]
    return header, rows, numeric


def to_markdown(df: pd.DataFrame, decimals: int = 2, index: bool = True) -> str:
    """A GitHub-flavoured markdown table (floats to ``decimals``, NaN empty), without extra dependencies."""
    header, rows, numeric = table_cells(df, decimals, index)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"
