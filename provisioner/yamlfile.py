"""YAML files loaded into plain data, remembering the line of every key and item.

Config and mapping errors name ``file:line``; this is where the lines come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from provisioner.errors import ConfigError

Loc = tuple[str | int, ...]

_CONSTRUCTOR = yaml.constructor.SafeConstructor()


@dataclass(slots=True)
class YamlDocument:
    """A parsed YAML file and the 1-based line of each location in it."""

    path: Path
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int:
        """The line of ``loc``, or of its nearest parent that has one."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return 1

    def where(self, loc: Loc) -> str:
        """``file:line`` for a location."""
        return f"{self.path}:{self.line_of(loc)}"


def load_yaml(path: Path) -> YamlDocument:
    """Parse a YAML file; syntax errors and duplicate keys become ConfigError with file:line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem or exc.context}") from None
    doc = YamlDocument(path=path, data=None)
    if node is not None:
        doc.data = _build(node, (), doc)
    return doc


def _build(node: yaml.Node, loc: Loc, doc: YamlDocument) -> Any:
    doc.lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, doc)
            if not isinstance(key, (str, int, float, bool)):
                raise ConfigError(f"{doc.path}:{key_node.start_mark.line + 1}: a key must be a plain value")
            key = str(key)
            if key in result:
                raise ConfigError(f"{doc.path}:{key_node.start_mark.line + 1}: duplicate key '{key}'")
            child = (*loc, key)
            doc.lines[child] = key_node.start_mark.line + 1
            result[key] = _build(value_node, child, doc)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*loc, i), doc) for i, item in enumerate(node.value)]
    return _scalar(node, doc)


def _scalar(node: yaml.Node, doc: YamlDocument) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{doc.path}:{node.start_mark.line + 1}: a key must be a plain value")
    # Tags (bools, ints, nulls) were resolved by compose exactly as yaml.safe_load does.
    return _CONSTRUCTOR.construct_object(node, deep=True)
