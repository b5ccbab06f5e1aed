"""The functions a mapping's expressions can call, the everyday set of Entra ID's attribute mappings.

Each is a plain function of text (or lists), registered once per compiled
mapping as a Jinja global (``lower(email)``) and, where Jinja has no filter of
that name, as a filter too (``email | strip_spaces``). "Empty" means None,
undefined, ``""``, text of spaces only, or an empty list.

The list of functions with one example each is :data:`EXAMPLES`; the
README's table is generated from it (:func:`markdown_table`; a test keeps
the two equal, runs every example, and rewrites the README's table with
``PROVISIONER_REGOLD=1``).

``lookup`` reads a table of the mapping's ``tables:`` key. ``now()`` changes
every run: use it for an attribute sent ``when: create``, or every cycle
updates every account. Errors (a date that does not match its format, a regex
that does not compile or runs longer than :data:`REGEX_TIMEOUT`) fail the
record, never the cycle.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jinja2
import regex

# A pattern may backtrack exponentially: regex_replace stops it after this many seconds.
REGEX_TIMEOUT = 0.1
MAX_PATTERN_CHARS = 500
SCIM_DATETIME = "%Y-%m-%dT%H:%M:%SZ"

# Letters NFKD does not decompose into an ASCII letter and a mark.
_LETTERS = str.maketrans({
    "ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L",
    "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "Th", "ı": "i", "ħ": "h", "Ħ": "H",
})  # fmt: skip


def is_empty(value: Any) -> bool:
    """None, undefined, ``""`` or spaces only, or an empty list or object."""
    if value is None or isinstance(value, jinja2.Undefined):
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict)):
        return not value
    return False


def coalesce(*values: Any) -> Any:
    """The first value that is not empty; None when all are."""
    return next((v for v in values if not is_empty(v)), None)


def default(value: Any, fallback: Any = "", boolean: bool = False) -> Any:
    """``fallback`` when ``value`` is empty, else ``value`` (Jinja's own filter: undefined only)."""
    return fallback if is_empty(value) else value


def join(separator: str, *values: Any) -> str:
    """The non-empty values as text, separated; a list among them counts as its items."""
    items: list[Any] = []
    for value in values:
        items.extend(value if isinstance(value, (list, tuple)) else [value])
    return str(separator).join(str(v) for v in items if not is_empty(v))


def split(value: Any, separator: str = ",") -> list[str]:
    """The text cut at each separator, parts trimmed, empty parts left out."""
    if is_empty(value):
        return []
    return [part.strip() for part in str(value).split(separator) if part.strip()]


def append(value: Any, suffix: Any) -> str:
    """``value`` followed by ``suffix``; empty stays empty (no lone suffix)."""
    return "" if is_empty(value) else f"{value}{suffix}"


def lower(value: Any) -> str:
    return "" if is_empty(value) else str(value).lower()


def upper(value: Any) -> str:
    return "" if is_empty(value) else str(value).upper()


def trim(value: Any) -> str:
    return "" if is_empty(value) else str(value).strip()


def replace(value: Any, old: str, new: str) -> str:
    """Every ``old`` in the text replaced by ``new``."""
    return "" if is_empty(value) else str(value).replace(str(old), str(new))


def regex_replace(value: Any, pattern: str, replacement: str) -> str:
    """Every match of ``pattern`` replaced (``\\1`` for groups); bounded in time and pattern size.

    Raises ValueError for a pattern over :data:`MAX_PATTERN_CHARS`, TimeoutError
    past :data:`REGEX_TIMEOUT` seconds.
    """
    if is_empty(value):
        return ""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"a pattern of {len(pattern)} characters is over {MAX_PATTERN_CHARS}")
    return regex.sub(pattern, replacement, str(value), timeout=REGEX_TIMEOUT)


def left(value: Any, count: int) -> str:
    """The first ``count`` characters."""
    return "" if is_empty(value) else str(value)[: max(int(count), 0)]


def mid(value: Any, start: int, count: int) -> str:
    """``count`` characters from position ``start``, counted from 1 as in Entra's Mid."""
    if is_empty(value):
        return ""
    begin = max(int(start) - 1, 0)
    return str(value)[begin : begin + max(int(count), 0)]


def strip_spaces(value: Any) -> str:
    """The text without any whitespace."""
    return "" if is_empty(value) else "".join(str(value).split())


def normalize_diacritics(value: Any) -> str:
    """The text in ASCII: accents dropped (é → e), ß → ss, æ → ae, ø → o; other letters left out.

    Idempotent, and the result is always ASCII.
    """
    if value is None or isinstance(value, jinja2.Undefined):
        return ""
    decomposed = unicodedata.normalize("NFKD", str(value).translate(_LETTERS))
    return "".join(c for c in decomposed if c.isascii())


def format_date(value: Any, source_format: str = "%Y-%m-%d") -> str:
    """A date or time in ``source_format`` (strptime codes) as a SCIM dateTime (RFC 7643 §2.3.5), in UTC.

    A time without a zone is taken as UTC. Raises ValueError when the text does not match.
    """
    if is_empty(value):
        return ""
    parsed = datetime.strptime(str(value).strip(), source_format)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime(SCIM_DATETIME)


def switch(value: Any, fallback: Any, *pairs: Any) -> Any:
    """Entra's Switch: the result paired with the first key equal to ``value``, else ``fallback``."""
    if len(pairs) % 2:
        raise ValueError("switch takes a value, a default, then key and result pairs")
    for key, result in zip(pairs[::2], pairs[1::2], strict=True):
        if value == key:
            return result
    return fallback


def is_present(value: Any) -> bool:
    """Whether the value is not empty."""
    return not is_empty(value)


def now() -> str:
    """The current time as a SCIM dateTime, in UTC."""
    return datetime.now(UTC).strftime(SCIM_DATETIME)


# unique_username: how many numbered forms of the first candidate may be tried after the candidates.
MAX_NUMBERED = 99


@dataclass(frozen=True, slots=True)
class Unique:
    """A value to pick when the account is created: the first candidate the target does not hold.

    What ``unique_username`` renders to. The mapping is pure, so the choice is
    not made there: the executor makes it just before the create is sent, by
    looking each candidate up in the target, and keeps it (``chosen``) in the
    queue row so that a retry sends the same one.
    """

    candidates: tuple[str, ...]
    suffix: str = ""
    numbered: bool = True
    chosen: str | None = None

    def values(self) -> Iterator[str]:
        """Every value to try, in order: the candidates, then the first one numbered 2, 3, … :data:`MAX_NUMBERED`."""
        for candidate in self.candidates:
            yield f"{candidate}{self.suffix}"
        if self.numbered and self.candidates:
            for number in range(2, MAX_NUMBERED + 1):
                yield f"{self.candidates[0]}{number}{self.suffix}"

    def __str__(self) -> str:
        return self.chosen or f"unique_username({', '.join(self.candidates)}{', ' + self.suffix if self.suffix else ''})"


def unique_username(candidates: Any, suffix: Any = "", numbered: bool = True) -> Unique | None:
    """Entra's SelectUniqueValue: the first of ``candidates`` no other account in the target holds.

    ``candidates``: one text or a list of them, tried in order (empty ones
    skipped); then, unless ``numbered`` is false, the first one numbered:
    ``jane.doe``, ``jane.doe2``, ``jane.doe3`` … up to :data:`MAX_NUMBERED`.
    ``suffix`` is written after the number: ``unique_username('jane.doe',
    '@example.com')`` tries ``jane.doe@example.com``, then
    ``jane.doe2@example.com``. Chosen when the account is created, never
    changed afterwards; None (no value) when every candidate is empty.
    """
    items = candidates if isinstance(candidates, (list, tuple)) else [candidates]
    texts = tuple(dict.fromkeys(str(c).strip() for c in items if not is_empty(c)))
    if not texts:
        return None
    return Unique(texts, "" if is_empty(suffix) else str(suffix), bool(numbered))


@dataclass(frozen=True, slots=True)
class Example:
    """One function of the library as the docs list it, with an example that the tests run."""

    signature: str
    expression: str
    record: dict[str, Any]
    # What the docs say it gives; ``expected`` is what the expression renders to (None: not fixed, as now()).
    gives: str
    expected: Any = None


EXAMPLES: tuple[Example, ...] = (
    Example("coalesce(a, b, …)", "coalesce(nick, first_name)", {"nick": "", "first_name": "Ada"},
            "`Ada`: the first non-empty value", "Ada"),
    Example("default(v, d)", "nick | default('none')", {"nick": " "},
            "`none`: `d` when `v` is empty (Jinja's own: only when undefined)", "none"),
    Example("join(sep, a, b, …)", "join('.', first_name, last_name)", {"first_name": "Ada", "last_name": "Lovelace"},
            "`Ada.Lovelace` (empty values skipped)", "Ada.Lovelace"),
    Example("split(v, sep)", "split(groups, ';')", {"groups": "a; b"}, "`['a', 'b']`, parts trimmed", ["a", "b"]),
    Example("append(v, suffix)", "append(login, '@example.com')", {"login": "ada"},
            "`ada@example.com`; empty stays empty", "ada@example.com"),
    Example("lower(v)", "lower(email)", {"email": "Ada@Example.com"}, "`ada@example.com`", "ada@example.com"),
    Example("upper(v)", "upper(country)", {"country": "no"}, "`NO`", "NO"),
    Example("trim(v)", "trim(title)", {"title": "  Engineer "}, "`Engineer`", "Engineer"),
    Example("replace(v, old, new)", "replace(phone, '-', ' ')", {"phone": "555-0100"}, "`555 0100`", "555 0100"),
    Example("regex_replace(v, pattern, repl)", "regex_replace(phone, '[^0-9+]', '')", {"phone": "+1 (555) 01-00"},
            "`+15550100` (100 ms, 500-character pattern at most)", "+15550100"),
    Example("left(v, n)", "left(last_name, 3)", {"last_name": "Lovelace"}, "`Lov`", "Lov"),
    Example("mid(v, start, n)", "mid(last_name, 2, 3)", {"last_name": "Lovelace"},
            "`ove` (start counts from 1, as Entra's `Mid`)", "ove"),
    Example("strip_spaces(v)", "strip_spaces(first_name)", {"first_name": "Mary Ann"}, "`MaryAnn`", "MaryAnn"),
    Example("normalize_diacritics(v)", "lower(normalize_diacritics(join('.', first_name, last_name)))",
            {"first_name": "José", "last_name": "Müller"}, "`jose.muller`", "jose.muller"),
    Example("format_date(v, format)", "format_date(hired, '%d.%m.%Y')", {"hired": "01.03.2024"},
            "`2024-03-01T00:00:00Z` (SCIM dateTime, UTC)", "2024-03-01T00:00:00Z"),
    Example("switch(v, default, key, result, …)", "switch(country, 'Other', 'NO', 'Norway')", {"country": "NO"},
            "`Norway`", "Norway"),
    Example("lookup(v, table, default)", "lookup(department, 'cost_centers', 'CC-0')", {"department": "Sales"},
            "`CC-200`: the row of a table under the mapping's `tables:` key", "CC-200"),
    Example("is_present(v)", "is_present(phone)", {"phone": " "}, "`false`", False),
    Example("now()", "now()", {},
            "the time now as a SCIM dateTime: use it `when: create`, or every cycle updates every account"),
    Example("unique_username(candidates, suffix)", "unique_username(strip_spaces(normalize_diacritics(lower("
            "join('.', first_name, last_name)))), '@example.com')", {"first_name": "Jane", "last_name": "Doe"},
            "`jane.doe@example.com` (José van Dijk: `jose.vandijk@…`), or `jane.doe2@example.com`, `jane.doe3@…` when another account of the target "
            "holds it; chosen on create, never changed (a list of candidates is tried in order first)"),
)  # fmt: skip


def markdown_table() -> str:
    """The README's table of functions, from :data:`EXAMPLES`."""
    lines = ["| function | example | gives |", "|---|---|---|"]
    for example in EXAMPLES:
        expression = example.expression.replace("|", "\\|")
        lines.append(f"| `{example.signature}` | `{expression}` | {example.gives} |")
    return "\n".join(lines) + "\n"


def library(tables: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Callable[..., Any]], dict[str, Callable[..., Any]]]:
    """(globals, filters) for one mapping's environment; ``tables`` are its ``tables:`` key."""

    def lookup(value: Any, table: str, fallback: Any = None) -> Any:
        """The row of ``table`` whose key is ``value`` (as text), else ``fallback``."""
        if table not in tables:
            raise KeyError(f"the mapping has no table '{table}' (tables: {', '.join(sorted(tables)) or 'none'})")
        return tables[table].get(str(value), fallback) if not is_empty(value) else fallback

    functions: dict[str, Callable[..., Any]] = {
        "coalesce": coalesce, "default": default, "join": join, "split": split, "append": append,
        "lower": lower, "upper": upper, "trim": trim, "replace": replace, "regex_replace": regex_replace,
        "left": left, "mid": mid, "strip_spaces": strip_spaces, "normalize_diacritics": normalize_diacritics,
        "format_date": format_date, "switch": switch, "lookup": lookup, "is_present": is_present, "now": now,
        "unique_username": unique_username,
    }  # fmt: skip
    # As filters, only where Jinja has none of that name or ours reads the same way (value first).
    filters = {name: functions[name] for name in (
        "default", "split", "append", "regex_replace", "left", "mid", "strip_spaces", "normalize_diacritics",
        "format_date", "lookup", "is_present",
    )}  # fmt: skip
    return functions, filters
