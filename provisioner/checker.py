"""``provisioner check``: every mistake that would break a target's records, before anything is sent.

Each mistake is one :class:`~provisioner.mapping.Diagnostic`,
``file:line:column: what is wrong``, listed in file order; all of them, not
the first. What is checked, for each target:

- the mapping against the target's schemas (its ``/Schemas`` and
  ``/ResourceTypes`` when given, else RFC 7643's User and enterprise
  schemas): unknown attributes and sub-attributes, read-only ones, required
  ones missing, extensions the target does not declare, two primaries;
- expressions that do not compile, unknown functions, filters and tests;
- every column the mapping reads, bare or inside an expression, against the
  source's columns (a CSV header, a SQL query's result columns, a SCIM
  server's schemas) or, when it cannot say, the keys of its first records;
- the first :data:`SAMPLE_RECORDS` records of the source, rendered: a value
  that fails on every one of them fails on the whole population.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from connectors import Schema
from provisioner.config import Config
from provisioner.errors import ConfigError, SourceError
from provisioner.groups import load_groups
from provisioner.mapping import AttributeMapping, Diagnostic, compile_mapping
from provisioner.sources import IdentityRecord, first_records, source_columns

# Records of the source rendered to find values that fail on all of them.
SAMPLE_RECORDS = 100


def check_target(
    config: Config,
    name: str,
    *,
    schemas: Mapping[str, Schema] | None = None,
    extensions: Iterable[str] | None = None,
) -> list[Diagnostic]:
    """Every mistake in target ``name``'s mapping and groups, in file order (empty: nothing found).

    ``schemas`` and ``extensions`` as :func:`~provisioner.mapping.compile_mapping`.
    A source that cannot be read is one diagnostic naming it.
    """
    target = config.targets[name]
    found: list[Diagnostic] = []
    try:
        mapping, diagnostics = compile_mapping(target.mapping, schemas, extensions)
    except ConfigError as exc:  # the YAML itself: nothing after the error can be read
        return [_from_error(exc)]
    found += diagnostics
    if target.groups is not None:
        try:
            load_groups(target.groups)
        except ConfigError as exc:
            found.append(_from_error(exc))
    if mapping is not None:
        source = config.sources[target.source]
        try:
            columns = source_columns(source)
            sample = [r for r in first_records(source, SAMPLE_RECORDS) if isinstance(r, IdentityRecord)]
        except SourceError as exc:
            found.append(_from_error(exc))
        else:
            found += _unknown_columns(mapping, columns, sample, source.describe())
            # A value already said to be wrong is not said again as "fails on every record".
            broken = {d.sort_key[:2] for d in found}
            found += [d for d in _failing_everywhere(mapping, sample) if d.sort_key[:2] not in broken]
    return sorted(found, key=lambda d: d.sort_key)


def _unknown_columns(
    mapping: AttributeMapping, columns: set[str] | None, sample: list[IdentityRecord], source: str
) -> list[Diagnostic]:
    if columns is None:  # JSON Lines: no header; the keys its first records have
        if not sample:
            return []
        columns = {key for record in sample for key in record.attributes}
        absent = f"none of the first {len(sample)} records of {source} has"
    else:
        absent = f"{source} has no column"
    found = []
    for name, where in mapping.names:
        if name not in columns:
            close = difflib.get_close_matches(name, sorted(columns), n=1)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
            elif name in mapping.columns:
                hint = f"; for the text itself, quote it: \"'{name}'\""
            else:
                hint = ""
            found.append(Diagnostic(where, f"{absent} '{name}'{hint}"))
    return list(dict.fromkeys(found))


def _failing_everywhere(mapping: AttributeMapping, sample: list[IdentityRecord]) -> list[Diagnostic]:
    """A value that fails on every sampled record that renders; the first record's reason as example."""
    rendered = 0
    failures: dict[tuple[str, str], tuple[int, str]] = {}
    for record in sample:
        problems = mapping.problems(record.attributes)
        if problems is None:
            continue
        rendered += 1
        for spot, reason in problems.items():
            count, first = failures.get(spot, (0, f"{record.origin}: {reason}"))
            failures[spot] = (count + 1, first)
    return [
        Diagnostic(where, f"attribute '{path}': fails on all {rendered} records tried, e.g. {first}")
        for (where, path), (count, first) in failures.items()
        if count == rendered and rendered
    ]


def _from_error(exc: Exception) -> Diagnostic:
    """A ConfigError or SourceError's ``file:line[:column]: message`` as a diagnostic."""
    text = str(exc)
    head, sep, message = text.partition(": ")
    return Diagnostic(head, message) if sep else Diagnostic(text, "")
