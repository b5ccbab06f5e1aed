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
out. ``ref(key)`` names another identity; the planner replaces it with that
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
import math
import re
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from provisioner.errors import ConfigError
from provisioner.yamlfile import Loc, YamlDocument, load_yaml

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE_USER = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"

_USER_ATTRIBUTES = {
    "userName", "name", "displayName", "nickName", "profileUrl", "title", "userType",
    "preferredLanguage", "locale", "timezone", "password", "emails", "phoneNumbers", "ims",
    "photos", "addresses", "entitlements", "roles", "x509Certificates", "externalId",
}  # fmt: skip
_NAME_ATTRIBUTES = {"formatted", "familyName", "givenName", "middleName", "honorificPrefix", "honorificSuffix"}
_ENTERPRISE_ATTRIBUTES = {"employeeNumber", "costCenter", "organization", "division", "department", "manager"}
_MANAGED_BY_ENGINE = {
    "active": "set by the engine from the record's lifecycle; use 'leaver_when' or 'scope'",
    "id": "assigned by the target",
    "meta": "assigned by the target",
    "groups": "read-only in SCIM; memberships are managed on groups",
    "schemas": "derived from the attributes used",
}
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JINJA_LITERALS = {"true", "false", "none", "True", "False", "None"}
_MAPPING_KEYS = {"resource", "match", "scope", "leaver_when", "attributes"}
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
        schemas = [CORE_USER] + [k for k in payload if k.startswith("urn:")]
        return Rendered(payload={"schemas": schemas, **payload, "active": True}, in_scope=True, leaver=False)

    def missing_columns(self, available: set[str]) -> list[str]:
        """Columns the mapping reads by name that the source does not have."""
        return sorted(self.columns - available)


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


def load_mapping(path: Path) -> AttributeMapping:
    """Load and compile a mapping file; every error names file:line and the attribute."""
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError(f"{path}:1: a mapping must be a YAML mapping with an 'attributes' key")
    unknown = set(doc.data) - _MAPPING_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{doc.where((key,))}: unknown key '{key}'{_suggest(key, _MAPPING_KEYS)}")
    resource = doc.data.get("resource", "User")
    if resource != "User":
        raise ConfigError(f"{doc.where(('resource',))}: resource '{resource}' is not supported (only User)")
    attributes = doc.data.get("attributes")
    if not isinstance(attributes, dict) or not attributes:
        raise ConfigError(f"{doc.where(('attributes',))}: 'attributes' must map SCIM attributes to values")
    compiler = _Compiler(doc)
    scope = compiler.lifecycle(doc.data, "scope", "__scope", default=True)
    leaver_when = compiler.lifecycle(doc.data, "leaver_when", "__leaver", default=False)
    root = compiler.compile_object(attributes, ("attributes",), "")
    if "userName" not in attributes:
        raise ConfigError(f"{doc.where(('attributes',))}: attribute 'userName' is required by SCIM (RFC 7643 §4.1)")
    match = doc.data.get("match", "userName")
    if not isinstance(match, str) or match not in attributes:
        raise ConfigError(f"{doc.where(('match',))}: match '{match}' must be one of the mapped top-level attributes")
    return AttributeMapping(
        path=path,
        resource=resource,
        endpoint="Users",
        match=match,
        columns=frozenset(compiler.columns),
        _batch=compiler.batch(scope, leaver_when, str(path)),
        _root=root,
        _required={name: doc.where(("attributes", name)) for name in dict.fromkeys(["userName", match])},
        uses_refs=any("ref(" in part for part in compiler.parts),
    )


class _Compiler:
    def __init__(self, doc: YamlDocument) -> None:
        self.doc = doc
        self.columns: set[str] = set()
        self.parts: list[str] = []
        self.env = _Sandbox()
        self.env.globals["ref"] = lambda key: Ref(str(key)) if key not in (None, "") else None

    def lifecycle(self, data: dict[str, Any], key: str, slot: str, default: bool) -> _Leaf:
        if data.get(key) is None:
            self.parts.append(f"{{% set {slot} = {'true' if default else 'false'} %}}")
            return _Leaf(key, self.doc.where((key,)), slot=slot)
        leaf = self.leaf(data[key], (key,), key, slot=slot)
        if leaf.slot is None:  # a YAML constant: the batch still sets the slot, in its fixed place
            self.parts.append(f"{{% set {slot} = {'true' if leaf.constant else 'false'} %}}")
        return _Leaf(key, leaf.where, slot=slot)

    def batch(self, scope: _Leaf, leaver_when: _Leaf, where: str) -> _Batch:
        return _Batch(self.env, scope, leaver_when, self.parts, where)

    def compile_object(self, data: dict[str, Any], loc: Loc, prefix: str) -> _Object:
        fields = []
        for name, value in data.items():
            self._check_attribute(name, loc, prefix)
            path = _join(prefix, name, schema_level=len(loc) == 2 and prefix.startswith("urn:"))
            fields.append((name, self.compile(value, (*loc, name), path)))
        return _Object(tuple(fields))

    def compile(self, value: Any, loc: Loc, path: str) -> Any:
        if isinstance(value, dict):
            return self.compile_object(value, loc, path)
        if isinstance(value, list):
            return _List(tuple(self.compile(v, (*loc, i), f"{path}[{i}]") for i, v in enumerate(value)))
        return self.leaf(value, loc, path)

    def leaf(self, value: Any, loc: Loc, path: str, slot: str | None = None) -> _Leaf:
        where = self.doc.where(loc)
        if isinstance(value, (bool, int, float)) or loc in self.doc.plain:
            return _Leaf(path, where, constant=self.literal(value, loc, path, boolean=slot is not None))
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: attribute '{path}': expected a column name, expression or literal")
        source = value.strip()
        if _COLUMN.fullmatch(source) and source not in _JINJA_LITERALS and slot is None:
            self.columns.add(source)
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
            raise ConfigError(f"{where}: attribute '{path}': invalid expression: {exc.message}") from None
        self.parts.append(part)
        return _Leaf(path, where, slot=slot)

    def literal(self, value: bool | int | float | str, loc: Loc, path: str, *, boolean: bool) -> Any:
        """A YAML boolean or number as the attribute takes it: text where the attribute is text.

        ``boolean``: the value decides scope or leaving, not an attribute.
        """
        where = self.doc.where(loc)
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

    def _check_attribute(self, name: str, loc: Loc, prefix: str) -> None:
        where = self.doc.where((*loc, name))
        if not prefix:
            if name in _MANAGED_BY_ENGINE:
                raise ConfigError(f"{where}: attribute '{name}' cannot be mapped: {_MANAGED_BY_ENGINE[name]}")
            if name.startswith("urn:") or name in _USER_ATTRIBUTES:
                return
            raise ConfigError(f"{where}: unknown User attribute '{name}'{_suggest(name, _USER_ATTRIBUTES)}")
        if prefix == "name" and name not in _NAME_ATTRIBUTES:
            raise ConfigError(f"{where}: unknown attribute 'name.{name}'{_suggest(name, _NAME_ATTRIBUTES)}")
        if prefix == ENTERPRISE_USER and name not in _ENTERPRISE_ATTRIBUTES:
            raise ConfigError(
                f"{where}: unknown enterprise attribute '{name}'{_suggest(name, _ENTERPRISE_ATTRIBUTES)}"
            )


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


def _explain(error: Exception) -> str:
    if isinstance(error, jinja2.UndefinedError):
        message = str(error.message)
        missing = re.fullmatch(r"'(\w+)' is undefined", message)
        return f"the record has no column '{missing.group(1)}'" if missing else message
    if isinstance(error, jinja2.exceptions.SecurityError):
        return f"not allowed in the sandbox: {error}"
    return f"{type(error).__name__}: {error}"


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
    if value is None or isinstance(value, (bool, int, Ref)):
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


def _suggest(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
