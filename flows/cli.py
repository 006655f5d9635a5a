"""The ``vitflow`` command line (typer). Sub-commands live in sub-apps: ``vitflow data ...`` here; other parts of
the pipeline add theirs with ``app.add_typer(...)`` or ``@app.command()``.

Exit codes: 0 success, 1 the work failed (e.g. too many corrupt samples), 2 bad input (a missing path, an unknown
format, a bad option: the message says what to do).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flows import commands, promote, stack
from flows.commands import fail
from tasks.settings import default_artifact_root
from vit.data.base import CorruptDataError, DataError
from vit.data.sources import FORMATS, parse_source
from vit.engine.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED
from vit.overrides import parse_overrides

app = typer.Typer(
    help=(
        "**vitflow** reproduces *An Image is Worth 16x16 Words* (Dosovitskiy et al., ICLR 2021) as a "
        "pretrain-and-transfer pipeline: dataset preparation, pre-training, fine-tuning, few-shot and VTAB-1k "
        "evaluation, aggregation, tracked in MLflow and stored in a local directory or S3.\n\n"
        "Artifacts go to `$VITFLOW_ARTIFACT_ROOT`, else `$VITFLOW_HOME/artifacts` (`VITFLOW_HOME` defaults to "
        "`./.vitflow`). S3 roots (`s3://bucket/prefix`) use the usual AWS variables; the endpoint comes from "
        "`AWS_ENDPOINT_URL_S3`.\n\n"
        "Exit codes: 0 success, 1 the work failed, 2 bad input, 3 a regression was found (`transfer`, `compare`)."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
data_app = typer.Typer(
    help="Prepare datasets into validated, fingerprinted shards in the artifact store, and inspect them.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(data_app, name="data")

DOWNLOADERS = ("cifar10", "cifar100", "fashion-mnist", "pets", "flowers102")


def download(source: str) -> None:
    """Fetch a dataset with torchvision's downloader into the PATH of ``FORMAT:PATH`` (the readers find the
    sub-folder torchvision creates there)."""
    import torchvision.datasets as tvd

    fmt, path = parse_source(source)
    if fmt not in DOWNLOADERS:
        raise DataError(f"--download supports {', '.join(DOWNLOADERS)}; get {fmt} yourself and point at its folder")
    root = Path(path).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    fetchers = {
        "cifar10": lambda: tvd.CIFAR10(root, download=True),
        "cifar100": lambda: tvd.CIFAR100(root, download=True),
        "fashion-mnist": lambda: tvd.FashionMNIST(root, download=True),
        "pets": lambda: tvd.OxfordIIITPet(root, download=True),
        "flowers102": lambda: tvd.Flowers102(root, download=True),
    }
    fetchers[fmt]()


_FORMAT_LIST = "\n".join(f"* `{example}`" for _, example in FORMATS.values())


@data_app.command(
    "prepare",
    help=(
        "Prepare a dataset from its own on-disk format (or the synthetic generators) into the artifact store and "
        "print its URI, `<artifact-root>/datasets/<name>/<fingerprint>`.\n\n"
        "Every sample is decoded once; corrupt, truncated, empty or non-image files and out-of-range labels go to "
        "`quarantine.csv`. Preparation fails (exit 1, nothing published) only when their share exceeds "
        "`--max-corrupt-fraction`. An unchanged source with the same options is never prepared twice.\n\n"
        f"**Formats** (`FORMAT:PATH`):\n\n{_FORMAT_LIST}\n\n"
        "**Options** (`--option key=value`, repeatable): `minival=F` held-out fraction of train (default per "
        "protocol: 1% ImageNet, 2% CIFAR and Fashion-MNIST, 10% Pets/Flowers); `max_train=N` (any split) keep the "
        "first N samples (applied last); `keep_classes=5-9` only these class ids (also `0,2,4`), relabelled from 0; "
        "`vtab1k=true` VTAB-1k's train800 / val200 / train800val200 drawn from train, test kept; "
        "`shard_bytes=`, `shard_samples=` shard bounds; `workers=` decoding threads; `real=PATH` "
        "(imagenet ReaL labels); `task=NAME` (vtab folder named differently); `num_classes=N` (list); "
        "synthetic: `classes=`, `per_class=`, `test_per_class=`, `test=`, `size=`.\n\n"
        "**Examples**:\n\n"
        "* `vitflow data prepare cifar10:/data/cifar-10-batches-py --name cifar10`\n"
        "* `vitflow data prepare imagenet:/data/ilsvrc --name imagenet --artifact-root s3://bucket/vitflow`\n"
        "* `vitflow data prepare synthetic-vtab:structured_count --name count -o test=500`\n"
        "* `vitflow data prepare cifar100:/data --name cifar100 --download`"
    ),
)
def prepare(
    source: Annotated[str, typer.Argument(metavar="FORMAT:PATH", help="What to prepare, e.g. cifar10:/data/cifar")],
    name: Annotated[str, typer.Option("--name", help="Dataset name in the artifact store.")],
    artifact_root: Annotated[
        str | None, typer.Option(help="Local path, file:// or s3:// URI [default: $VITFLOW_ARTIFACT_ROOT]")
    ] = None,
    max_corrupt_fraction: Annotated[
        float, typer.Option(help="Fail when more than this share of samples is unusable.")
    ] = 0.01,
    download_: Annotated[
        bool, typer.Option("--download", help=f"Fetch with torchvision first ({', '.join(DOWNLOADERS)}).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the minival split and the shard order.")] = 0,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="key=value, repeatable.")] = None,
) -> None:
    from vit.data import prepare_dataset  # here: torch is slow to import, and --help does not need it

    try:
        options = parse_overrides(option or [], flag="--option")
        if download_:
            download(source)
        uri = prepare_dataset(
            source,
            name,
            artifact_root or default_artifact_root(),
            max_corrupt_fraction=max_corrupt_fraction,
            seed=seed,
            progress=True,
            **options,
        )
    except CorruptDataError as exc:
        raise fail(str(exc), EXIT_FAILED) from None
    except (DataError, ValueError) as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from None
    typer.echo(uri)


@data_app.command("info", help="Show a prepared dataset: source, fingerprint, classes and counts per split.")
def info(
    uri: Annotated[str, typer.Argument(help="Dataset URI, or `ROOT/datasets/NAME` for its newest version.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print info.json as it is.")] = False,
) -> None:
    from vit.data import open_dataset

    try:
        ds = open_dataset(uri)
    except DataError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from None
    if as_json:
        typer.echo(json.dumps(ds.info, indent=2))
        return
    facts = ds.info
    typer.echo(f"{ds.name}  {ds.uri}")
    typer.echo(f"  source       {facts.get('source')}  ({facts.get('format')})")
    typer.echo(f"  fingerprint  {ds.fingerprint}  (preparation v{facts.get('prep_version')}, {facts.get('created')})")
    shown = ", ".join(ds.classes[:8]) + (", ..." if ds.num_classes > 8 else "")
    typer.echo(f"  classes      {ds.num_classes}: {shown}")
    if "vtab_group" in facts:
        typer.echo(f"  VTAB group   {facts['vtab_group']}")
    typer.echo(f"  stored       {facts.get('bytes', 0) / 1e6:,.1f} MB in {facts.get('shards')} shards")
    typer.echo(f"  quarantined  {facts.get('quarantined', 0)}")
    for split in ds.splits:
        typer.echo(f"  {split:<22}{ds.count(split):>10,}")


commands.register(app)
app.command()(promote.promote)
stack.register(app)

if __name__ == "__main__":
    app()
