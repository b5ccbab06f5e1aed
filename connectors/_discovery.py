"""What a target declares about its resources: ``/ResourceTypes`` and ``/Schemas`` (RFC 7643 §6, §7), parsed.

Pure parsing, no I/O: :meth:`connectors.ScimClient.resource_types` and
:meth:`~connectors.ScimClient.schemas` fetch the bodies. Targets answer these
endpoints in several shapes (a ListResponse, a bare JSON array, one object);
all are read. An item that is not a resource type or a schema is skipped with
a warning, not fatal: discovery informs, it does not gate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from connectors._errors import InvalidResponse

log = logging.getLogger("connectors")


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One resource type (RFC 7643 §6): ``endpoint`` without its leading ``/`` (``"Users"``).

    ``extensions`` holds ``(schema URN, required)`` pairs from ``schemaExtensions``.
    """

    name: str
    endpoint: str
    schema: str
    extensions: tuple[tuple[str, bool], ...] = ()

    def supports(self, schema: str) -> bool:
        """Whether ``schema`` (a URN, compared without case) is this type's core schema or one of its extensions."""
        folded = schema.casefold()
        return folded == self.schema.casefold() or any(folded == urn.casefold() for urn, _ in self.extensions)


@dataclass(frozen=True, slots=True)
class AttributeInfo:
    """One attribute's characteristics (RFC 7643 §7); a characteristic left out has §2.2's default.

    ``mutability``: readOnly | readWrite | immutable | writeOnly; ``returned``: always | never |
    default | request; ``uniqueness``: none | server | global.
    """

    name: str
    type: str = "string"
    multi_valued: bool = False
    required: bool = False
    case_exact: bool = False
    mutability: str = "readWrite"
    returned: str = "default"
    uniqueness: str = "none"
    sub_attributes: tuple[AttributeInfo, ...] = ()

    def sub_attribute(self, name: str) -> AttributeInfo | None:
        """The sub-attribute called ``name`` (compared without case, RFC 7643 §2.1), if declared."""
        return _named(self.sub_attributes, name)


@dataclass(frozen=True, slots=True)
class Schema:
    """One schema (RFC 7643 §7): its URN ``id`` and its top-level attributes."""

    id: str
    name: str | None = None
    attributes: tuple[AttributeInfo, ...] = ()

    def attribute(self, path: str) -> AttributeInfo | None:
        """The attribute at ``name`` or ``name.sub`` (compared without case), if declared."""
        name, _, sub = path.partition(".")
        found = _named(self.attributes, name)
        if found is None or not sub:
            return found
        return found.sub_attribute(sub)


def _named(attributes: Iterable[AttributeInfo], name: str) -> AttributeInfo | None:
    folded = name.casefold()
    return next((a for a in attributes if a.name.casefold() == folded), None)


def discovery_items(body: Any, what: str) -> list[dict[str, Any]]:
    """The items of a discovery answer: a ListResponse's ``Resources``, a bare array, or one object.

    Raises :class:`InvalidResponse` for an answer that is none of these.
    """
    if isinstance(body, dict) and "Resources" in body:
        body = body["Resources"]
    elif isinstance(body, dict) and body.get("totalResults") == 0:
        return []
    elif isinstance(body, dict) and any(key in body for key in ("endpoint", "attributes")):
        body = [body]
    if not isinstance(body, list):
        raise InvalidResponse(f"GET /{what} answered with something that is not a list of {what}")
    items = [item for item in body if isinstance(item, dict)]
    if len(items) < len(body):
        log.warning("GET /%s: %d items that are not objects skipped", what, len(body) - len(items))
    return items


def parse_resource_types(items: Iterable[dict[str, Any]]) -> dict[str, ResourceType]:
    """Resource types by endpoint (``"Users"``); an item without ``endpoint`` or ``schema`` is skipped."""
    found: dict[str, ResourceType] = {}
    for item in items:
        endpoint, schema = item.get("endpoint"), item.get("schema")
        if not isinstance(endpoint, str) or not endpoint.strip("/") or not isinstance(schema, str):
            log.warning("GET /ResourceTypes: an item without endpoint or schema skipped")
            continue
        extensions = tuple(
            (str(extension["schema"]), extension.get("required") is True)
            for extension in item.get("schemaExtensions") or []
            if isinstance(extension, dict) and isinstance(extension.get("schema"), str)
        )
        endpoint = endpoint.rstrip("/").rsplit("/", 1)[-1]
        name = item.get("name") if isinstance(item.get("name"), str) else endpoint
        found[endpoint] = ResourceType(name=name, endpoint=endpoint, schema=schema, extensions=extensions)
    return found


def parse_schemas(items: Iterable[dict[str, Any]]) -> dict[str, Schema]:
    """Schemas by URN; an item without a string ``id`` is skipped, attributes without a name too."""
    found: dict[str, Schema] = {}
    for item in items:
        urn = item.get("id")
        if not isinstance(urn, str) or not urn:
            log.warning("GET /Schemas: an item without id skipped")
            continue
        name = item.get("name")
        found[urn] = Schema(id=urn, name=name if isinstance(name, str) else None,
                            attributes=_attributes(item.get("attributes")))  # fmt: skip
    return found


def _attributes(raw: Any) -> tuple[AttributeInfo, ...]:
    if not isinstance(raw, list):
        return ()
    return tuple(_attribute(item) for item in raw if isinstance(item, dict) and isinstance(item.get("name"), str))


def _attribute(item: dict[str, Any]) -> AttributeInfo:
    def text(key: str, default: str) -> str:
        value = item.get(key)
        return value if isinstance(value, str) and value else default

    def flag(key: str) -> bool:
        return item.get(key) is True

    return AttributeInfo(
        name=item["name"],
        type=text("type", "string"),
        multi_valued=flag("multiValued"),
        required=flag("required"),
        case_exact=flag("caseExact"),
        mutability=text("mutability", "readWrite"),
        returned=text("returned", "default"),
        uniqueness=text("uniqueness", "none"),
        sub_attributes=_attributes(item.get("subAttributes")),
    )
