"""``path.to.field=value`` overrides: the one parser every command line uses (``vitflow run --set``, ``pretrain``,
``finetune``, ``transfer``, ``data prepare --option`` and ``python -m vit.engine --set``), with the same syntax and
the same errors. Values are YAML (numbers, true/false, null, [lists], {maps}); list items are addressed by index."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def parse_override(item: str, flag: str = "--set") -> tuple[str, Any]:
    """``"a.b=1"`` -> ``("a.b", 1)``; an empty value stays the empty string."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"bad {flag} {item!r}: not path.to.field=value")
    return key.strip(), (yaml.safe_load(raw) if raw.strip() else "")


def parse_overrides(items: Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """Repeated ``key=value`` items as ``{dotted path: value}``."""
    return dict(parse_override(item, flag) for item in items)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Set each dotted path of ``overrides`` (``key=value`` strings, or a mapping of path -> value) in ``data``;
    missing sections are created, list items are addressed by index."""
    items = overrides.items() if isinstance(overrides, Mapping) else parse_overrides(overrides).items()
    for key, value in items:
        *parents, leaf = key.split(".")
        if not all(parents) or not leaf:
            raise ValueError(f"override {key!r}: empty field name in the path")
        node: Any = data
        for depth, part in enumerate(parents):
            if isinstance(node, list):
                node = node[_index(part, key, len(node))]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, dict | list):
                where = ".".join(parents[: depth + 1])
                raise ValueError(f"override {key!r}: {where} is a value ({node!r}), not a section with fields")
        if isinstance(node, list):
            node[_index(leaf, key, len(node))] = value
        else:
            node[leaf] = value
    return data


def _index(part: str, key: str, length: int) -> int:
    if not part.lstrip("-").isdigit() or not -length <= int(part) < length:
        raise ValueError(f"override {key!r}: {part!r} is not an index of a list of {length}")
    return int(part)
