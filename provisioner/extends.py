"""Mappings that share: ``extends: users.yaml`` reads another mapping first, then changes it.

A mapping with ``extends:`` (a path relative to its own file) starts from the
mapping it names — which may extend another in turn — and then:

- ``attributes``: each attribute it writes replaces the base's of the same
  name (names compare without case, RFC 7643 §2.1), whole: a complex
  attribute (``name``, ``emails``) is written out in full. A schema
  extension (a ``urn:…`` key) is merged one level down: its attributes are
  replaced one by one, so overriding ``department`` keeps ``employeeNumber``.
- ``attribute: null`` removes the base's attribute (``null`` is never a
  value: a mapping without ``extends`` refuses it as before). Removing an
  attribute the base does not map is a mistake, reported like any other.
- ``tables``: each table replaces the base's table of that name.
- ``resource``, ``match``, ``scope``, ``leaver_when``: the mapping's own,
  when written, else the base's.

Every position stays where the text is: a mistake in an inherited attribute
is reported at its line in the base file, one in an override in the child.
A chain that comes back to a file it started from is refused (ConfigError
at the ``extends`` that closes it), as is a base that does not exist.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from provisioner.errors import ConfigError
from provisioner.yamlfile import Loc, YamlDocument, load_yaml

# Chains of more files than this are refused: nobody shares mappings that deep on purpose.
MAX_DEPTH = 16


class Document(Protocol):
    """What a mapping compiler reads: the data and where each location is written."""

    path: Path
    data: Any

    @property
    def plain(self) -> Mapping[Loc, str]: ...

    def at(self, loc: Loc) -> str: ...

    def at_value(self, loc: Loc, word: str | None = None) -> str: ...

    def position(self, loc: Loc) -> tuple[int, int]: ...


class LayeredDocument:
    """A mapping merged with the ones it extends; every location answers for the file that wrote it."""

    def __init__(self, path: Path, data: dict[str, Any], owners: dict[Loc, Document], default: Document) -> None:
        self.path = path
        self.data = data
        self._owners = owners
        self._default = default
        self.plain: Mapping[Loc, str] = _Plain(self)

    def owner(self, loc: Loc) -> Document:
        """The document that wrote ``loc``: the owner of its longest owned prefix."""
        for end in range(len(loc), 0, -1):
            found = self._owners.get(tuple(loc[:end]))
            if found is not None:
                return found
        return self._default

    def documents(self) -> list[Document]:
        """Every document the merge reads from, each once."""
        found: dict[int, Document] = {id(self._default): self._default}
        for doc in self._owners.values():
            found.setdefault(id(doc), doc)
        return list(found.values())

    def at(self, loc: Loc) -> str:
        return self.owner(loc).at(loc)

    def at_value(self, loc: Loc, word: str | None = None) -> str:
        return self.owner(loc).at_value(loc, word)

    def position(self, loc: Loc) -> tuple[int, int]:
        return self.owner(loc).position(loc)


class _Plain(Mapping[Loc, str]):
    """The ``plain`` texts of a layered document, each read from the file that wrote it."""

    def __init__(self, layered: LayeredDocument) -> None:
        self._layered = layered

    def __getitem__(self, loc: Loc) -> str:
        return self._layered.owner(loc).plain[loc]

    def __contains__(self, loc: object) -> bool:
        return isinstance(loc, tuple) and loc in self._layered.owner(loc).plain

    def __iter__(self) -> Iterator[Loc]:
        layered = self._layered
        for doc in layered.documents():
            for loc in doc.plain:
                if layered.owner(loc) is doc:
                    yield loc

    def __len__(self) -> int:
        return sum(1 for _ in self)


def load_layers(path: Path) -> tuple[Document, list[tuple[str, str]]]:
    """The mapping at ``path`` merged with the chain it extends, and the mistakes found in merging.

    A mistake is ``(file:line:column, message)``; compiling goes on after it.
    Raises ConfigError: a YAML error (in any file of the chain), a base that
    does not exist, ``extends`` that is not a path, a cycle, a chain over
    :data:`MAX_DEPTH` files.
    """
    problems: list[tuple[str, str]] = []
    return _load(path, (), problems), problems


def _load(path: Path, chain: tuple[Path, ...], problems: list[tuple[str, str]]) -> Document:
    doc = load_yaml(path)
    if not isinstance(doc.data, dict) or "extends" not in doc.data:
        return doc
    value = doc.data["extends"]
    where = doc.at_value(("extends",))
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: extends must be the path of another mapping file")
    base_path = (path.parent / value.strip()).resolve()
    here = (*chain, path.resolve())
    if base_path in here:
        loop = " → ".join(p.name for p in (*here[here.index(base_path):], base_path))
        raise ConfigError(f"{where}: extends '{value}' makes a cycle: {loop}")
    if len(here) >= MAX_DEPTH:
        raise ConfigError(f"{where}: extends chains more than {MAX_DEPTH} files")
    if not base_path.is_file():
        raise ConfigError(f"{where}: extends '{value}': no such file")
    base = _load(base_path, here, problems)
    if not isinstance(base.data, dict):
        raise ConfigError(f"{where}: extends '{value}': that file is not a mapping")
    return _merge(doc, base, problems)


def _merge(child: YamlDocument, base: Document, problems: list[tuple[str, str]]) -> LayeredDocument:
    data: dict[str, Any] = {}
    owners: dict[Loc, Document] = {}
    for key, value in base.data.items():
        if key != "extends":
            data[key], owners[(key,)] = value, base
    for key, value in child.data.items():
        if key == "extends" or (key in ("attributes", "tables") and isinstance(value, dict)):
            continue
        if value is None and key in data:
            del data[key]  # `scope: null`: back to the default, not the base's rule
            continue
        data[key], owners[(key,)] = value, child
    for key in ("attributes", "tables"):
        mine = child.data.get(key)
        if not isinstance(mine, dict):
            continue
        theirs = data.get(key) if isinstance(data.get(key), dict) else {}
        owners[(key,)] = child
        data[key] = _merge_entries(child, base, (key,), theirs, mine, owners, problems, deeper=key == "attributes")
    return LayeredDocument(child.path, data, owners, child)


def _merge_entries(
    child: YamlDocument,
    base: Document,
    loc: Loc,
    theirs: dict[str, Any],
    mine: dict[str, Any],
    owners: dict[Loc, Document],
    problems: list[tuple[str, str]],
    *,
    deeper: bool,
) -> dict[str, Any]:
    """``theirs`` with ``mine`` laid over it, entry by entry; ``deeper``: extensions merge one level down."""
    merged = dict(theirs)
    for name in theirs:
        owners[(*loc, name)] = base
    by_fold = {str(name).casefold(): name for name in theirs}
    for name, value in mine.items():
        inherited = by_fold.get(str(name).casefold())
        if value is None:
            if inherited is None:
                problems.append((child.at((*loc, name)),
                                 f"'{name}: null' removes nothing: {base.path.name} has no {loc[-1][:-1]} '{name}'"))  # fmt: skip
            else:
                del merged[inherited]
            continue
        old = merged.pop(inherited) if inherited is not None else None
        if deeper and inherited == name and name.startswith("urn:") and isinstance(value, dict) and isinstance(old, dict):
            # An extension is a namespace of attributes, not one value: override them one by one.
            merged[name] = _merge_entries(child, base, (*loc, name), old, value, owners, problems, deeper=False)
        else:
            merged[name] = value
        owners[(*loc, name)] = child
    return merged
