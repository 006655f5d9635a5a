"""The pipeline's commands of the ``vitflow`` CLI: run, presets, pretrain, finetune, fewshot, transfer, report,
compare, deploy. ``register(app)`` adds them to the root app in ``flows/cli.py``."""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from flows import prefect_server
from vit.engine.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_REGRESSION

if TYPE_CHECKING:
    from flows.scaling_spec import ScalingSpec
    from flows.specs import BenchmarkSpec
    from tasks.stages import RunSummary

S = TypeVar("S", "BenchmarkSpec", "ScalingSpec")


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="PATH=VALUE",
        help="Override a field of the spec, e.g. `--set pretrain.steps=100 --set compute.device=cuda` "
        "(values are YAML: numbers, true/false, null, [lists]). Repeatable.",
    ),
]


def fail(message: str, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _validation_message(error: Exception) -> str:
    """Pydantic errors as one line per field (``pretrain.steps: Input should be greater than 0``)."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {where}: {e['msg']}" if where else f"  {e['msg']}")
    return "invalid spec:\n" + "\n".join(lines)


def validated(build: Callable[[], S], check_inputs: bool = True) -> S:
    """The spec ``build`` makes, with its inputs checked; any validation error exits 2 with one line per field."""
    try:
        spec = build()
        if check_inputs:
            spec.check_inputs()
        return spec
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        raise fail(_validation_message(e), EXIT_BAD_INPUT) from None


def _spec(preset: str, overrides: list[str] | None, check_inputs: bool = True):
    from flows.presets import build_spec

    return validated(lambda: build_spec(preset, overrides or []), check_inputs)


def _check_artifact_root(root: str) -> None:
    """An artifact root that cannot be written (unreachable endpoint, unknown bucket, bad credentials) is bad
    input: refused in seconds, before any server starts."""
    from vit import storage

    try:
        storage.check_writable(root)
    except storage.StorageError as e:
        raise fail(f"artifact_root: {e}", EXIT_BAD_INPUT) from None


def _where_to_look(summary: RunSummary, tracking_uri: str) -> None:
    typer.echo("")
    typer.echo(summary.table)
    typer.echo("")
    typer.secho("Where to look", bold=True)
    typer.echo(f"  report:   {summary.report_uri}")
    typer.echo(f"  results:  {summary.results_uri}")
    typer.echo(f"  MLflow:   run {summary.run_id} in {tracking_uri}")
    if tracking_uri.startswith("sqlite:///"):
        typer.echo(f"            mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)")


def print_plan(spec, make_plan, gpu: str, mfu: float) -> None:
    """``--dry-run``: the validated spec and the cost plan ``make_plan(spec, gpu, mfu)`` makes of it."""
    from flows.costs import render

    try:
        plan = make_plan(spec, gpu, mfu)
    except ValueError as e:
        raise fail(str(e), EXIT_BAD_INPUT) from None
    typer.echo(json.dumps(spec.model_dump(mode="json"), indent=2))
    typer.echo(render(plan))


def run(
    preset: Annotated[
        str,
        typer.Argument(
            help="A preset: demo, paper-b16-i1k, paper-b16-i21k, paper-l16-i21k, "
            "finetune-official, vtab-1k, fewshot-nightly; the scaling study: scaling, scaling-i21k, bit-vs-vit "
            "(`vitflow presets`)."
        ),
    ],
    overrides: SetOption = None,
    dispatch: Annotated[str | None, typer.Option(help="local (in-process) or deployments (work pool)")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the validated spec and its cost plan; run nothing.")
    ] = False,
    gpu: Annotated[str, typer.Option(help="--dry-run: the GPU the plan is costed on (H100, H200, A100, ...)")] = "H100",
    mfu: Annotated[float, typer.Option(help="--dry-run: the model-FLOPs utilisation assumed")] = 0.45,
) -> None:
    """Run the whole benchmark protocol of a preset: prepare -> pre-train -> transfer -> aggregate.

    Finished stages are found in the artifact store and reused, so re-running an unchanged spec does no work and
    re-running after a crash continues where it stopped (training from its last checkpoint). Every stage is logged
    to MLflow (`$MLFLOW_TRACKING_URI`, else `$VITFLOW_HOME/mlflow.db`) under the experiment named in the spec, and
    the results table, report and plots are written under `<artifact root>/runs/<MLflow run id>/`.

    The scaling study's presets run the scaling flow instead: every model of `models` pre-trained on every nested
    subset of `upstream_sizes`, transferred, and plotted as the paper's Figures 4 and 5 (their fields: `base.*`,
    `models`, `upstream_sizes`, `finetune`, `plot.*`).

    Examples: `vitflow run demo`, `vitflow run demo --set pretrain.steps=100 --set transfer.finetune.steps=20`,
    `vitflow run paper-b16-i21k --set compute.nproc_per_node=8`, `vitflow run scaling --set
    'upstream_sizes=[1000,3000,5000,full]'`, `vitflow run bit-vs-vit`.
    """
    from flows.scaling_presets import SCALING_PRESETS

    if preset in SCALING_PRESETS:
        from flows.scaling_commands import run_scaling

        return run_scaling(preset, overrides, dry_run, gpu, mfu)
    spec = _spec(preset, overrides, check_inputs=not dry_run)  # a plan is wanted before the data is there
    if dispatch not in (None, "local", "deployments"):
        raise fail(f"--dispatch must be local or deployments, got {dispatch!r}", EXIT_BAD_INPUT)
    if dry_run:
        from flows.costs import cost_plan

        return print_plan(spec, cost_plan, gpu, mfu)

    def start() -> RunSummary:
        from flows.benchmark import benchmark

        return benchmark(spec=spec, dispatch=dispatch)

    run_flow("benchmark", preset, spec, start)


def run_flow(flow: str, preset: str, spec: BenchmarkSpec, start: Callable[[], RunSummary]) -> None:
    """Run a preset's flow (``start``, which imports it) locally: the artifact root checked first, Prefect's
    temporary server booting while the flow's imports load, the preset as a tag of the flow run; then where to
    look for the results. ``spec`` is the benchmark spec the flow tracks and stores with (a study's base)."""
    _check_artifact_root(spec.resolved_artifact_root())
    server = prefect_server.start_if_needed()  # it boots while the flows are imported
    from prefect import tags

    from flows.benchmark import preload_imports
    from flows.presets import PRESET_TAG

    try:
        if server is not None:
            preload_imports(spec)
            server.wait_until_healthy(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120)))
        with tags(f"{PRESET_TAG}{preset}"):  # the flow run records the preset its spec came from
            summary = start()
    except Exception as e:  # the flow's own log has the details; say what failed and exit 1
        raise fail(f"{flow} {preset!r} failed: {e}", EXIT_FAILED) from None
    finally:
        # The interpreter's shutdown runs full garbage collections over the heap torch, Prefect, MLflow and
        # pandas built (about 2 s on a laptop CPU); frozen objects are skipped by them, and still freed.
        gc.freeze()
    _where_to_look(summary, spec.resolved_tracking_uri())


def presets() -> None:
    """List the presets with what each runs."""
    from flows.presets import PRESETS
    from flows.scaling_presets import SCALING_PRESETS

    for name, build in {**PRESETS, **SCALING_PRESETS}.items():
        doc = " ".join((build.__doc__ or "").split())
        typer.echo(f"{name:18} {doc}")


def _engine_cli(config: Path, overrides: list[str] | None, nproc_per_node: int) -> None:
    """Run ``python -m vit.engine`` (through torchrun for several processes) with a live progress bar."""
    import subprocess

    args = [str(config), *sum((["--set", o] for o in overrides or []), [])]
    if nproc_per_node > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc_per_node}",
            "-m",
            "vit.engine",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "vit.engine", *args]
    raise typer.Exit(subprocess.call(cmd))


def pretrain(
    config: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Training config, YAML or JSON.")],
    overrides: SetOption = None,
    nproc_per_node: Annotated[int, typer.Option(min=1, help="Processes (GPUs) on this node; >1 uses torchrun.")] = 1,
) -> None:
    """Pre-train (or train anything) from a typed config file with the engine directly, without Prefect.

    The config holds the fields of `vit.engine.TrainConfig` (objective classification|mpp, loss sigmoid|softmax,
    model, data, optim, checkpoint, batch_size, steps|epochs, precision, compile, ...). A run whose
    `checkpoint.dir` holds a checkpoint resumes from it. Exit codes: 0 done, 2 invalid config, 3 non-finite loss,
    143 preempted (SIGTERM; run again to resume).

    Example config (YAML): `model: {name: vit_b_16, image_size: 224, representation_size: 768}`,
    `data: {dataset: s3://bucket/datasets/imagenet21k/<fp>}`, `loss: sigmoid`,
    `optim: {lr: 0.001, weight_decay: 0.03, warmup_steps: 10000}`, `batch_size: 4096`, `epochs: 90`,
    `checkpoint: {dir: s3://bucket/ckpt/b16}`.
    """
    _engine_cli(config, overrides, nproc_per_node)


def finetune(
    init: Annotated[str, typer.Option(help="Checkpoint to fine-tune: .npz, .safetensors, .pth, s3:// or https://")],
    dataset: Annotated[str, typer.Option(help="Prepared dataset URI (`vitflow data prepare` prints it).")],
    protocol: Annotated[str, typer.Option(help="Table 4 row: imagenet, cifar10, cifar100, pets, flowers102, vtab")],
    output: Annotated[str, typer.Option(help="Where checkpoints and the final model go (path or s3://).")],
    sweep: Annotated[bool, typer.Option(help="Sweep the protocol's learning rates on the held-out split.")] = True,
    image_size: Annotated[
        int | None, typer.Option(help="Resolution (default: the protocol's, 384 px for ViTs).")
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Fine-tune a checkpoint on a prepared dataset with the paper's protocol, without Prefect.

    SGD momentum 0.9, cosine schedule with warmup, clipping at 1, batch 512, 384 px, zero-initialised head;
    Table 4's steps and learning rates. With `--sweep` each learning rate trains on the held-out protocol split
    (minival, or VTAB's train800 -> val200), the best retrains on the full training split and the test split is
    reported. `--set` overrides TrainConfig fields (e.g. `--set steps=100 --set batch_size=64` on a CPU).
    A BiT checkpoint is fine-tuned with the BiT-HyperRule instead: lr 0.003, steps and resolution by dataset size,
    step decay, MixUp for larger sets.
    """
    from dataclasses import replace

    from vit.checkpoints import read_any
    from vit.configs import BiTConfig
    from vit.engine.recipes import default_finetune_recipe
    from vit.engine.transfer import finetune_with_sweep

    try:
        recipe = default_finetune_recipe(protocol, bit=isinstance(read_any(init)[1], BiTConfig))
        recipe = recipe if image_size is None else replace(recipe, image_size=image_size)
        extra = _train_overrides(overrides)
        result = finetune_with_sweep(recipe, init, dataset, output, sweep=sweep, **extra)
    except (ValueError, OSError) as e:
        raise fail(str(e), EXIT_BAD_INPUT) from None
    for lr, top1 in result.sweep.items():
        typer.echo(f"lr {lr:g}: val top-1 {100 * top1:.2f}%")
    typer.echo(
        f"best lr {result.best_lr:g}: test top-1 {100 * result.test['top1']:.2f}% "
        f"({int(result.test['count'])} images); model {result.model_uri}"
    )


def _train_overrides(overrides: list[str] | None) -> dict:
    """``--set key=value`` for top-level TrainConfig fields (steps, batch_size, precision, device, ...)."""
    from vit.engine.config import TrainConfig
    from vit.overrides import parse_overrides

    fields = set(TrainConfig.__dataclass_fields__)
    out = parse_overrides(overrides or [])
    if unknown := sorted(set(out) - fields):
        raise ValueError(f"--set {', '.join(unknown)}: use a top-level training field ({', '.join(sorted(fields))})")
    return out


def fewshot(
    model: Annotated[str, typer.Option(help="Checkpoint: .npz, .safetensors, .pth, s3://, https:// or models:/")],
    dataset: Annotated[str, typer.Option(help="Prepared dataset URI.")],
    train_split: Annotated[str, typer.Option(help="Split the shots are drawn from.")] = "train",
    test_split: Annotated[str, typer.Option(help="Split accuracy is measured on.")] = "test",
    shots: Annotated[str, typer.Option(help="Comma-separated shots per class.")] = "1,5,10,25",
    seeds: Annotated[str, typer.Option(help="Comma-separated sampling seeds.")] = "0,1,2",
    l2: Annotated[float, typer.Option(help="Ridge regularisation (big_vision: 1024).")] = 1024.0,
    image_size: Annotated[int | None, typer.Option(help="Resolution (default: the checkpoint's).")] = None,
) -> None:
    """Few-shot linear evaluation of a checkpoint on a prepared dataset.

    As big_vision does it: closed-form ridge regression on frozen pre-logits features, k shots per class for
    each seed; features are extracted once and reused for every shot and seed. Prints mean and std (%) per shot."""
    from vit import load_pretrained
    from vit.engine.transfer import fewshot_on_dataset

    try:
        source = model
        if model.startswith("models:/"):
            from tasks.models import resolve_model_ref
            from tasks.settings import default_tracking_uri

            source, _ = resolve_model_ref(model, default_tracking_uri())
        net = load_pretrained(source, image_size=image_size)
        frame = fewshot_on_dataset(
            net,
            dataset,
            train_split,
            test_split,
            [int(s) for s in shots.split(",")],
            [int(s) for s in seeds.split(",")],
            l2,
        )
    except (ValueError, OSError) as e:
        raise fail(str(e), EXIT_BAD_INPUT) from None
    table = frame.groupby("shots")["accuracy"].agg(["mean", "std"]).mul(100).round(2)
    typer.echo(table.to_string())


def transfer(
    model: Annotated[str, typer.Argument(help="`models:/NAME@ALIAS`, an artifact URI or an official .npz")],
    suite: Annotated[str, typer.Option(help="The preset whose transfer suite runs.")] = "fewshot-nightly",
    threshold: Annotated[float, typer.Option(help="Regression threshold in accuracy points.")] = 1.0,
    overrides: SetOption = None,
) -> None:
    """Evaluate a model on a transfer suite and judge it against the evaluation of the @champion version.

    The suite is a preset's benchmarks (fine-tuning and/or few-shot). The baseline is the latest evaluation on the
    suite of the version aliased @champion (`vitflow promote` moves it); exit code 3 when a metric dropped by more
    than both the threshold and the seeds' spread. Runs the `transfer-eval` flow, like the nightly deployment does."""
    from flows.transfer_eval import RegressionDetected, transfer_eval
    from vit.overrides import parse_overrides

    try:
        dotted = parse_overrides(overrides or [])
        summary = transfer_eval(model=model, suite=suite, threshold=threshold, overrides=dotted)
    except RegressionDetected as e:
        raise fail(str(e), EXIT_REGRESSION) from None
    except ValueError as e:
        raise fail(_validation_message(e), EXIT_BAD_INPUT) from None
    except Exception as e:
        raise fail(f"transfer evaluation failed: {e}", EXIT_FAILED) from None
    from tasks.settings import default_tracking_uri

    _where_to_look(summary, default_tracking_uri())
    if summary.comparison:
        typer.echo("\n" + summary.comparison)


def report(
    run_ids: Annotated[
        list[str], typer.Argument(help="MLflow run id(s) of benchmark or transfer-eval flow runs.", metavar="RUN_ID")
    ],
    output: Annotated[Path, typer.Option(help="Folder to write report.md, report.html and plots/ into.")] = Path(
        "report"
    ),
) -> None:
    """Rebuild the report of a past run from MLflow (its tags) and the artifact store (its results and plots).

    Several runs make one report of their merged results, a column per model: `vitflow report RUN_VIT RUN_BIT` after
    a ViT run and a BiT run shows the two side by side as the paper's Table 2 (the `bit-vs-vit` preset does both in
    one run, and its own report shows them so).
    """
    from tasks.reports import rebuild_report
    from tasks.settings import default_tracking_uri

    try:
        paths = rebuild_report(default_tracking_uri(), run_ids, output)
    except ValueError as e:
        raise fail(str(e), EXIT_BAD_INPUT) from None
    typer.echo(f"report: {paths['html']}\nmarkdown: {paths['markdown']}")


def compare(
    run_ids: Annotated[list[str] | None, typer.Argument(help="Run ids, oldest first (or use the options).")] = None,
    experiment: Annotated[str | None, typer.Option(help="Runs of this MLflow experiment.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Only runs with this tag (key=value); repeatable.")] = None,
    last: Annotated[int | None, typer.Option(help="The newest N matching runs.")] = None,
    nightly: Annotated[bool, typer.Option(help="The nightly transfer evaluations (with --last N).")] = False,
    threshold: Annotated[float, typer.Option(help="Regression threshold in accuracy points.")] = 1.0,
    baseline: Annotated[str | None, typer.Option(help="Compare every run with this run.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="markdown or csv")] = "markdown",
) -> None:
    """Metrics of several runs side by side, with deltas and marked regressions.

    Examples: `vitflow compare RUN_A RUN_B`, `vitflow compare --experiment demo --last 3`,
    `vitflow compare --nightly --last 7`. Exit code 3 when a regression is marked.
    """
    from tasks.compare import compare as compare_table
    from tasks.compare import find_runs, regressed_metrics
    from tasks.results import to_markdown
    from tasks.settings import default_tracking_uri

    uri = default_tracking_uri()
    try:
        ids = list(run_ids or [])
        if not ids:
            tags = dict(t.split("=", 1) for t in tag or [])
            if nightly:
                experiment = experiment or "transfer-eval-fewshot-nightly"
            ids = list(reversed(find_runs(uri, experiment, tags, last=last or 2)))
        table = compare_table(uri, ids, threshold, baseline)
    except ValueError as e:
        raise fail(str(e), EXIT_BAD_INPUT) from None
    shown = table.assign(regressed=table["regressed"].map({True: "REGRESSED", False: ""}))
    typer.echo(shown.to_csv() if fmt == "csv" else to_markdown(shown))
    if regressed := regressed_metrics(table):
        raise fail(
            f"{len(regressed)} metric(s) regressed by more than {threshold} points: {', '.join(regressed)}",
            EXIT_REGRESSION,
        )


def _preset_specs(items: list[str]) -> dict:
    """``PRESET:path=value`` items -> every preset's spec, those named changed (errors name the preset and field)."""
    from flows.presets import PRESETS, build_spec

    changes: dict[str, list[str]] = {name: [] for name in PRESETS}
    for item in items:
        preset, sep, change = item.partition(":")
        if not sep or preset not in PRESETS:
            raise fail(f"--set {item!r}: not PRESET:path=value with a preset of {', '.join(PRESETS)}", EXIT_BAD_INPUT)
        changes[preset].append(change)
    specs = {}
    for name, overrides in changes.items():
        try:
            specs[name] = build_spec(name, overrides)
        except ValueError as e:  # pydantic.ValidationError is a ValueError
            raise fail(f"preset {name}: {_validation_message(e)}", EXIT_BAD_INPUT) from None
    return specs


def deploy(
    work_pool: Annotated[str | None, typer.Option(help="Deploy onto this work pool instead of serving here.")] = None,
    limit: Annotated[int | None, typer.Option(help="Most flow runs served at once.")] = None,
    preset_set: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            metavar="PRESET:PATH=VALUE",
            help="Change a default of a preset's deployments, e.g. `--set demo:pretrain.steps=100` or "
            "`--set paper-b16-i1k:compute.nproc_per_node=8` (values are YAML, as for `vitflow run --set`). "
            "Repeatable.",
        ),
    ] = None,
) -> None:
    """Serve vitflow's deployments to the Prefect API, for the UI and schedules.

    Serves against `PREFECT_API_URL`: one `benchmark` and one `prepare-datasets` deployment per preset, named after
    it (`benchmark/demo`, `benchmark/paper-b16-i1k`, ...), whose Custom run form is filled with the preset's spec
    (`--set PRESET:path=value` changes those defaults: a team's own, e.g. its data paths); transfer-eval-nightly
    (cron 02:00 UTC; `VITFLOW_NIGHTLY_MODEL`, `VITFLOW_NIGHTLY_CRON`); one `scaling` deployment per scaling
    preset (scaling, scaling-i21k, bit-vs-vit; the form is the preset's study); and the train-stage /
    fewshot-stage jobs used by `dispatch=deployments`. Runs until interrupted. With `--work-pool`, registers them
    on that pool for workers instead (see infra/prefect.yaml)."""
    from flows.automations import ensure_nightly_notification
    from flows.deployments import definitions, runner_deployments, serve

    defs = definitions(presets=_preset_specs(preset_set or []))
    ensure_nightly_notification(on_message=typer.echo)
    if work_pool:
        from prefect.deployments import deploy as prefect_deploy

        deployments = runner_deployments(defs, work_pool=work_pool)
        prefect_deploy(*deployments, work_pool_name=work_pool, build=False, push=False)
        return
    serve(limit=limit, on_start=lambda names: typer.echo("serving: " + ", ".join(names)), defs=defs)


def register(app: typer.Typer) -> None:
    for command in (run, presets, pretrain, finetune, fewshot, transfer, report, compare, deploy):
        app.command()(command)
