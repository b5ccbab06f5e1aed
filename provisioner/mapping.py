"""Attribute mappings: YAML that turns an identity record into a SCIM resource.

A value in ``attributes`` is one of:

- a column name (``first_name``): the record's value, looked up directly;
- a Jinja expression (``email | lower``, ``'work'``, ``ref(manager_id)``),
  evaluated in Jinja's sandbox with the record's columns as variables;
- a template containing ``{{ }}`` (``"{{ first_name }} {{ last_name }}"``),
  which renders to a string;
- a YAML boolean or number: its value where the attribute is a boolean
  (``primary: true``) or of a custom extension, and the text as written where
  the attribute is text (``locale: NO`` is ``"NO"``, ``externalId: 0123`` is
  ``"0123"``, never YAML 1.1's false and 83). Forms only YAML 1.1 reads as
  booleans or numbers (``yes``, ``0123``, ``1_000``) are refused where the
  attribute is not text: write ``true`` or quote the text.

Empty results (``None``, ``""``, empty lists and objects) leave the attribute
out of what is sent: a create does not set it, and an update clears the value
the target holds (PATCH ``remove``, or a PUT without it), unless the attribute
says ``omit_if_empty: true``: then an update leaves the target's value as it is.

``ref(key)`` names another identity; the planner replaces it with that
account's id in the target once the account exists there.

A mapping is compiled once; rendering a record is a walk over compiled nodes.

A record is input like any other, and a bad one fails alone (MappingError):

- every value must be JSON (text, number, boolean, list, object); an
  undefined variable inside a list or object names the attribute and column;
- an attribute's value is capped at :data:`MAX_VALUE_CHARS` characters, and
  ``*``, ``**`` and ``%`` refuse to build anything larger before building it;
- ``range()`` calls of one record share a budget of :data:`RANGE_BUDGET`
  steps, so nested loops end in milliseconds;
- the record's expressions get :data:`TIME_LIMIT` seconds (in the main
  thread, where the planner runs), then the record is rejected.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import re
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from connectors import AttributeInfo, Schema
from provisioner.errors import ConfigError
from provisioner.functions import Unique, library
from provisioner.schema import COMMON_ATTRIBUTES, CORE_USER, ENTERPRISE_USER, RFC7643_SCHEMAS
from provisioner.extends import Document, load_layers
from provisioner.yamlfile import Loc


_MANAGED_BY_ENGINE = {
    "active": "set by the engine from the record's lifecycle; use 'leaver_when' or 'scope'",
    "id": "assigned by the target",
    "meta": "assigned by the target",
    "groups": "read-only in SCIM; memberships are managed on groups",
    "schemas": "derived from the attributes used",
}
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JINJA_LITERALS = {"true", "false", "none", "True", "False", "None"}
_MAPPING_KEYS = {"extends", "resource", "match", "scope", "leaver_when", "attributes", "tables"}
# An attribute written as {value: …, when: create, default: …}: its value and how it is sent.
_OPTION_KEYS = {"when", "default", "omit_if_empty"}
# RFC 7643 §4.1: every core and enterprise User attribute a mapping sets is text, except the
# 'primary' of multi-valued items; custom extensions declare their own types (unknown here).
_BOOLEAN_SUB_ATTRIBUTES = {"primary"}
# YAML 1.2 core schema forms: what a boolean or number reads as in every YAML version.
_YAML12_BOOL = re.compile(r"true|True|TRUE|false|False|FALSE")
_YAML12_NUMBER = re.compile(r"[-+]?(0|[1-9][0-9]*)(\.[0-9]*)?([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")

# Limits on what one record may make a mapping do (see the module docstring).
MAX_VALUE_CHARS = 100_000
RANGE_BUDGET = 100_000
TIME_LIMIT = 2.0


class MappingError(Exception):
    """A record could not be rendered; the message names file:line and attribute."""


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to another identity, resolved to its SCIM id in the target."""

    key: str


@dataclass(frozen=True, slots=True)
class _Leaf:
    """One value of the mapping: a column, a constant, or slot ``slot`` of the Jinja batch."""

    path: str
    where: str
    column: str | None = None
    constant: Any = None
    slot: str | None = None


@dataclass(frozen=True, slots=True)
class _Object:
    fields: tuple[tuple[str, Any], ...]


@dataclass(frozen=True, slots=True)
class _Defaulted:
    """A value, and what to send instead when it is empty (``default:``)."""

    value: Any
    default: Any


@dataclass(frozen=True, slots=True)
class _List:
    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Rendered:
    """A record rendered through a mapping: the SCIM payload, or why it is a leaver."""

    payload: dict[str, Any]
    in_scope: bool
    leaver: bool


@dataclass(frozen=True, slots=True)
class AttributeMapping:
    """A compiled mapping file."""

    path: Path
    resource: str
    endpoint: str
    match: str
    columns: frozenset[str]
    _batch: _Batch
    _root: _Object
    # Attributes a resource cannot go without (userName, the match attribute): name -> file:line.
    _required: dict[str, str]
    # Whether any expression calls ref(): payloads of mappings without references skip resolving.
    uses_refs: bool = False
    # Whether any expression calls unique_username(): its value is chosen when the account is created.
    uses_unique: bool = False
    # Every source column read, bare or inside an expression, with its file:line:column.
    names: tuple[tuple[str, str], ...] = ()
    # Attributes sent only when the account is created (``when: create``): ("password",) or (urn, name).
    create_only: frozenset[tuple[str, ...]] = frozenset()
    # Attributes whose empty value leaves the target's as it is (``omit_if_empty``): ("nickName",),
    # (urn, name) or ("name", "givenName"), as payload.keep_omitted takes them.
    omit_if_empty: frozenset[tuple[str, ...]] = frozenset()
    # What a render depends on besides the record: the mapping as parsed and the engine code that
    # renders and hashes it. Equal digests and equal records render to equal payloads.
    digest: bytes = b""
    # Whether a render can differ for the same record (``now()``, ``random``, ``lipsum()``): such a
    # mapping's renders are never remembered.
    volatile: bool = False

    def render(self, record: Mapping[str, Any]) -> Rendered:
        """Render one record; raise MappingError naming file:line and the attribute."""
        slots = self._batch.evaluate(record)
        in_scope = bool(_value(self._batch.scope, record, slots))
        leaver = bool(_value(self._batch.leaver_when, record, slots))
        if not in_scope or leaver:
            return Rendered(payload={}, in_scope=in_scope, leaver=leaver)
        payload = _render(self._root, record, slots) or {}
        for name, where in self._required.items():
            value = payload.get(name)
            if value is None:
                raise MappingError(f"{where}: attribute '{name}': is required but the record gives it no value")
            if isinstance(value, str) and not value.strip():
                # A target answers 400 at best; at worst it stores an account nobody can match again.
                raise MappingError(f"{where}: attribute '{name}': is required but the record gives it only blanks")
        if self.uses_unique:
            _check_unique(payload, str(self.path))
        schemas = [CORE_USER] + [k for k in payload if k.startswith("urn:")]
        return Rendered(payload={"schemas": schemas, **payload, "active": True}, in_scope=True, leaver=False)

    def missing_columns(self, available: set[str]) -> list[str]:
        """Columns the mapping reads by name that the source does not have."""
        return sorted(self.columns - available)

    def problems(self, record: Mapping[str, Any]) -> dict[tuple[str, str], str] | None:
        """What fails in each attribute for one record: ``{(file:line:column, attribute): reason}``.

        Unlike :meth:`render`, every attribute is tried, not only up to the
        first that fails. None when the record is out of scope or a leaver
        (its attributes are not rendered).
        """
        try:
            slots = self._batch.evaluate(record)
        except MappingError as exc:
            return {(self._batch.scope.where, "*"): str(exc)}
        found: dict[tuple[str, str], str] = {}
        rendered = True
        for leaf in (self._batch.scope, self._batch.leaver_when):
            try:
                value = bool(_value(leaf, record, slots))
            except MappingError as exc:
                found[(leaf.where, leaf.path)] = str(exc).split(f"'{leaf.path}': ", 1)[-1]
                continue
            rendered = rendered and value == (leaf is self._batch.scope)
        if found or not rendered:
            return found or None
        for leaf in _leaves(self._root):
            try:
                value = _value(leaf, record, slots)
                if value is not None and leaf.constant is None:
                    _json_value(value, [MAX_VALUE_CHARS])
            except MappingError as exc:
                found[(leaf.where, leaf.path)] = str(exc).split(f"'{leaf.path}': ", 1)[-1]
            except _BadValue as exc:
                found[(leaf.where, leaf.path)] = str(exc)
        return found


class _Batch:
    """Every Jinja expression of a mapping, evaluated in one sandboxed template per record.

    One template context per record instead of one per expression: a Jinja call
    costs ~10 µs of setup, which would dominate planning of large sources.
    Attributes are evaluated only for records in scope and not leaving.
    """

    def __init__(self, env: _Sandbox, scope: _Leaf, leaver_when: _Leaf, parts: list[str], where: str):
        self.scope = scope
        self.leaver_when = leaver_when
        self.source = "".join(parts[:2]) + "{% if __scope and not __leaver %}" + "".join(parts[2:]) + "{% endif %}"
        self._template = env.from_string(self.source)
        # Jinja keeps a template's globals as a ChainMap over the environment's, and copies all of
        # them into each record's context through it (~30 names, a third of a context's cost); the
        # environment is complete by now, so one plain dict serves every record.
        self._template.globals = dict(self._template.globals)
        self._parts = parts
        self._env = env
        self._where = where

    def evaluate(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Every slot's value for one record; MappingError when the record takes too long.

        The time limit needs SIGALRM, so it holds in the main thread (where
        the planner runs) and only when nobody else owns that signal; elsewhere
        the range budget and the size caps are what bound a record.
        """
        if not _alarm_usable():
            return self._evaluate(record)
        try:
            _Alarm.armed = True
            signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
            try:
                return self._evaluate(record)
            finally:
                # Disarmed before the timer is stopped: a signal that arrives in between is ignored.
                _Alarm.armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Timeout:
            raise MappingError(
                f"{self._where}: the expressions ran longer than {TIME_LIMIT:g} s on this record; stopped"
            ) from None

    def _evaluate(self, record: Mapping[str, Any]) -> dict[str, Any]:
        self._env.budget.reset()
        context = self._template.new_context(record)
        try:
            for _ in self._template.root_render_func(context):
                pass
        except Exception:  # noqa: BLE001 - find which attribute failed, one at a time
            return self._evaluate_each(record)
        return context.vars

    def _evaluate_each(self, record: Mapping[str, Any]) -> dict[str, Any]:
        slots: dict[str, Any] = {}
        for part in self._parts:
            self._env.budget.reset()
            try:
                template = self._env.from_string(part)
                context = template.new_context({**record, **slots})
                for _ in template.root_render_func(context):
                    pass
            except Exception as exc:  # noqa: BLE001 - a user expression failing is a data error
                slots[_slot_of(part)] = _Failure(exc)
                continue
            slots.update(context.vars)
        return slots


@dataclass(frozen=True, slots=True)
class _Failure:
    error: Exception


def _slot_of(part: str) -> str:
    return part.split()[2]


class _Budget:
    """Steps of ``range()`` left to one record's evaluation."""

    def __init__(self) -> None:
        self.left = RANGE_BUDGET

    def reset(self) -> None:
        self.left = RANGE_BUDGET

    def range(self, *args: int) -> range:
        steps = range(*args)
        self.left -= len(steps)
        if self.left < 0:
            raise OverflowError(f"range() calls of one record may count {RANGE_BUDGET} steps in all")
        return steps


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with ``*``, ``**`` and ``%`` refusing to build huge values.

    Without these checks ``'x' * 10**8`` allocates 100 MB before any check
    on the result could run.
    """

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, autoescape=False)
        self.budget = _Budget()
        self.globals["range"] = self.budget.range

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(times, int):
                    if len(sequence) * times > MAX_VALUE_CHARS:
                        raise OverflowError(f"a value of {len(sequence) * times} items is over {MAX_VALUE_CHARS}")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and right * math.log2(abs(left)) > 4096:
                raise OverflowError(f"{left} ** {right} is too large a number")
        elif operator == "%" and isinstance(left, str) and re.search(r"%[-#0 +]*(\d{6,}|\*)", left):
            raise OverflowError("a %-format width over 99999 characters")
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, str) and len(result) > MAX_VALUE_CHARS:
            raise OverflowError(f"a text of {len(result)} characters is over {MAX_VALUE_CHARS}")
        return result


class _Timeout(BaseException):
    """Raised in the main thread when a record's expressions run out of time.

    A BaseException, so that no ``except Exception`` in Jinja or in our
    per-attribute retry swallows it.
    """


class _Alarm:
    """Whether a record's evaluation is under way: the SIGALRM timer is ignored otherwise."""

    armed = False


def _on_alarm(signum: int, frame: Any) -> None:
    if _Alarm.armed:
        _Alarm.armed = False
        raise _Timeout


def _alarm_usable() -> bool:
    """Whether SIGALRM can bound this evaluation: main thread, and the signal is ours or unclaimed."""
    if TIME_LIMIT <= 0 or not hasattr(signal, "setitimer") or threading.get_ident() != threading.main_thread().ident:
        return False
    current = signal.getsignal(signal.SIGALRM)
    if current is _on_alarm:
        return True
    if current == signal.SIG_DFL:
        signal.signal(signal.SIGALRM, _on_alarm)
        return True
    return False


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One mistake in a mapping, the way a compiler reports it: ``file:line:column: message``."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.message else self.where

    @property
    def sort_key(self) -> tuple[str, int, int]:
        """(file, line, column), to list mistakes in the order they appear."""
        found = re.fullmatch(r"(.*?):(\d+)(?::(\d+))?", self.where)
        if found is None:
            return self.where, 0, 0
        return found.group(1), int(found.group(2)), int(found.group(3) or 0)


def load_mapping(path: Path, schemas: Mapping[str, Schema] | None = None) -> AttributeMapping:
    """Load and compile a mapping file; raise ConfigError naming file:line:column and the attribute.

    ``schemas``: the target's schemas by URN (``ScimClient.schemas()``); RFC
    7643's User and enterprise schemas when None. Only the first mistake is
    raised; :func:`compile_mapping` gives them all.
    """
    mapping, diagnostics = compile_mapping(path, schemas)
    if diagnostics or mapping is None:
        raise ConfigError(str(diagnostics[0]))
    return mapping


def compile_mapping(
    path: Path, schemas: Mapping[str, Schema] | None = None, extensions: Iterable[str] | None = None
) -> tuple[AttributeMapping | None, list[Diagnostic]]:
    """Compile a mapping and find every mistake in it, in the order they were found.

    ``schemas`` as :func:`load_mapping`; ``extensions``: the schema extensions
    the target's Users resource type declares (``/ResourceTypes``, RFC 7643
    §6), None when unknown. The mapping is None when a mistake leaves nothing
    to compile (no ``attributes``); with mistakes, it is only fit for reading
    its ``names`` and trying records (the broken values render as nothing).
    A YAML syntax error raises ConfigError: nothing after it can be read; so
    do a base that ``extends`` names and that does not exist, and a cycle of
    ``extends`` (:mod:`provisioner.extends`). Mistakes are positioned in the
    file that writes them, the base's or the child's.
    """
    doc, merging = load_layers(path)
    if not isinstance(doc.data, dict):
        return None, [Diagnostic(f"{path}:1:1", "a mapping must be a YAML mapping with an 'attributes' key")]
    compiler = _Compiler(doc, schemas, extensions)
    compiler.diagnostics += [Diagnostic(where, message) for where, message in merging]
    compiler.tables(doc.data.get("tables"))
    for key in doc.data:
        if key not in _MAPPING_KEYS:
            compiler.fail(doc.at((key,)), f"unknown key '{key}'{_suggest(key, _MAPPING_KEYS)}")
    resource = doc.data.get("resource", "User")
    if resource != "User":
        compiler.fail(doc.at_value(("resource",)), f"resource '{resource}' is not supported (only User)")
    attributes = doc.data.get("attributes")
    if not isinstance(attributes, dict) or not attributes:
        compiler.fail(doc.at(("attributes",)), "'attributes' must map SCIM attributes to values")
        return None, compiler.diagnostics
    scope = compiler.lifecycle(doc.data, "scope", "__scope", default=True)
    leaver_when = compiler.lifecycle(doc.data, "leaver_when", "__leaver", default=False)
    root = compiler.compile_object(attributes, ("attributes",), "", None)
    compiler.check_required(attributes)
    match = doc.data.get("match", "userName")
    if not isinstance(match, str) or match not in attributes:
        compiler.fail(doc.at_value(("match",)), f"match '{match}' must be one of the mapped top-level attributes")
    mapping = AttributeMapping(
        path=path,
        resource=resource,
        endpoint="Users",
        match=match if isinstance(match, str) else "userName",
        columns=frozenset(compiler.columns),
        _batch=compiler.batch(scope, leaver_when, str(path)),
        _root=root,
        _required={name: doc.at(("attributes", name)) for name in dict.fromkeys(["userName", match])},
        uses_refs=any("ref(" in part for part in compiler.parts),
        uses_unique=any("unique_username" in part for part in compiler.parts),
        names=tuple(compiler.names),
        create_only=frozenset(compiler.create_only),
        omit_if_empty=frozenset(compiler.omit_if_empty),
        digest=_mapping_digest(doc),
        volatile=compiler.volatile,
    )
    return mapping, compiler.diagnostics


# Functions and filters whose result is not decided by the record alone.
_VOLATILE_CALLS = frozenset({"now", "lipsum"})
_VOLATILE_FILTERS = frozenset({"random"})


def _mapping_digest(doc: Document) -> bytes:
    """A digest of the parsed mapping (tables included) and of the engine code that renders it.

    The text as YAML read it, not the file's bytes: a comment changes nothing. The
    engine's own modules are part of it, so that a new version's renders are never
    taken for an old one's.
    """
    # Locations mix names and indexes: sorted by their text.
    text = repr((doc.data, sorted((repr(loc), plain) for loc, plain in doc.plain.items()))).encode()
    return hashlib.blake2b(text, digest_size=32, key=_engine_digest()).digest()


@functools.cache
def _engine_digest() -> bytes:
    """A digest of the modules that decide what a record renders and hashes to."""
    from provisioner import functions, payload, planner

    digest = hashlib.blake2b(digest_size=32)
    for module in (__file__, functions.__file__, payload.__file__, planner.__file__):
        digest.update(Path(module).read_bytes())
    return digest.digest()


class _Compiler:
    def __init__(
        self, doc: Document, schemas: Mapping[str, Schema] | None, extensions: Iterable[str] | None
    ) -> None:
        self.doc = doc
        self.discovered = schemas is not None
        self.schemas = {urn.casefold(): schema for urn, schema in (RFC7643_SCHEMAS if schemas is None else schemas).items()}
        self.extensions = None if extensions is None else {urn.casefold() for urn in extensions}
        self.columns: set[str] = set()
        # Every source column the mapping reads, bare or inside an expression: (name, file:line:column).
        self.names: list[tuple[str, str]] = []
        self.parts: list[str] = []
        # Whether an expression calls something whose result the record alone does not decide.
        self.volatile = False
        self.diagnostics: list[Diagnostic] = []
        self.used_schemas: dict[str, Loc] = {}
        self.create_only: set[tuple[str, ...]] = set()
        self.omit_if_empty: set[tuple[str, ...]] = set()
        self.env = _Sandbox()
        self.env.globals["ref"] = lambda key: Ref(str(key)) if key not in (None, "") else None

    def tables(self, tables: Any) -> None:
        """The mapping's ``tables:`` (name → {key: value}) for ``lookup()``, and the function library."""
        if tables is None:
            tables = {}
        elif not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
            self.fail(self.doc.at(("tables",)), "'tables' must map table names to tables of key: value")
            tables = {}
        functions, filters = library({name: {str(k): v for k, v in table.items()} for name, table in tables.items()})
        self.env.globals.update(functions)
        self.env.filters.update(filters)

    def fail(self, where: str, message: str) -> None:
        self.diagnostics.append(Diagnostic(where, message))

    def lifecycle(self, data: dict[str, Any], key: str, slot: str, default: bool) -> _Leaf:
        if data.get(key) is None:
            self.parts.append(f"{{% set {slot} = {'true' if default else 'false'} %}}")
            return _Leaf(key, self.doc.at((key,)), slot=slot)
        leaf = self.leaf(data[key], (key,), key, slot=slot)
        if leaf.slot is None:  # a YAML constant: the batch still sets the slot, in its fixed place
            self.parts.append(f"{{% set {slot} = {'true' if leaf.constant else 'false'} %}}")
        return _Leaf(key, leaf.where, slot=slot)

    def batch(self, scope: _Leaf, leaver_when: _Leaf, where: str) -> _Batch:
        return _Batch(self.env, scope, leaver_when, self.parts, where)

    def compile_object(self, data: dict[str, Any], loc: Loc, prefix: str, parent: _Declared) -> _Object:
        fields = []
        for name, value in data.items():
            declared = self._check_attribute(name, (*loc, name), prefix, parent)
            path = _join(prefix, name, schema_level=len(loc) == 2 and prefix.startswith("urn:"))
            if isinstance(value, dict) and _written_with_options(value, declared):
                fields.append((name, self.options(value, (*loc, name), path, declared)))
            else:
                fields.append((name, self.compile(value, (*loc, name), path, declared)))
        return _Object(tuple(fields))

    def options(self, value: dict[str, Any], loc: Loc, path: str, declared: _Declared) -> Any:
        """``{value: …, when: create, default: …}``: an attribute with options on how it is sent."""
        if "value" not in value:
            self.fail(self.doc.at(loc), f"attribute '{path}': options need the attribute's 'value'")
            return _Leaf(path, self.doc.at(loc))
        for key in [key for key in value if key not in _OPTION_KEYS | {"value"}]:
            hint = _suggest(str(key), _OPTION_KEYS) or f"; the options are {', '.join(sorted(_OPTION_KEYS))}"
            self.fail(self.doc.at((*loc, key)), f"attribute '{path}': unknown option '{key}'{hint}")
        node = self.compile(value["value"], (*loc, "value"), path, declared)
        when = value.get("when", "always")
        if when == "create":
            # Only whole attributes can be left out of an update: top level, or an extension's.
            if len(loc) == 2:
                self.create_only.add((str(loc[1]),))
            elif len(loc) == 3 and str(loc[1]).startswith("urn:"):
                self.create_only.add((str(loc[1]), str(loc[2])))
            else:
                self.fail(self.doc.at((*loc, "when")), f"attribute '{path}': 'when: create' applies to a "
                          "top-level attribute or an extension's, not to a sub-attribute")  # fmt: skip
        elif when != "always":
            self.fail(self.doc.at_value((*loc, "when")), f"attribute '{path}': when must be 'create' or 'always', not {when!r}")
        omit = value.get("omit_if_empty", False)
        if not isinstance(omit, bool):
            self.fail(self.doc.at_value((*loc, "omit_if_empty")), f"attribute '{path}': omit_if_empty must be true or false")
        elif omit and (len(loc) > 3 or any(isinstance(part, int) for part in loc)):
            self.fail(self.doc.at((*loc, "omit_if_empty")), f"attribute '{path}': 'omit_if_empty' applies to an "
                      "attribute or a sub-attribute of a single-valued one, not inside a multi-valued attribute")  # fmt: skip
        elif omit:
            self.omit_if_empty.add(tuple(str(part) for part in loc[1:]))
        if "default" in value:
            node = _Defaulted(node, self.compile(value["default"], (*loc, "default"), path, declared))
        return node

    def compile(self, value: Any, loc: Loc, path: str, declared: _Declared = None) -> Any:
        if isinstance(value, dict):
            if isinstance(declared, AttributeInfo) and declared.type != "complex":
                self.fail(self.doc.at(loc), f"attribute '{path}' is a single {declared.type}, not an object")
                declared = None
            return self.compile_object(value, loc, path, declared)
        if isinstance(value, list):
            self._check_primaries(value, loc, path)
            return _List(tuple(self.compile(v, (*loc, i), f"{path}[{i}]", declared) for i, v in enumerate(value)))
        return self.leaf(value, loc, path)

    def leaf(self, value: Any, loc: Loc, path: str, slot: str | None = None) -> _Leaf:
        where = self.doc.at_value(loc)
        if isinstance(value, (bool, int, float)) or loc in self.doc.plain:
            try:
                return _Leaf(path, where, constant=self.literal(value, loc, path, boolean=slot is not None))
            except ConfigError as exc:
                self.fail(where, str(exc).removeprefix(f"{where}: "))
                return _Leaf(path, where)
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"attribute '{path}': expected a column name, expression or literal")
            return _Leaf(path, where)
        source = value.strip()
        if _COLUMN.fullmatch(source) and source not in _JINJA_LITERALS and slot is None:
            self.columns.add(source)
            self.names.append((source, where))
            return _Leaf(path, where, column=source)
        slot = slot or f"__{len(self.parts)}"
        if "{{" in source or "{%" in source:
            part = f"{{% set {slot} %}}{source}{{% endset %}}"
        else:
            part = f"{{% set {slot} = ({source}) %}}"
        try:
            # Compiling (not just parsing) catches unknown filters and tests now, not per record.
            self.env.from_string(part)
        except jinja2.TemplateSyntaxError as exc:
            unknown = re.match(r"No (filter|test) named '(\w+)'", exc.message or "")
            if unknown:
                kind, name = unknown.groups()
                known = set(self.env.filters if kind == "filter" else self.env.tests)
                self.fail(self.doc.at_value(loc, name),
                          f"attribute '{path}': unknown {kind} '{name}'{_suggest(name, known)}")  # fmt: skip
            else:
                message = exc.message or "syntax error"
                if message == "unexpected ')'" and ")" not in source:  # the ')' is ours, around the expression
                    message = "the expression ends too early"
                self.fail(where, f"attribute '{path}': invalid expression: {message}")
            return _Leaf(path, where)
        self._read_names(part, loc, path)
        self.parts.append(part)
        return _Leaf(path, where, slot=slot)

    def _read_names(self, part: str, loc: Loc, path: str) -> None:
        """Record the columns an expression reads and whether it is volatile; report functions that do not exist."""
        tree = self.env.parse(part)
        called = {
            node.node.name for node in tree.find_all(jinja2.nodes.Call) if isinstance(node.node, jinja2.nodes.Name)
        }
        filtered = {node.name for node in tree.find_all(jinja2.nodes.Filter)}
        if called & _VOLATILE_CALLS or filtered & _VOLATILE_FILTERS:
            self.volatile = True
        functions = {name for name in self.env.globals if not name.startswith("_")}
        for name in sorted(called - functions):
            self.fail(self.doc.at_value(loc, name), f"attribute '{path}': unknown function '{name}'{_suggest(name, functions)}")
        for name in sorted(jinja2.meta.find_undeclared_variables(tree) - called - set(self.env.globals)):
            if not name.startswith("__"):
                self.names.append((name, self.doc.at_value(loc, name)))

    def literal(self, value: bool | int | float | str, loc: Loc, path: str, *, boolean: bool) -> Any:
        """A YAML boolean or number as the attribute takes it: text where the attribute is text.

        ``boolean``: the value decides scope or leaving, not an attribute.
        """
        where = self.doc.at_value(loc)
        text = self.doc.plain.get(loc, str(value))
        last = path.rsplit(".", 1)[-1]
        if not boolean and last not in _BOOLEAN_SUB_ATTRIBUTES and _is_text_attribute(path):
            return text
        if isinstance(value, str) and not boolean and last not in _BOOLEAN_SUB_ATTRIBUTES:
            return value  # a date: YAML 1.2 has no date type, so it is text everywhere
        if boolean or last in _BOOLEAN_SUB_ATTRIBUTES:
            if not isinstance(value, bool) or not _YAML12_BOOL.fullmatch(text):
                raise ConfigError(f"{where}: attribute '{path}': expected true or false, not {text}")
            return value
        if not (_YAML12_BOOL if isinstance(value, bool) else _YAML12_NUMBER).fullmatch(text):
            raise ConfigError(
                f"{where}: attribute '{path}': {text} reads as {value!r} in YAML 1.1 only; "
                f"write {'true or false' if isinstance(value, bool) else 'the number plainly'}, "
                f"or quote it for text: \"'{text}'\""
            )
        return value

    def _check_attribute(self, name: str, loc: Loc, prefix: str, parent: _Declared) -> _Declared:
        """Report an attribute its schema does not declare, or one nobody may set; give its declaration.

        RFC 7643 §2.1: attribute names are compared without case. ``parent``
        None means unknown (a custom extension offline): nothing is checked below it.
        """
        where = self.doc.at(loc)
        if not prefix:
            if name in _MANAGED_BY_ENGINE:
                self.fail(where, f"attribute '{name}' cannot be mapped: {_MANAGED_BY_ENGINE[name]}")
                return None
            if name.startswith("urn:"):
                return self._extension(name, loc)
            if name.casefold() in COMMON_ATTRIBUTES:
                return COMMON_ATTRIBUTES[name.casefold()]
            parent = self.schemas.get(CORE_USER.casefold())
        if parent is None:
            return None
        if isinstance(parent, Schema):
            found, known = parent.attribute(name), {a.name for a in parent.attributes}
        elif parent.sub_attributes:
            found, known = parent.sub_attribute(name), {a.name for a in parent.sub_attributes}
        else:
            return None
        if found is None:
            known -= set(_MANAGED_BY_ENGINE)
            if not prefix:
                what = f"unknown User attribute '{name}'"
            elif prefix.casefold() == ENTERPRISE_USER.casefold():
                what = f"unknown enterprise attribute '{name}'"
            elif isinstance(parent, Schema):
                what = f"unknown attribute '{name}' of extension '{prefix}'"
            else:
                what = f"unknown attribute '{prefix.split('[')[0]}.{name}'"
            self.fail(where, f"{what}{_suggest(name, known)}")
            return None
        if found.mutability == "readOnly":
            self.fail(where, f"attribute '{_join(prefix, name, schema_level=isinstance(parent, Schema) and bool(prefix))}'"
                             " is read-only (RFC 7643 §7 mutability): the target assigns it")  # fmt: skip
        return found

    def _extension(self, urn: str, loc: Loc) -> _Declared:
        where = self.doc.at(loc)
        schema = self.schemas.get(urn.casefold())
        self.used_schemas[urn] = loc
        if self.extensions is not None and urn.casefold() not in self.extensions:
            self.fail(where, f"the target's Users resource type does not declare the extension '{urn}' "
                             "(GET /ResourceTypes): it may refuse or drop these attributes")  # fmt: skip
        elif schema is None and self.discovered:
            known = {s.id for s in self.schemas.values()}
            self.fail(where, f"the target declares no schema '{urn}' (GET /Schemas){_suggest(urn, known)}")
        elif schema is None:
            # Offline, a custom extension is unknown, not wrong; one a letter away from RFC 7643's is a typo.
            close = difflib.get_close_matches(urn, [s.id for s in self.schemas.values()], n=1, cutoff=0.95)
            if close:
                self.fail(where, f"unknown schema '{urn}' (did you mean '{close[0]}'?)")
        return schema

    def _check_primaries(self, items: list[Any], loc: Loc, path: str) -> None:
        """RFC 7643 §2.4: ``primary`` true at most once among a multi-valued attribute's values."""
        first: int | None = None
        for i, item in enumerate(items):
            if isinstance(item, dict) and item.get("primary") is True:
                if first is None:
                    first = i
                    continue
                line = self.doc.position((*loc, first, "primary"))[0]
                self.fail(self.doc.at((*loc, i, "primary")),
                          f"attribute '{path}': a second value is primary (the first is on line {line}); "
                          "RFC 7643 §2.4 allows one")  # fmt: skip

    def check_required(self, attributes: dict[str, Any]) -> None:
        """Required attributes of the core schema and of every extension used, that nobody may leave out."""
        mapped = {name.casefold() for name in attributes}
        core = self.schemas.get(CORE_USER.casefold())
        for info in core.attributes if core else ():
            if info.required and info.mutability != "readOnly" and info.name.casefold() not in mapped:
                self.fail(self.doc.at(("attributes",)), f"attribute '{info.name}' is required by SCIM (RFC 7643 §4.1)")
        for urn, loc in self.used_schemas.items():
            schema = self.schemas.get(urn.casefold())
            value = attributes.get(urn)
            if schema is None or not isinstance(value, dict):
                continue
            given = {name.casefold() for name in value}
            for info in schema.attributes:
                if info.required and info.mutability != "readOnly" and info.name.casefold() not in given:
                    self.fail(self.doc.at(loc), f"attribute '{info.name}' of '{urn}' is required by its schema")


_Declared = Schema | AttributeInfo | None


def _is_text_attribute(path: str) -> bool:
    """Whether a (non-'primary') attribute path is text: core and enterprise ones are; custom URNs unknown."""
    return not path.startswith("urn:") or path.startswith(ENTERPRISE_USER)


def _join(prefix: str, name: str, *, schema_level: bool) -> str:
    """Attribute paths as SCIM writes them: ``name.givenName``, ``urn:…:User:department``."""
    if not prefix:
        return name
    return f"{prefix}:{name}" if schema_level else f"{prefix}.{name}"


def _value(leaf: _Leaf, record: Mapping[str, Any], slots: dict[str, Any]) -> Any:
    if leaf.column is not None:
        try:
            return record[leaf.column]
        except KeyError:
            raise MappingError(f"{leaf.where}: attribute '{leaf.path}': the record has no column '{leaf.column}'") from None
    if leaf.slot is None:
        return leaf.constant
    value = slots.get(leaf.slot)
    if isinstance(value, _Failure):
        raise MappingError(f"{leaf.where}: attribute '{leaf.path}': {_explain(value.error)}")
    if isinstance(value, jinja2.Undefined):
        # The sandbox answers a forbidden attribute with an Undefined that raises SecurityError.
        try:
            str(value)
        except Exception as exc:  # noqa: BLE001 - UndefinedError, SecurityError: both are the record's problem
            raise MappingError(f"{leaf.where}: attribute '{leaf.path}': {_explain(exc)}") from None
        raise MappingError(f"{leaf.where}: attribute '{leaf.path}': undefined value")
    return value


def _check_unique(payload: dict[str, Any], where: str) -> None:
    """unique_username() values are chosen per attribute of the account: top-level ones only."""

    def nested(value: Any) -> bool:
        if isinstance(value, Unique):
            return True
        if isinstance(value, dict):
            return any(nested(v) for v in value.values())
        return isinstance(value, list) and any(nested(v) for v in value)

    for name, value in payload.items():
        if not isinstance(value, Unique) and nested(value):
            raise MappingError(f"{where}: attribute '{name}': unique_username() gives a top-level attribute "
                               "(userName), not a value inside one")  # fmt: skip


def _explain(error: Exception) -> str:
    if isinstance(error, jinja2.UndefinedError):
        message = str(error.message)
        missing = re.fullmatch(r"'(\w+)' is undefined", message)
        return f"the record has no column '{missing.group(1)}'" if missing else message
    if isinstance(error, jinja2.exceptions.SecurityError):
        return f"not allowed in the sandbox: {error}"
    return f"{type(error).__name__}: {error}"


def _leaves(node: Any) -> Iterator[_Leaf]:
    if isinstance(node, _Leaf):
        yield node
    elif isinstance(node, _Defaulted):
        yield from _leaves(node.value)
        yield from _leaves(node.default)
    elif isinstance(node, _Object):
        for _, child in node.fields:
            yield from _leaves(child)
    else:
        for child in node.items:
            yield from _leaves(child)


def _render(node: Any, record: Mapping[str, Any], slots: dict[str, Any]) -> Any:
    if isinstance(node, _Leaf):
        value = _value(node, record, slots)
        if value == "" or value is None:
            return None
        if node.constant is not None or (type(value) is str and len(value) <= MAX_VALUE_CHARS):
            return value
        try:
            return _json_value(value, [MAX_VALUE_CHARS])
        except _BadValue as exc:
            raise MappingError(f"{node.where}: attribute '{node.path}': {exc}") from None
    if isinstance(node, _Defaulted):
        value = _render(node.value, record, slots)
        return _render(node.default, record, slots) if value is None else value
    if isinstance(node, _Object):
        out = {}
        for name, child in node.fields:
            value = _render(child, record, slots)
            if value is not None:
                out[name] = value
        return out or None
    # A multi-valued complex item without its 'value' (an empty phone column) is no item at all.
    items = [
        v for v in (_render(child, record, slots) for child in node.items)
        if v is not None and not (isinstance(v, dict) and "value" not in v)
    ]  # fmt: skip
    return items or None


class _BadValue(Exception):
    """A rendered value that cannot be sent: not JSON, undefined inside, or too large."""


def _json_value(value: Any, left: list[int]) -> Any:
    """``value`` as JSON data (tuples become lists), checked; ``left`` counts characters still allowed.

    Raises _BadValue: an undefined variable inside a list or object (StrictUndefined
    only raises when used, not when stored), a value that is not JSON (a range,
    a function), a number that is not finite, more than MAX_VALUE_CHARS characters.
    """
    if isinstance(value, str):
        left[0] -= len(value)
        if left[0] < 0:
            raise _BadValue(f"the value is longer than {MAX_VALUE_CHARS} characters")
        return str(value)  # Markup and other str subclasses become plain text
    if value is None or isinstance(value, (bool, int, Ref, Unique)):
        left[0] -= 8
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _BadValue(f"{value} is not a number JSON can carry")
        return value
    if isinstance(value, jinja2.Undefined):
        try:
            str(value)
        except Exception as exc:  # noqa: BLE001 - UndefinedError, SecurityError: the record's problem
            raise _BadValue(_explain(exc)) from None
        raise _BadValue("undefined value")
    if isinstance(value, (list, tuple)):
        left[0] -= len(value)
        if left[0] < 0:
            raise _BadValue(f"the value holds more than {MAX_VALUE_CHARS} items")
        return [_json_value(item, left) for item in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _BadValue(f"an object key must be text, not {type(key).__name__}")
            left[0] -= len(key)
            out[key] = _json_value(item, left)
        return out
    raise _BadValue(f"the expression gives a {type(value).__name__}, not text, a number, a boolean, a list or an object")


def _written_with_options(value: dict[Any, Any], declared: _Declared) -> bool:
    """Whether an attribute's object is its value with options (``{value: …, when: create}``).

    It is when its keys are options and ``value``. An attribute that is not an
    object (a string, or one whose declaration is unknown) with a ``value``
    beside a real option or a key close to one is the same form with a
    misspelled option, which is named as such rather than as "not an object";
    an object with none of these (``{en: …, fr: …}``) is meant as the value.
    """
    keys = {str(key) for key in value}
    if keys & _OPTION_KEYS and keys <= _OPTION_KEYS | {"value"}:
        return True
    if "value" not in keys or (isinstance(declared, AttributeInfo) and declared.type == "complex"):
        return False
    others = keys - _OPTION_KEYS - {"value"}
    return bool(keys & _OPTION_KEYS) or any(difflib.get_close_matches(key, sorted(_OPTION_KEYS), n=1) for key in others)


def _suggest(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
