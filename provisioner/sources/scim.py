"""SCIM sources: users pulled from an HR system's SCIM 2.0 endpoint, page by page.

The HR system is reached like a target (:class:`provisioner.targets.TargetSession`:
the same auth, TLS, retry policy and rate limit) and read with
:meth:`connectors.ScimClient.iter_resources`, which checks the server's paging
rather than believing it (RFC 7644 §3.4.2.4). ``filter`` is sent as written
(RFC 7644 §3.4.2.2), e.g. ``meta.lastModified gt "2026-01-01T00:00:00Z"``;
``attributes`` asks for those only (§3.4.2.5).

A resource becomes a record whose columns a mapping names like a JSON Lines
object's:

- core attributes by their SCIM names, nested as sent: ``userName``,
  ``name.givenName``, ``meta.lastModified``, ``emails`` (the list);
- each schema extension's attributes by their short name — ``employeeNumber``,
  ``department``, ``manager.value`` for the enterprise extension (RFC 7643 §4.3) —
  unless a core attribute has that name; the extension's object stays under its URN;
- for each multi-valued attribute (RFC 7643 §2.4), ``<attribute>_primary``: the
  ``value`` of the item marked primary, else of the first item; and
  ``<attribute>_<type>``: the value of the first item of that type —
  ``emails_work``, ``phoneNumbers_mobile``; items without ``value`` (addresses)
  give the whole item: ``addresses_work.locality``.

A record's origin is the resource's URL (``https://hr.example.com/scim/v2/Users/2819c223``).
"""

from __future__ import annotations

import asyncio
import queue
import re
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from connectors import ScimError
from provisioner import redaction
from provisioner.config import ScimSourceConfig
from provisioner.errors import SourceError
from provisioner.sources._records import BadRecord, IdentityRecord, checked
from provisioner.targets import TargetSession

# RFC 7643 §4.1.2's canonical types of the core User's multi-valued attributes: the typed
# columns `check` knows before reading a record (any other type works, but is not known beforehand).
CANONICAL_TYPES: dict[str, tuple[str, ...]] = {
    "emails": ("work", "home", "other"),
    "phoneNumbers": ("work", "home", "mobile", "fax", "pager", "other"),
    "ims": ("aim", "gtalk", "icq", "xmpp", "msn", "skype", "qq", "yahoo"),
    "photos": ("photo", "thumbnail"),
    "addresses": ("work", "home", "other"),
}
# RFC 7643 §3.1: attributes of every resource, which a server's /Schemas need not list.
_COMMON = ("id", "externalId", "meta", "schemas")
_SAFE = re.compile(r"[^A-Za-z0-9_]")
# Pages handed from the reading thread to the consumer before the reader waits.
_PAGES_AHEAD = 4


def read_scim(config: ScimSourceConfig) -> Iterator[IdentityRecord | BadRecord]:
    """Stream the endpoint's resources as records; SourceError when the server cannot be read to the end."""
    where = config.describe()
    for resource in _pulled(config):
        origin = f"{where}/{resource.get('id')}"
        yield checked(config.key, flatten(resource), origin)


def flatten(resource: dict[str, Any]) -> dict[str, Any]:
    """A SCIM resource as a record's columns (see the module docstring)."""
    columns: dict[str, Any] = {}
    extensions: list[dict[str, Any]] = []
    for name, value in resource.items():
        columns[name] = value
        if name.lower().startswith("urn:") and isinstance(value, dict):
            extensions.append(value)
    for extension in extensions:
        for name, value in extension.items():
            columns.setdefault(name, value)
    for name, value in list(columns.items()):
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            primary = next((item for item in value if item.get("primary") is True), value[0])
            columns.setdefault(f"{name}_primary", _item_value(primary))
            for item in value:
                kind = item.get("type")
                if isinstance(kind, str) and kind:
                    columns.setdefault(f"{name}_{_SAFE.sub('_', kind)}", _item_value(item))
    return columns


def scim_columns(config: ScimSourceConfig) -> set[str] | None:
    """The columns records of this endpoint can have, from the server's ``/Schemas`` and ``/ResourceTypes``.

    None when the server does not publish its schemas (RFC 7643 §7 is optional);
    SourceError when it cannot be reached.
    """
    schemas, types = _run(_discover(config), config.describe())
    if not schemas:
        return None
    endpoint = config.endpoint.strip("/")
    resource_type = types.get(endpoint)
    if resource_type is not None:
        core = [resource_type.schema]
        extensions = [urn for urn, _required in resource_type.extensions]
    else:
        core = [urn for urn in schemas if ":core:" in urn and urn.endswith(":User")][:1]
        extensions = [urn for urn in schemas if ":extension:" in urn]
    columns: set[str] = set(_COMMON)
    by_urn = {urn.casefold(): schema for urn, schema in schemas.items()}
    for urn in core + extensions:
        schema = by_urn.get(urn.casefold())
        if schema is None:
            continue
        if urn in extensions:
            columns.add(urn)
        for attribute in schema.attributes:
            if urn in extensions and attribute.name in columns:
                continue  # a core attribute of that name wins
            columns.add(attribute.name)
            if attribute.multi_valued and attribute.sub_attributes:
                columns.add(f"{attribute.name}_primary")
                columns.update(f"{attribute.name}_{kind}" for kind in CANONICAL_TYPES.get(attribute.name, ()))
    return columns


def _item_value(item: dict[str, Any]) -> Any:
    return item["value"] if "value" in item else item


def _pulled(config: ScimSourceConfig) -> Iterator[dict[str, Any]]:
    """The endpoint's resources, read by a thread of their own and handed over a page at a time.

    The engine reads sources from plain functions, sometimes inside a running
    event loop (the daemon): the client's loop runs in its own thread, and a
    bounded queue keeps at most a few pages in memory.
    """
    pages: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=_PAGES_AHEAD)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                pages.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    async def pump() -> None:
        page: list[dict[str, Any]] = []
        async for resource in _resources(config):
            page.append(resource)
            if len(page) >= config.page_size:
                if not put(("page", page)):
                    return
                page = []
        put(("page", page))

    def run() -> None:
        try:
            asyncio.run(pump())
        except BaseException as exc:  # handed to the consumer, raised there
            put(("error", exc))
        else:
            put(("done", None))

    reader = threading.Thread(target=run, name="scim-source", daemon=True)
    reader.start()
    try:
        while True:
            kind, item = pages.get()
            if kind == "done":
                return
            if kind == "error":
                raise _source_error(item, config.describe())
            yield from item
    finally:
        stop.set()
        reader.join()


async def _resources(config: ScimSourceConfig) -> AsyncIterator[dict[str, Any]]:
    session = TargetSession(config)
    client = session.client()
    try:
        async for resource in client.iter_resources(
            config.endpoint.strip("/"), filter=config.filter, attributes=config.attributes, page_size=config.page_size
        ):
            yield resource
    finally:
        await client.aclose()
        await session.aclose()


async def _discover(config: ScimSourceConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    session = TargetSession(config)
    client = session.client()
    try:
        return await client.schemas(), await client.resource_types()
    finally:
        await client.aclose()
        await session.aclose()


def _run(coroutine: Any, where: str) -> Any:
    """Run a coroutine to its end in a thread of its own (the caller may be inside an event loop)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="scim-source", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise _source_error(outcome["error"], where)
    return outcome["value"]


def _source_error(exc: BaseException, where: str) -> BaseException:
    if isinstance(exc, ScimError):
        return SourceError(f"{where}: {redaction.redact(str(exc))}")
    if isinstance(exc, (ValueError, OSError)):
        return SourceError(f"{where}: {redaction.redact(str(exc)) or type(exc).__name__}")
    return exc
