"""YAML files loaded into plain data, remembering the line of every key and item.

Config and mapping errors name ``file:line`` (mappings ``file:line:column``);
this is where the positions come from.

The loader is defensive, because a config author's file is input like any other:

- only the plain YAML types are built (maps, lists, text, numbers, booleans,
  null); any explicit tag other than those (``!!python/name:…``, ``!custom``)
  is refused with its ``file:line``;
- aliases are followed, but the document they expand to is capped at
  :data:`MAX_NODES` values, and an alias that contains itself is refused: a
  few hundred bytes of nested aliases ("billion laughs") would otherwise
  expand to gigabytes;
- files over :data:`MAX_FILE_BYTES` and nesting deeper than the parser can
  follow are refused the same way.

Scalars are resolved as ``yaml.safe_load`` does (YAML 1.1: ``NO`` is false,
``0123`` is 83), and the text of every plain scalar that did not resolve to a
string is kept in :attr:`YamlDocument.plain`, so that a reader that expects
text (a mapping's string attribute) takes what the author wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from provisioner.errors import ConfigError

Loc = tuple[str | int, ...]

_CONSTRUCTOR = yaml.constructor.SafeConstructor()
# Values built from one document, aliases expanded; a real config or mapping holds a few hundred.
MAX_NODES = 100_000
MAX_FILE_BYTES = 4 * 1024 * 1024
_TAG = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_TAG + name for name in ("str", "int", "float", "bool", "null", "map", "seq")}
# YAML 1.1 reads these as dates; YAML 1.2 and every string attribute want them as text.
_TIMESTAMP = _TAG + "timestamp"


@dataclass(slots=True)
class YamlDocument:
    """A parsed YAML file and the 1-based line of each location in it.

    ``plain`` holds, by location, the text of every unquoted scalar that YAML
    1.1 resolves to something other than a string (``NO`` → false, ``0123`` →
    83, ``2024-01-01`` → a date, which is loaded as its text).
    """

    path: Path
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    plain: dict[Loc, str] = field(default_factory=dict)
    # 1-based column of each location: of the key for a mapping's entries, else of the value.
    columns: dict[Loc, int] = field(default_factory=dict)
    # Where each scalar value starts and ends: (line, column, end line, end column), 1-based.
    spans: dict[Loc, tuple[int, int, int, int]] = field(default_factory=dict)
    text: str = ""

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

    def position(self, loc: Loc) -> tuple[int, int]:
        """(line, column) of ``loc`` (its key, for a mapping's entry), or of its nearest parent."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line, self.columns.get(tuple(loc[:end]), 1)
        return 1, 1

    def at(self, loc: Loc) -> str:
        """``file:line:column`` of a location's key, the way a compiler names a position."""
        line, column = self.position(loc)
        return f"{self.path}:{line}:{column}"

    def at_value(self, loc: Loc, word: str | None = None) -> str:
        """``file:line:column`` of a scalar value, or of ``word`` inside it when found there.

        ``word`` is looked for as a whole word in the file's text between the
        value's start and end, so quoting and escapes cannot shift the column.
        """
        span = self.spans.get(loc)
        if span is None:
            return self.at(loc)
        line, column, end_line, end_column = span
        if word:
            lines = self.text.splitlines()
            pattern = re.compile(rf"(?<![\w.]){re.escape(word)}(?!\w)")
            for number in range(line, min(end_line, len(lines)) + 1):
                text = lines[number - 1]
                start = column - 1 if number == line else 0
                stop = end_column - 1 if number == end_line else len(text)
                found = pattern.search(text, start, stop)
                if found:
                    return f"{self.path}:{number}:{found.start() + 1}"
        return f"{self.path}:{line}:{column}"


def load_yaml(path: Path) -> YamlDocument:
    """Parse a YAML file into plain data.

    Raises ConfigError naming ``file:line`` for syntax errors, duplicate keys,
    tags other than the plain YAML types, aliases that expand past
    :data:`MAX_NODES` values or into themselves, and files over
    :data:`MAX_FILE_BYTES`.
    """
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: {size} bytes is more than a config or mapping file may hold ({MAX_FILE_BYTES})")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"{path}:{_yaml_error(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    doc = YamlDocument(path=path, data=None, text=text)
    if node is not None:
        try:
            doc.data = _Builder(doc).build(node, ())
        except RecursionError:
            raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    return doc


def _yaml_error(exc: yaml.MarkedYAMLError) -> str:
    """``line:column: invalid YAML: …`` where the author has to look.

    An unclosed quote or bracket is noticed where the parser runs out (often
    the end of the file); the mistake is where the quote or bracket opened.
    """
    context = exc.context or ""
    opened = exc.context_mark is not None and ("quoted scalar" in context or "flow" in context)
    mark = exc.context_mark if opened else (exc.problem_mark or exc.context_mark)
    position = f"{mark.line + 1}:{mark.column + 1}" if mark else "1:1"
    problem = exc.problem or context
    if opened:
        problem = f"{context.removeprefix('while ')}: {problem}" if exc.problem else context
    return f"{position}: invalid YAML: {problem}"


class _Builder:
    """Turns a composed node graph into plain data, counting every value built."""

    def __init__(self, doc: YamlDocument) -> None:
        self.doc = doc
        self.built = 0
        # Nodes being built right now: meeting one again means an alias contains itself.
        self.open: set[int] = set()

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.built += 1
        if self.built > MAX_NODES:
            raise ConfigError(
                f"{self._at(node)}: the document expands to more than {MAX_NODES} values "
                "(aliases repeating aliases?); write it out or use fewer aliases"
            )
        self.doc.lines.setdefault(loc, node.start_mark.line + 1)
        self.doc.columns.setdefault(loc, node.start_mark.column + 1)
        if isinstance(node, yaml.ScalarNode):
            start, end = node.start_mark, node.end_mark
            self.doc.spans[loc] = (start.line + 1, start.column + 1, end.line + 1, end.column + 1)
            return self.scalar(node, loc)
        self._check_tag(node)
        if id(node) in self.open:
            raise ConfigError(f"{self._at(node)}: an alias refers to a value that contains it")
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, loc)
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        finally:
            self.open.discard(id(node))

    def mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(f"{self._at(key_node)}: a key must be a plain value")
            key = self.scalar(key_node, None)
            if not isinstance(key, (str, int, float, bool)):
                raise ConfigError(f"{self._at(key_node)}: a key must be a plain value")
            # A key is text as written: `NO: Norway` in a lookup table is "NO", not YAML 1.1's False.
            key = key if isinstance(key, str) else key_node.value
            if key in result:
                raise ConfigError(f"{self._at(key_node)}: duplicate key '{key}'")
            child = (*loc, key)
            self.doc.lines[child] = key_node.start_mark.line + 1
            self.doc.columns[child] = key_node.start_mark.column + 1
            result[key] = self.build(value_node, child)
        return result

    def scalar(self, node: yaml.ScalarNode, loc: Loc | None) -> Any:
        if node.tag == _TIMESTAMP:
            # Implicit only (an explicit !!timestamp is refused below): keep the date as written.
            if loc is not None and node.style is None:
                self.doc.plain[loc] = node.value
            return node.value
        self._check_tag(node)
        value = _CONSTRUCTOR.construct_object(node, deep=True)
        if loc is not None and node.style is None and not isinstance(value, str) and value is not None:
            self.doc.plain[loc] = node.value
        return value

    def _check_tag(self, node: yaml.Node) -> None:
        if node.tag not in _PLAIN_TAGS:
            tag = "!!" + node.tag[len(_TAG) :] if node.tag.startswith(_TAG) else node.tag
            raise ConfigError(f"{self._at(node)}: the YAML tag '{tag}' is not allowed (plain values only)")

    def _at(self, node: yaml.Node) -> str:
        return f"{self.doc.path}:{node.start_mark.line + 1}"
