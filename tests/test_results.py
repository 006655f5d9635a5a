"""Results tables: the shipped paper numbers, validation, paper-shaped views, run comparison, markdown, report."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks import results as R
from tasks.report import Code, Link, build_report, write_report
from vit import vtab

# ---------------------------------------------------------------------------------------------------------------
# The paper's tables as paper-facts.md (§9.1, §9.2, §9.3, §8) types them.

TABLE2_SETUPS = [
    ("ViT-H/14", "jft300m"),
    ("ViT-L/16", "jft300m"),
    ("ViT-L/16", "imagenet21k"),
    ("BiT-L (ResNet152x4)", "jft300m"),
    ("Noisy Student (EfficientNet-L2)", "imagenet+jft300m_unlabeled"),
]
TABLE2 = {
    "ImageNet": ("88.55 ± 0.04", "87.76 ± 0.03", "85.30 ± 0.02", "87.54 ± 0.02", "88.4/88.5*"),
    "ImageNet ReaL": ("90.72 ± 0.05", "90.54 ± 0.03", "88.62 ± 0.05", "90.54", "90.55"),
    "CIFAR-10": ("99.50 ± 0.06", "99.42 ± 0.03", "99.15 ± 0.03", "99.37 ± 0.06", "—"),
    "CIFAR-100": ("94.55 ± 0.04", "93.90 ± 0.05", "93.25 ± 0.05", "93.51 ± 0.08", "—"),
    "Oxford-IIIT Pets": ("97.56 ± 0.03", "97.32 ± 0.11", "94.67 ± 0.15", "96.62 ± 0.23", "—"),
    "Oxford Flowers-102": ("99.68 ± 0.02", "99.74 ± 0.00", "99.61 ± 0.02", "99.63 ± 0.03", "—"),
    "VTAB (19 tasks)": ("77.63 ± 0.23", "76.28 ± 0.46", "72.72 ± 0.21", "76.29 ± 1.70", "—"),
    "TPUv3-core-days": ("2.5k", "0.68k", "0.23k", "9.9k", "12.3k"),
}
TABLE5 = """
| Pre-train | Dataset | ViT-B/16 | ViT-B/32 | ViT-L/16 | ViT-L/32 | ViT-H/14 |
| ImageNet | CIFAR-10 | 98.13 | 97.77 | 97.86 | 97.94 | – |
|  | CIFAR-100 | 87.13 | 86.31 | 86.35 | 87.07 | – |
|  | ImageNet | **77.91** | 73.38 | **76.53** | 71.16 | – |
|  | ImageNet ReaL | 83.57 | 79.56 | 82.19 | 77.83 | – |
|  | Oxford Flowers-102 | 89.49 | 85.43 | 89.66 | 86.36 | – |
|  | Oxford-IIIT-Pets | 93.81 | 92.04 | 93.64 | 91.35 | – |
| ImageNet-21k | CIFAR-10 | 98.95 | 98.79 | 99.16 | 99.13 | 99.27 |
|  | CIFAR-100 | 91.67 | 91.97 | 93.44 | 93.04 | 93.82 |
|  | ImageNet | 83.97 | 81.28 | 85.15 | 80.99 | 85.13 |
|  | ImageNet ReaL | 88.35 | 86.63 | 88.40 | 85.65 | 88.70 |
|  | Oxford Flowers-102 | 99.38 | 99.11 | 99.61 | 99.19 | 99.51 |
|  | Oxford-IIIT-Pets | 94.43 | 93.02 | 94.73 | 93.09 | 94.82 |
| JFT-300M | CIFAR-10 | 99.00 | 98.61 | 99.38 | 99.19 | 99.50 |
|  | CIFAR-100 | 91.87 | 90.49 | 94.04 | 92.52 | 94.55 |
|  | ImageNet | 84.15 | 80.73 | 87.12 | 84.37 | 88.04 |
|  | ImageNet ReaL | 88.85 | 86.27 | 89.99 | 88.28 | 90.33 |
|  | Oxford Flowers-102 | 99.56 | 99.27 | 99.56 | 99.45 | 99.68 |
|  | Oxford-IIIT-Pets | 95.80 | 93.40 | 97.11 | 95.83 | 97.56 |
"""
TABLE6 = """
| Model | Epochs | ImageNet | ReaL | C-10 | C-100 | Pets | Flowers | exaFLOPs |
| ViT-B/32 | 7 | 80.73 | 86.27 | 98.61 | 90.49 | 93.40 | 99.27 | 55 |
| ViT-B/16 | 7 | 84.15 | 88.85 | 99.00 | 91.87 | 95.80 | 99.56 | 224 |
| ViT-L/32 | 7 | 84.37 | 88.28 | 99.19 | 92.52 | 95.83 | 99.45 | 196 |
| ViT-L/16 | 7 | 86.30 | 89.43 | 99.38 | 93.46 | 96.81 | 99.66 | 783 |
| ViT-L/16 | 14 | 87.12 | 89.99 | 99.38 | 94.04 | 97.11 | 99.56 | 1567 |
| ViT-H/14 | 14 | 88.08 | 90.36 | 99.50 | 94.71 | 97.11 | 99.71 | 4262 |
| ResNet50x1 | 7 | 77.54 | 84.56 | 97.67 | 86.07 | 91.11 | 94.26 | 50 |
| ResNet50x2 | 7 | 82.12 | 87.94 | 98.29 | 89.20 | 93.43 | 97.02 | 199 |
| ResNet101x1 | 7 | 80.67 | 87.07 | 98.48 | 89.17 | 94.08 | 95.95 | 96 |
| ResNet152x1 | 7 | 81.88 | 87.96 | 98.82 | 90.22 | 94.17 | 96.94 | 141 |
| ResNet152x2 | 7 | 84.97 | 89.69 | 99.06 | 92.05 | 95.37 | 98.62 | 563 |
| ResNet152x2 | 14 | 85.56 | 89.89 | 99.24 | 91.92 | 95.75 | 98.75 | 1126 |
| ResNet200x3 | 14 | 87.22 | 90.15 | 99.34 | 93.53 | 96.32 | 99.04 | 3306 |
| R50x1+ViT-B/32 | 7 | 84.90 | 89.15 | 99.01 | 92.24 | 95.75 | 99.46 | 106 |
| R50x1+ViT-B/16 | 7 | 85.58 | 89.65 | 99.14 | 92.63 | 96.65 | 99.40 | 274 |
| R50x1+ViT-L/32 | 7 | 85.68 | 89.04 | 99.24 | 92.93 | 96.97 | 99.43 | 246 |
| R50x1+ViT-L/16 | 7 | 86.60 | 89.72 | 99.18 | 93.64 | 97.03 | 99.40 | 859 |
| R50x1+ViT-L/16 | 14 | 87.12 | 89.76 | 99.31 | 93.89 | 97.36 | 99.11 | 1668 |
"""
TABLE9_SETUPS = {
    "H/14 JFT": ("ViT-H/14", "jft300m"),
    "L/16 JFT": ("ViT-L/16", "jft300m"),
    "L/16 I21k": ("ViT-L/16", "imagenet21k"),
}
TABLE9 = {  # the 19 tasks in Table 9's column order (= vit.vtab.TASKS order)
    "H/14 JFT": "95.3 85.5 75.2 99.7 97.2 65.0 88.9 83.3 96.7 91.4 76.6 91.7 63.8 53.1 79.4 63.3 84.5 33.2 51.2",
    "L/16 JFT": "95.4 81.9 74.3 99.7 96.7 63.5 87.4 83.6 96.5 89.7 77.1 86.4 63.1 49.7 74.5 60.5 82.2 36.2 51.1",
    "L/16 I21k": "90.8 84.1 74.1 99.3 92.7 61.0 80.9 82.5 95.6 85.2 75.3 70.3 56.1 41.9 74.7 64.9 79.9 30.5 41.7",
}
TABLE9_MEAN = {"H/14 JFT": 77.6, "L/16 JFT": 76.3, "L/16 I21k": 72.7}

BENCHMARKS = {
    "ImageNet": "imagenet",
    "ImageNet ReaL": "imagenet_real",
    "ReaL": "imagenet_real",
    "CIFAR-10": "cifar10",
    "C-10": "cifar10",
    "CIFAR-100": "cifar100",
    "C-100": "cifar100",
    "Oxford-IIIT Pets": "oxford_iiit_pet",
    "Oxford-IIIT-Pets": "oxford_iiit_pet",
    "Pets": "oxford_iiit_pet",
    "Oxford Flowers-102": "oxford_flowers102",
    "Flowers": "oxford_flowers102",
    "VTAB (19 tasks)": "vtab",
}


def _rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.strip().splitlines()]


def _shipped(table: str) -> dict[tuple, tuple[float, float]]:
    ref = R.paper_reference()
    ref = ref[ref["table"] == table]
    keys = zip(ref["model"], ref["pretrain"], ref["benchmark"], ref["metric"], ref["epochs"], strict=True)
    shipped = dict(zip(keys, zip(ref["value"], ref["std"], strict=True), strict=True))
    assert len(shipped) == len(ref)  # no duplicate keys
    return shipped


def _equal(got: tuple[float, float], value: float, std: float) -> bool:
    return got[0] == value and (got[1] == std or (math.isnan(got[1]) and math.isnan(std)))


def test_shipped_table2_equals_the_paper():
    shipped = _shipped("table2")
    expected = {}
    for row, cells in TABLE2.items():
        for (model, pretrain), cell in zip(TABLE2_SETUPS, cells, strict=True):
            if cell == "—":
                continue
            if row == "TPUv3-core-days":
                expected[(model, pretrain, "pretraining", "tpuv3_core_days", pd.NA)] = (
                    float(cell[:-1]) * 1000,
                    math.nan,
                )
                continue
            value, _, std = cell.replace("88.4/88.5*", "88.4").partition(" ± ")
            expected[(model, pretrain, BENCHMARKS[row], "top1", pd.NA)] = (float(value), float(std or "nan"))
    assert len(shipped) == len(expected) == 35
    for key, (value, std) in expected.items():
        assert _equal(shipped[key], value, std), key


def test_shipped_table5_equals_the_paper():
    shipped = _shipped("table5")
    header, *rows = _rows(TABLE5)
    pretrain = {"ImageNet": "imagenet", "ImageNet-21k": "imagenet21k", "JFT-300M": "jft300m"}
    expected, current = {}, ""
    for row in rows:
        current = pretrain.get(row[0], current)  # an empty cell continues the block above
        for model, cell in zip(header[2:], row[2:], strict=True):
            if cell != "–":
                expected[(model, current, BENCHMARKS[row[1]], "top1", pd.NA)] = float(cell.strip("*"))
    assert len(shipped) == len(expected) == 84
    for key, value in expected.items():
        assert _equal(shipped[key], value, math.nan), key


def test_shipped_table6_equals_the_paper():
    shipped = _shipped("table6")
    header, *rows = _rows(TABLE6)
    expected = {}
    for model, epochs, *cells in rows:
        for name, cell in zip(header[2:], cells, strict=True):
            benchmark, metric = ("pretraining", "exaflops") if name == "exaFLOPs" else (BENCHMARKS[name], "top1")
            expected[(model, "jft300m", benchmark, metric, int(epochs))] = float(cell)
    assert len(shipped) == len(expected) == 126
    for key, value in expected.items():
        assert _equal(shipped[key], value, math.nan), key


def test_shipped_table9_equals_the_paper():
    shipped = _shipped("table9")
    expected = {}
    for setup, (model, pretrain) in TABLE9_SETUPS.items():
        for task, value in zip(vtab.TASKS, TABLE9[setup].split(), strict=True):
            expected[(model, pretrain, f"vtab/{task.name}", "top1", pd.NA)] = float(value)
        expected[(model, pretrain, "vtab", "top1", pd.NA)] = TABLE9_MEAN[setup]
    assert len(shipped) == len(expected) == 60
    for key, value in expected.items():
        assert _equal(shipped[key], value, math.nan), key


# ---------------------------------------------------------------------------------------------------------------
# The tidy table


def _record(**kw) -> dict:
    return {"run": "r1", "model": "vit_b_16", "pretrain": "imagenet21k", "benchmark": "cifar10", "metric": "top1"} | kw


def test_results_frame_fills_defaults_and_types():
    df = R.results_frame([_record(value=98.5), _record(value=40, benchmark="cifar100", seed=0, shots=5)])
    assert tuple(df.columns) == R.RESULT_COLUMNS
    assert df["split"].tolist() == ["test", "test"]
    assert df["value"].dtype == np.float64
    assert str(df["seed"].dtype) == "Int64" and str(df["shots"].dtype) == "Int64"
    assert df["seed"].isna().tolist() == [True, False] and df.loc[1, "shots"] == 5


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"colour": "red"}, "unknown result columns"),
        ({"run": ""}, "non-empty strings"),
        ({"value": math.nan}, "finite"),
        ({"shots": 0}, "integers >= 1"),
        ({"seed": 1.5}, "integers >= 0"),
    ],
)
def test_results_frame_rejects_bad_records(bad, message):
    with pytest.raises(ValueError, match=message):
        R.results_frame([_record(value=1.0) | bad])


def test_results_frame_rejects_missing_columns_and_duplicates():
    with pytest.raises(ValueError, match="lack the columns"):
        R.results_frame([{"run": "r", "model": "m", "pretrain": "p", "benchmark": "b", "metric": "top1"}])
    with pytest.raises(ValueError, match="duplicate"):
        R.results_frame([_record(value=1.0), _record(value=2.0)])


def test_results_round_trip_through_parquet_and_csv(tmp_path):
    df = R.results_frame([_record(value=98.5, run="0123"), _record(value=40.25, seed=2, shots=10, run="0123")])
    paths = R.write_results(df, tmp_path)
    for path in paths.values():
        pd.testing.assert_frame_equal(R.read_results(path), df)


# ---------------------------------------------------------------------------------------------------------------
# Paper numbers beside ours


def test_names_normalise_between_registry_and_paper():
    assert R.model_key("ViT-B/16") == R.model_key("vit_b_16") == R.model_key("ViT-B_16") == "vit_b_16"
    assert R.model_key("R50x1+ViT-B/16") == "r50_vit_b_16"
    assert R.pretrain_key("ImageNet-21k") == R.pretrain_key("i21k") == "imagenet21k"
    assert R.pretrain_key("JFT-300M") == "jft300m" and R.pretrain_key("ILSVRC-2012") == "imagenet"
    assert R.benchmark_key("vtab/CIFAR-100") == R.benchmark_key("vtab/cifar100") == "vtab/cifar"
    assert R.setup_label("vit_l_16", "i21k") == "ViT-L/16 (I21k)"


def test_with_paper_numbers_needs_model_and_pretraining_to_match():
    df = R.results_frame(
        [
            _record(model="vit_h_14", pretrain="jft300m", benchmark="imagenet", value=88.0),
            _record(model="vit_b_16", pretrain="JFT-300M", benchmark="cifar100", value=92.0),
            _record(model="vit_b_16", pretrain="imagenet21k", benchmark="cifar100", value=92.0),
            _record(model="vit_b_16", pretrain="synthetic", benchmark="cifar100", value=92.0),
            _record(model="vit_b_16", pretrain="imagenet21k", benchmark="cifar100", value=50.0, shots=5),
            _record(model="vit_b_16", pretrain="imagenet21k", benchmark="cifar10", value=98.0, split="val"),
            _record(model="r50_vit_b_16", pretrain="jft300m", benchmark="imagenet_real", value=89.0),
        ]
    )
    out = R.with_paper_numbers(df)
    assert out["paper_table"].tolist() == ["table5", "table5", "table5", "", "", "", "table6"]
    np.testing.assert_array_equal(out["paper"].iloc[[0, 1, 2, 6]], [88.04, 91.87, 91.67, 89.65])
    assert out["delta"].iloc[0] == pytest.approx(88.0 - 88.04)
    table2 = R.with_paper_numbers(df.iloc[:1], tables=("table2",))
    assert (table2.loc[0, "paper"], table2.loc[0, "paper_std"]) == (88.55, 0.04)
    vit_l16 = R.with_paper_numbers(df.iloc[:1].assign(model="ViT-L/16"), tables=("table6",))
    assert vit_l16.loc[0, "paper"] == 87.12  # the 14-epoch row, not the 7-epoch 86.30


def test_a_benchmark_the_paper_does_not_report_keeps_its_own_name_in_the_tables():
    df = R.results_frame(
        [
            _record(model="vit_micro_4", pretrain="synthetic", benchmark="fashion-mnist-5-9", value=87.2),
            _record(model="vit_micro_4", pretrain="synthetic", benchmark="Flowers102", value=90.0),
            _record(model="vit_micro_4", pretrain="synthetic", benchmark="fashion-mnist-5-9", shots=10, value=64.1),
        ]
    )
    assert R.paper_table(df).index.tolist() == ["Oxford Flowers-102", "fashion-mnist-5-9"]
    assert R.fewshot_table(df).index.get_level_values("dataset").tolist() == ["fashion-mnist-5-9"]


def test_paper_table_formats_mean_std_paper_and_delta():
    df = R.results_frame(
        [
            _record(model="vit_l_16", benchmark="cifar10", value=99.0, seed=0, run="a"),
            _record(model="vit_l_16", benchmark="cifar10", value=99.2, seed=1, run="b"),
            _record(model="vit_l_16", benchmark="imagenet2012", value=85.0, seed=0, run="a"),
            _record(model="vit_micro_4", pretrain="synthetic", benchmark="fashion_mnist", value=80.123),
        ]
    )
    table = R.paper_table(df)
    assert table.index.tolist() == ["ImageNet", "CIFAR-10", "fashion_mnist"]
    assert table.columns.tolist() == [
        "ViT-L/16 (I21k)",
        "ViT-L/16 (I21k) paper",
        "ViT-L/16 (I21k) Δ",
        "ViT-micro/4 (synthetic)",
    ]
    assert table.loc["CIFAR-10"].tolist() == ["99.10 ± 0.14", "99.16 (T5)", "-0.06", ""]
    assert table.loc["ImageNet"].tolist() == ["85.00", "85.15 (T5)", "-0.15", ""]
    assert table.loc["fashion_mnist"].tolist() == ["", "", "", "80.12"]
    assert R.paper_table(df, paper=False).columns.tolist() == ["ViT-L/16 (I21k)", "ViT-micro/4 (synthetic)"]


def _table9_results(setup: str, drop: tuple[str, ...] = (), seeds: tuple[int, ...] = (0,)) -> pd.DataFrame:
    model, pretrain = TABLE9_SETUPS[setup]
    values = dict(zip((t.name for t in vtab.TASKS), map(float, TABLE9[setup].split()), strict=True))
    return R.results_frame(
        [
            _record(model=model, pretrain=pretrain, benchmark=f"vtab/{task}", value=value + 0.5 * seed, seed=seed)
            for task, value in values.items()
            if task not in drop
            for seed in seeds
        ]
    )


def test_vtab_table_reproduces_table9_with_group_means():
    table = R.vtab_table(_table9_results("H/14 JFT"))
    assert table.index.tolist() == ["ViT-H/14 (JFT)", "ViT-H/14 (JFT) paper (T9)", "ViT-H/14 (JFT) Δ"]
    ours = table.loc["ViT-H/14 (JFT)"]
    assert ours[["Caltech101", "sNORB-Elev"]].tolist() == ["95.30", "51.20"]
    assert ours[["Natural", "Specialized", "Structured", "Mean", "Tasks"]].tolist() == [
        "86.69",
        "87.00",
        "65.03",
        "77.63",
        "19/19",
    ]
    assert (table.loc["ViT-H/14 (JFT) Δ"].drop("Tasks") == "+0.00").all()


def test_vtab_table_with_missing_tasks_compares_like_with_like():
    table = R.vtab_table(_table9_results("L/16 I21k", drop=("sun397", "kitti"), seeds=(0, 1)))
    ours, delta = table.loc["ViT-L/16 (I21k)"], table.loc["ViT-L/16 (I21k) Δ"]
    assert ours["Tasks"] == "17/19" and ours["Sun397"] == "" and delta["KITTI-Dist"] == ""
    assert ours["Caltech101"] == "91.05"  # mean of 90.8 and 91.3 over the two seeds
    assert (delta.drop(["Tasks", "Sun397", "KITTI-Dist"]) == "+0.25").all()  # group means over the same tasks


def test_paper_table_derives_the_vtab_mean_from_all_19_tasks():
    table = R.paper_table(_table9_results("L/16 JFT", seeds=(0, 1)))
    assert table.loc["VTAB (19 tasks)"].tolist() == ["76.54 ± 0.35", "76.28 ± 0.46 (T2)", "+0.26"]
    incomplete = R.paper_table(_table9_results("L/16 JFT", drop=("dmlab",)))
    assert incomplete.empty


def test_fewshot_table_is_dataset_by_shots():
    df = R.results_frame(
        [
            _record(benchmark=b, value=v + s, seed=s, shots=k)
            for b, base in (("cifar100", 40.0), ("oxford_iiit_pet", 60.0))
            for k, v in ((1, base), (5, base + 10), (25, base + 20))
            for s in (0, 1, 2)
        ]
        + [_record(benchmark="cifar100", value=91.0)]  # a fine-tuning row: not few-shot
    )
    table = R.fewshot_table(df)
    assert table.columns.tolist() == ["1-shot", "5-shot", "25-shot"]
    assert table.index.tolist() == [("ViT-B/16 (I21k)", "cifar100"), ("ViT-B/16 (I21k)", "oxford_iiit_pet")]
    assert table.iloc[0].tolist() == ["41.00 ± 1.00", "51.00 ± 1.00", "61.00 ± 1.00"]
    assert table.iloc[1, 2] == "81.00 ± 1.00"


# ---------------------------------------------------------------------------------------------------------------
# Comparing runs, markdown, report


def _runs() -> pd.DataFrame:
    values = {  # run -> (cifar10 top1, imagenet top1, train loss)
        "base": (99.0, 80.0, 0.50),
        "new": (98.4, 79.6, 2.00),  # cifar10 drops 0.6 > 0.5, imagenet 0.4 <= 0.5, loss is not higher-is-better
        "newer": (98.5, 78.0, 0.40),
    }
    return R.results_frame(
        [
            row
            for run, (c10, inet, loss) in values.items()
            for row in (
                _record(run=run, benchmark="cifar10", value=c10),
                _record(run=run, benchmark="imagenet", value=inet),
                _record(run=run, benchmark="cifar10", split="train", metric="loss", value=loss),
            )
        ]
    )


def test_compare_runs_flags_regressions_beyond_the_threshold_only():
    table = R.compare_runs(_runs(), runs=["base", "new"], threshold=0.5)
    assert table.index.tolist() == ["imagenet/finetune/top1", "cifar10/finetune/top1", "cifar10/finetune/train_loss"]
    assert table.columns.tolist() == ["base", "new", "Δ new", "spread", "regressed"]
    assert table["Δ new"].round(6).tolist() == [-0.4, -0.6, 1.5]
    assert table["regressed"].tolist() == [False, True, False]
    assert not R.compare_runs(_runs(), runs=["base", "new"], threshold=0.7)["regressed"].any()


def test_compare_runs_against_previous_run_or_a_baseline():
    previous = R.compare_runs(_runs())  # newer vs new: imagenet drops 1.6
    assert previous.columns.tolist() == ["base", "new", "newer", "Δ new", "Δ newer", "spread", "regressed"]
    assert previous["Δ newer"].round(6).tolist() == [-1.6, 0.1, -1.6]
    assert previous["regressed"].tolist() == [True, True, False]
    baseline = R.compare_runs(_runs(), runs=["newer"], baseline_run="base")
    assert baseline.columns.tolist() == ["base", "newer", "Δ newer", "spread", "regressed"]
    assert baseline["regressed"].tolist() == [True, False, False]  # imagenet -2.0; cifar10 -0.5 is within
    with pytest.raises(ValueError, match="not in the results"):
        R.compare_runs(_runs(), runs=["nope"])


def test_to_markdown_writes_a_pipe_table():
    df = pd.DataFrame(
        {"name": ["a|b", "c"], "value": [1.23456, math.nan], "ok": [True, False]},
        index=pd.Index(["x", "y"], name="key"),
    )
    assert R.to_markdown(df) == (
        "| key | name | value | ok |\n|---|---|---:|---|\n| x | a\\|b | 1.23 | yes |\n| y | c |  | no |\n"
    )
    assert R.to_markdown(df, decimals=1, index=False).splitlines()[2] == "| a\\|b | 1.2 | yes |"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_report_embeds_plots_and_tables(tmp_path):
    results = pd.concat(
        [
            _table9_results("H/14 JFT"),
            R.results_frame([_record(model="vit_h_14", pretrain="jft300m", value=99.3, run="ft")]),
            R.results_frame([_record(benchmark="cifar100", value=50.0, seed=0, shots=5, run="fs")]),
        ],
        ignore_index=True,
    )
    png = _png()
    (tmp_path / "curve.png").write_bytes(png)
    markdown, page = build_report(
        results, {"Attention distance": png, "Training curves": tmp_path / "curve.png"}, "ViT-H/14 run", {"run": "x1"}
    )
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert page.count("data:image/png;base64,") == 2
    for text in ("<table>", "99.50 (T5)", "-0.20", "86.69", "50.00", "ViT-H/14 run", "x1"):
        assert text in page
    assert "| CIFAR-10 | 99.30 | 99.50 (T5) | -0.20 |" in markdown
    assert "| ViT-H/14 (JFT) | 95.30 |" in markdown
    assert "![Attention distance](plots/Attention_distance.png)" in markdown
    assert "## VTAB-1k (paper Table 9)" in markdown and "## Few-shot linear evaluation" in markdown
    paths = write_report(tmp_path / "report", results, {"Attention distance": png})
    assert paths["markdown"].read_text() == build_report(results, {"Attention distance": png})[0]
    assert (tmp_path / "report" / "plots" / "Attention_distance.png").read_bytes() == png
    with pytest.raises(ValueError, match="PNG"):
        build_report(results, {"bad": b"not a png"})


def test_report_header_renders_links_as_links_and_locations_as_code_in_both_outputs():
    url = "http://mlflow:5000/get-artifact?path=report.html&run_uuid=r1"
    meta = {
        "MLflow run": Link("r1", url),
        "artifacts": (Link("open [in] MLflow", "http://mlflow:5000/#/a b)"), " · ", Code("s3://bucket/runs/r1")),
        "model": "a|b <c>",
    }
    markdown, page = build_report(R.results_frame([_record(value=98.5)]), title="links", meta=meta)
    assert "| field | value |\n|---|---|\n" in markdown
    assert f"| MLflow run | [r1]({url}) |" in markdown
    assert "| artifacts | [open \\[in\\] MLflow](http://mlflow:5000/#/a%20b%29) · `s3://bucket/runs/r1` |" in markdown
    assert "| model | a\\|b <c> |" in markdown
    assert '<td><a href="http://mlflow:5000/get-artifact?path=report.html&amp;run_uuid=r1">r1</a></td>' in page
    assert '<a href="http://mlflow:5000/#/a b)">open [in] MLflow</a> · <code>s3://bucket/runs/r1</code>' in page
    assert "<td>a|b &lt;c&gt;</td>" in page and "[r1](" not in page


def test_compare_runs_flags_only_drops_beyond_the_seeds_spread():
    seeds = {"base": (90.0, 94.0, 86.0), "noisy": (87.0, 91.0, 83.0), "worse": (80.0, 84.0, 76.0)}  # std 4.0
    df = R.results_frame(
        [_record(run=run, value=v, seed=i) for run, values in seeds.items() for i, v in enumerate(values)]
    )
    table = R.compare_runs(df, runs=["noisy", "worse"], baseline_run="base", threshold=1.0)
    assert table["spread"].tolist() == [4.0]
    assert table["Δ noisy"].tolist() == [-3.0] and table["Δ worse"].tolist() == [-10.0]
    assert R.compare_runs(df, runs=["noisy"], baseline_run="base", threshold=1.0)["regressed"].tolist() == [False]
    assert R.compare_runs(df, runs=["worse"], baseline_run="base", threshold=1.0)["regressed"].tolist() == [True]


def test_run_metrics_name_every_benchmark_and_setting_in_percent():
    df = R.results_frame(
        [_record(value=98.0 + s, seed=s) for s in range(3)]
        + [_record(pretrain="scratch", value=60.0, seed=0)]
        + [_record(benchmark="vtab/dtd", value=40.0 + k, seed=0, shots=k) for k in (1, 5)]
        + [_record(benchmark="vtab/eurosat", value=80.0, seed=0, shots=5)]
    )
    metrics = R.run_metrics(df, {"vtab/dtd": "natural", "vtab/eurosat": "specialized"})
    assert metrics == {
        "cifar10/finetune/top1": 99.0,
        "cifar10/finetune-scratch/top1": 60.0,
        "vtab/dtd/1shot/top1": 41.0,
        "vtab/dtd/5shot/top1": 45.0,
        "vtab/eurosat/5shot/top1": 80.0,
        "vtab/natural/1shot/top1": 41.0,
        "vtab/natural/5shot/top1": 45.0,
        "vtab/specialized/5shot/top1": 80.0,
        "vtab/mean/1shot/top1": 41.0,
        "vtab/mean/5shot/top1": 62.5,
    }
    assert R.fewshot_curves(df) == {"vtab/dtd/fewshot/top1": {1: 41.0, 5: 45.0}, "vtab/eurosat/fewshot/top1": {5: 80.0}}
    assert R.paper_cells(df) == {"cifar10/finetune/top1": "98.95 (T5)"}  # ViT-B/16 (I21k), Table 5
