"""YAML for configs: PyYAML's safe loader, refusing what could exhaust memory or hide a mistake.

A 2 KB document of nested aliases ("billion laughs") expands to 10^9 values: any code that walks or
prints it (a type check, an error message) takes gigabytes. 100,000-deep nesting overflows the
parser's recursion. A key given twice silently keeps the last value. `read_yaml` refuses all three
with one `DcqError` line, before anything looks at the values.
"""

from __future__ import annotations

from typing import Any

import yaml

from dcq.errors import DcqError, shown

MAX_YAML_NODES = 100_000  # values after alias expansion; a 2 KB "billion laughs" would be 10^9
MAX_YAML_DEPTH = 64


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping, nesting deeper than
    MAX_YAML_DEPTH and documents whose aliases expand to more than MAX_YAML_NODES values."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels (line {self.get_mark().line + 1})")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = key_node.value
            if key in seen:
                raise _Refused(f"key {shown(key)} is given twice (lines {seen[key]} and "
                               f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


class _Refused(Exception):
    """A YAML document `read_yaml` refuses; the message says why."""


def _expanded_size(node, memo: dict) -> int:
    """Values in ``node`` with every alias expanded (shared nodes counted each time), capped."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_YAML_NODES + 1  # a cycle counts as too large
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = min(size, MAX_YAML_NODES + 1)
    return memo[id(node)]


def read_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` with `_StrictLoader`'s refusals as one `DcqError` line."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise _Refused(f"its aliases expand to more than {MAX_YAML_NODES:,} values; write the values out")
        return loader.construct_document(node)
    except _Refused as exc:
        raise DcqError(f"{source}: {exc}") from None
    except RecursionError:
        raise DcqError(f"{source}: nested too deeply to read") from None
    finally:
        loader.dispose()
