"""The Prefect forms of the per-preset deployments, from the JSON schema Prefect generates for the flows' parameters
(what the UI renders and what the server enforces): every field labelled and described, choices as dropdowns,
numbers with their ranges, each preset's spec a valid default, and `vitflow deploy --set` changing those defaults."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import build_error_obj, validate
from typer.testing import CliRunner

from flows.benchmark import benchmark, prepare_datasets
from flows.cli import app
from flows.commands import _preset_specs
from flows.deployments import definitions, runner_deployments
from flows.presets import PRESET_TAG, PRESETS, build_spec

FLOWS = [benchmark, prepare_datasets]
# Fields that are choices: each must be a dropdown (an enum), wherever it sits in the spec.
CHOICES = {
    "spec.model.name",
    "spec.pretrain.objective",
    "spec.pretrain.weight_decay_mode",
    "spec.pretrain.decay",
    "spec.pretrain.loss",
    "spec.model.gelu_approximate",
    "spec.transfer.benchmarks.protocol",
    "spec.compute.device",
    "spec.compute.precision",
    "spec.compute.dispatch",
    "dispatch",
}
# (field, the bound it must carry): what the form refuses before a run starts.
RANGES = {
    "spec.pretrain.steps": ("exclusiveMinimum", 0),
    "spec.pretrain.epochs": ("exclusiveMinimum", 0),
    "spec.pretrain.lr": ("exclusiveMinimum", 0),
    "spec.pretrain.batch_size": ("exclusiveMinimum", 0),
    "spec.pretrain.warmup_steps": ("minimum", 0),
    "spec.transfer.finetune.steps": ("exclusiveMinimum", 0),
    "spec.transfer.finetune.batch_size": ("exclusiveMinimum", 0),
    "spec.transfer.finetune.lrs.items": ("exclusiveMinimum", 0),
    "spec.transfer.finetune.seeds.items": ("minimum", 0),
    "spec.transfer.fewshot.shots.items": ("minimum", 1),
    "spec.transfer.fewshot.seeds.items": ("minimum", 0),
    "spec.transfer.fewshot.l2": ("exclusiveMinimum", 0),
    "spec.compute.nproc_per_node": ("minimum", 1),
    "spec.compute.max_parallel": ("minimum", 1),
    "spec.seed": ("minimum", 0),
}


def schema_of(flow, preset: str = "demo") -> dict[str, Any]:
    """The form of the preset's deployment of ``flow``, as `vitflow deploy` registers it."""
    (deployment,) = [r for r in runner_deployments() if r.flow_name == flow.name and r.name == preset]
    return deployment._parameter_openapi_schema.model_dump()


def walk(schema: dict[str, Any], node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property of the form, by dotted path (list items as ``<list>.items`` unless they are models)."""
    for name, prop in node.get("properties", {}).items():
        where = f"{path}{name}"
        yield where, prop
        items = next((o["items"] for o in [prop, *prop.get("anyOf", [])] if "items" in o), {})
        ref = prop.get("$ref") or items.get("$ref")
        if ref:
            yield from walk(schema, schema["definitions"][ref.rsplit("/", 1)[1]], f"{where}.")
        elif items:
            yield f"{where}.items", items


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_every_field_of_the_form_has_a_title_and_a_one_line_description(flow):
    fields = dict(walk(schema := schema_of(flow), schema))
    assert "spec.pretrain.steps" in fields and "spec.transfer.benchmarks.dataset.source" in fields
    for path, prop in fields.items():
        if path.endswith(".items"):
            continue
        assert prop.get("title"), f"{path} has no title"
        description = prop.get("description", "")
        assert description, f"{path} has no description"
        assert "\n" not in description, f"{path}: description on more than one line"
        assert "<" not in description, f"{path}: the form renders descriptions as markdown: <...> disappears"
    # ranges beside an X/None toggle, not inside it (where errors do not name the field); no nullable sections
    options = [o for path, p in fields.items() if path.startswith("spec.") for o in p.get("anyOf", [])]
    assert options and not any(set(o) & {"$ref", "minimum", "exclusiveMinimum", "maximum"} for o in options)


def test_choices_are_dropdowns_and_numbers_carry_their_ranges():
    fields = dict(walk(schema := schema_of(benchmark), schema))
    for path in CHOICES:
        options = [fields[path], *fields[path].get("anyOf", [])]  # the flow's own `X | None` parameters
        assert any(o.get("enum") for o in options), f"{path} is not an enum"
    assert "vit_b_16" in fields["spec.model.name"]["enum"]
    for path, (bound, value) in RANGES.items():
        assert fields[path].get(bound) == value, f"{path}: {bound} {fields[path].get(bound)} != {value}"
    assert "preset" not in schema["properties"] and "overrides" not in schema["properties"]
    assert schema["required"] == ["spec"]


def test_each_preset_has_a_benchmark_and_a_prepare_deployment_whose_default_is_its_spec(monkeypatch):
    monkeypatch.delenv("VITFLOW_INIT", raising=False)
    defs = {(d.flow.name, d.name): d for d in definitions()}
    for flow in FLOWS:
        generic = parameter_schema(flow.fn).model_dump()  # what `prefect deploy` of infra/prefect.yaml registers
        for name in PRESETS:
            d = defs[flow.name, name]
            assert d.parameters == {"spec": build_spec(name).form_values()}
            assert f"{PRESET_TAG}{name}" in d.tags
            for schema in (schema_of(flow, name), generic):
                assert validate(d.parameters, schema, preprocess=True, raise_on_error=False) == []
            flow.validate_parameters(d.parameters)


def test_a_preset_that_starts_from_init_has_no_pretraining_section_in_its_form():
    spec_fields = schema_of(benchmark, "vtab-1k")["definitions"]["BenchmarkSpec"]["properties"]
    assert "pretrain" not in spec_fields and "init" in spec_fields
    pretrains = schema_of(benchmark, "demo")["definitions"]["BenchmarkSpec"]["properties"]["pretrain"]
    assert pretrains["$ref"].endswith("/PretrainSpec") and "anyOf" not in pretrains


def test_the_form_schema_names_the_field_out_of_range():
    spec = build_spec("demo").model_dump(mode="json")
    spec["pretrain"]["steps"], spec["pretrain"]["lr"] = 0, -1e-3
    errors = build_error_obj(validate({"spec": spec}, schema_of(benchmark), preprocess=True, raise_on_error=False))
    (top,) = errors["errors"]
    (pretrain,) = top["errors"]
    assert pretrain["property"] == "pretrain"
    assert {e["property"]: e["errors"] for e in pretrain["errors"]} == {
        "steps": ["0 is less than or equal to the minimum of 0"],
        "lr": ["-0.001 is less than or equal to the minimum of 0"],
    }


def test_deploy_set_changes_one_presets_defaults_and_names_a_bad_field():
    specs = _preset_specs(["demo:pretrain.steps=7", "demo:transfer.benchmarks=[]", "vtab-1k:compute.device=cpu"])
    assert specs["demo"].pretrain.steps == 7 and specs["demo"].transfer.benchmarks == []
    assert specs["vtab-1k"].compute.device == "cpu"
    assert specs["paper-b16-i1k"] == build_spec("paper-b16-i1k")
    (demo,) = [d for d in definitions(presets=specs) if d.flow is benchmark and d.name == "demo"]
    assert demo.parameters["spec"]["pretrain"]["steps"] == 7

    runner = CliRunner()
    bad = runner.invoke(app, ["deploy", "--set", "demo:pretrain.steps=0"])
    assert bad.exit_code == 2 and "preset demo" in bad.output and "pretrain.steps" in bad.output
    unknown = runner.invoke(app, ["deploy", "--set", "dmeo:pretrain.steps=3"])
    assert unknown.exit_code == 2 and "dmeo" in unknown.output and "paper-b16-i1k" in unknown.output
    shown = runner.invoke(app, ["deploy", "--help"], terminal_width=200)
    assert "PRESET:PATH=VALUE" in shown.output and "benchmark/demo" in shown.output
