"""``provisioner probe``: what a SCIM target really does, and the ``quirks:`` block that suits it.

Read-only by default: discovery (``/ServiceProviderConfig``, ``/ResourceTypes``,
``/Schemas``, RFC 7644 §4), a filter that must match nothing and one that must
match one existing account (RFC 7644 §3.4.2.2), paging with and without
``count`` (§3.4.2.4). With ``--write`` it also creates a clearly named test user
(``provisioner-probe-<random>``), a second user and groups, exercises every
request form the engine sends (create, duplicate create, PUT, each PATCH form,
``If-Match``, group create with and without members, member add and remove by
``members[value eq …]`` path, by value list and by PUT, the enterprise
extension, a ``userName`` rename, delete), reads each write back, and deletes
everything it made, also when interrupted.

Each answer is a claim: a write is judged by reading the resource back, never
by its status alone. The probe sends each request once (no retries), so what
it prints is what the target answered.

Output: one line per behaviour (``ok``, ``DEVIATES``, ``unknown``); with
``--suggest`` only the YAML ``quirks:`` block (field names of
:class:`connectors.Quirks`, non-default values only); with ``--json`` one JSON
object. Deviations that no quirk covers (an unsupported extension, a dropped
attribute, an immutable ``userName``) are reported as observations.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from connectors import (
    SCHEMA_PATCH_OP,
    AuthError,
    Quirks,
    RetryPolicy,
    ScimClient,
    ScimError,
    ScimRequest,
    InvalidResponse,
    ScimResult,
    equals_filter,
)
from provisioner.config import load_config
from provisioner.errors import UserError
from provisioner.lifecycle import EXIT_NOT_OK, EXIT_OK
from provisioner.targets import TargetSession

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PREFIX = "provisioner-probe-"

OK, DEVIATES, UNKNOWN = "ok", "DEVIATES", "unknown"


@dataclass(slots=True)
class Observation:
    """One behaviour of the target: what was tried, what happened, and the quirk it calls for."""

    behaviour: str
    outcome: str  # ok | DEVIATES | unknown
    detail: str
    quirk: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.outcome:<9} {self.behaviour}: {self.detail}"


@dataclass(slots=True)
class ProbeReport:
    """Everything observed on one target, in order."""

    target: str
    base_url: str
    write: bool
    observations: list[Observation] = field(default_factory=list)
    cleanup: list[str] = field(default_factory=list)

    def observe(self, behaviour: str, outcome: str, detail: str, **quirk: Any) -> Observation:
        observation = Observation(behaviour, outcome, detail, quirk)
        self.observations.append(observation)
        return observation

    def quirks(self) -> dict[str, Any]:
        """The suggested ``quirks:`` block: non-default :class:`connectors.Quirks` values only, by name."""
        defaults = Quirks().as_dict()
        suggested: dict[str, Any] = {}
        for observation in self.observations:
            for name, value in observation.quirk.items():
                if name not in defaults:
                    raise AssertionError(f"probe suggests an unknown quirk {name!r}")  # pragma: no cover
                if value != defaults[name]:
                    suggested[name] = value
        return dict(sorted(suggested.items()))

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "base_url": self.base_url,
            "write": self.write,
            "observations": [asdict(o) for o in self.observations],
            "quirks": self.quirks(),
            "cleanup": self.cleanup,
        }


def suggestion_yaml(quirks: dict[str, Any]) -> str:
    """The ``quirks:`` block to paste under the target in config.yaml (``quirks: {}`` when none is needed)."""
    return yaml.safe_dump({"quirks": quirks}, sort_keys=True, default_flow_style=False)


def _failure(exc: ScimError) -> str:
    parts = [str(exc.status) if exc.status else type(exc).__name__]
    if exc.scim_type:
        parts.append(f"scimType={exc.scim_type}")
    return " ".join(parts)


def _members(resource: dict[str, Any] | None) -> list[str] | None:
    """The member values a group resource lists, or None when it carries no ``members`` at all."""
    if resource is None or "members" not in resource:
        return None
    return sorted(str(m.get("value")) for m in resource.get("members") or [] if isinstance(m, dict))


class Probe:
    """One run of the probe against one target (``client`` sends each request once, no retries)."""

    def __init__(self, client: ScimClient, report: ProbeReport) -> None:
        self.client = client
        self.report = report
        self.tag = secrets.token_hex(4)
        self.page_count = True
        self.made: list[tuple[str, str]] = []  # (endpoint, id) of everything created, to delete
        self.names: list[tuple[str, str, str]] = []  # (endpoint, attribute, value) asked to be created
        self.member_value = "id"
        self.members_returned: bool | None = None
        self.put = True
        self.users_exist = False
        self.etag_announced: bool | None = None
        self.silent_failures: set[str] = set()  # member-removal forms answered with success that did nothing

    # -- plumbing -------------------------------------------------------------------------------

    async def send(self, method: str, path: str, body: Any = None, **params: Any) -> ScimResult:
        if "count" in params and not self.page_count:
            del params["count"]
        if body is not None and method == "PATCH":
            body = {"schemas": [SCHEMA_PATCH_OP], "Operations": body}
        return await self.client.send(ScimRequest(method, path, body=body, params=params or None))

    async def attempt(self, method: str, path: str, body: Any = None, **params: Any) -> ScimResult | ScimError:
        """The answer, or the error a failure raised (an answer too: the probe reports it)."""
        try:
            return await self.send(method, path, body, **params)
        except AuthError:
            raise
        except ScimError as exc:
            if exc.status is None and not isinstance(exc, InvalidResponse):
                raise  # no answer at all (connection refused, timeout): nothing to observe
            return exc

    async def read(self, endpoint: str, resource_id: str) -> dict[str, Any] | None:
        answer = await self.attempt("GET", f"{endpoint}/{resource_id}")
        return answer.resource if isinstance(answer, ScimResult) else None

    async def create(self, endpoint: str, body: dict[str, Any], key: str) -> ScimResult | ScimError:
        self.names.append((endpoint, key, str(body[key])))
        answer = await self.attempt("POST", endpoint, body)
        if isinstance(answer, ScimResult) and answer.id:
            self.made.append((endpoint, answer.id))
        return answer

    # -- read-only ------------------------------------------------------------------------------

    async def discover(self) -> None:
        report = self.report
        config = await self.attempt("GET", "ServiceProviderConfig")
        if isinstance(config, ScimResult) and config.resource:
            body = config.resource
            supported = {
                name: bool((body.get(name) or {}).get("supported"))
                for name in ("patch", "filter", "etag", "bulk", "sort", "changePassword")
                if isinstance(body.get(name), dict)
            }
            self.etag_announced = supported.get("etag")
            said = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in supported.items()) or "nothing"
            report.observe("discovery.service_provider_config", OK, f"announces {said}")
        else:
            report.observe("discovery.service_provider_config", DEVIATES, f"not served ({_answer(config)})")
        types = await self.attempt("GET", "ResourceTypes")
        if isinstance(types, ScimResult) and isinstance((types.resource or {}).get("Resources"), list):
            resources = types.resource["Resources"]
            user = next((t for t in resources if isinstance(t, dict) and t.get("endpoint") == "/Users"), None)
            extensions = [e.get("schema") for e in (user or {}).get("schemaExtensions") or [] if isinstance(e, dict)]
            if ENTERPRISE in extensions:
                report.observe("discovery.resource_types", OK, "User declares the enterprise extension")
            else:
                report.observe(
                    "discovery.resource_types",
                    DEVIATES,
                    "User declares no enterprise extension: enterprise attributes may be refused or dropped",
                )
        else:
            report.observe("discovery.resource_types", UNKNOWN, f"/ResourceTypes not served ({_answer(types)})")
        schemas = await self.attempt("GET", "Schemas")
        if isinstance(schemas, ScimResult) and isinstance((schemas.resource or {}).get("Resources"), list):
            ids = [s.get("id") for s in schemas.resource["Resources"] if isinstance(s, dict)]
            user = next(
                (s for s in schemas.resource["Resources"] if isinstance(s, dict) and s.get("id") == USER_SCHEMA), {}
            )
            user_name = next((a for a in user.get("attributes") or [] if a.get("name") == "userName"), {})
            traits = ", ".join(
                f"{k}={user_name[k]}" for k in ("mutability", "caseExact", "uniqueness") if k in user_name
            )
            report.observe("discovery.schemas", OK, f"{len(ids)} schemas; userName {traits or 'not described'}")
        else:
            report.observe("discovery.schemas", UNKNOWN, f"/Schemas not served ({_answer(schemas)})")

    async def paging(self) -> dict[str, Any] | None:
        """Page with and without ``count``; return one existing user, if any, for the lookup test."""
        report = self.report
        counted = await self.attempt("GET", "Users", startIndex=1, count=2)
        plain = await self.attempt("GET", "Users", startIndex=1)
        if isinstance(counted, ScimResult):
            page = (counted.resource or {}).get("Resources") or []
            if len(page) > 2:
                report.observe("paging.count", DEVIATES, f"count=2 answered {len(page)} resources")
            else:
                report.observe("paging.count", OK, "count= accepted")
        elif isinstance(plain, ScimResult):
            self.page_count = False
            report.observe(
                "paging.count", DEVIATES, f"count= answered {_answer(counted)}, accepted without it", page_count=False
            )
        else:
            report.observe("paging.count", UNKNOWN, f"listing /Users failed: {_answer(counted)}, {_answer(plain)}")
            return None
        source = counted if isinstance(counted, ScimResult) else plain
        assert isinstance(source, ScimResult)
        body = source.resource or {}
        if "totalResults" not in body:
            report.observe("paging.total_results", DEVIATES, "a ListResponse without totalResults")
        resources = [r for r in body.get("Resources") or [] if isinstance(r, dict) and r.get("userName")]
        self.users_exist = bool(resources)
        return resources[0] if resources else None

    async def lookup(self, endpoint: str, attribute: str, value: str) -> list[dict[str, Any]] | ScimError:
        answer = await self.attempt("GET", endpoint, filter=equals_filter(attribute, value), startIndex=1, count=10)
        if isinstance(answer, ScimError):
            return answer
        return [r for r in (answer.resource or {}).get("Resources") or [] if isinstance(r, dict)]

    async def filters(self, existing: dict[str, Any] | None) -> None:
        report = self.report
        nobody = f"{PREFIX}nobody-{secrets.token_hex(6)}"
        for endpoint, attribute in (("Users", "userName"), ("Groups", "displayName")):
            found = await self.lookup(endpoint, attribute, nobody)
            behaviour = f"filter.{endpoint.lower()}_no_match"
            if isinstance(found, ScimError):
                report.observe(behaviour, DEVIATES, f"filter refused: {_failure(found)}", filter="client")
            elif found:
                report.observe(
                    behaviour,
                    DEVIATES,
                    f"a {attribute} that matches nothing answered {len(found)} resources: filter ignored",
                    filter="client",
                )
            elif endpoint == "Users" and not self.users_exist:
                report.observe(behaviour, UNKNOWN, "found nothing, but there is no account at all (run with --write)")
            else:
                report.observe(behaviour, OK, f"a {attribute} that matches nothing found nothing")
        if existing is None:
            report.observe("filter.users_match", UNKNOWN, "no account to look up (run with --write)")
            return
        await self.exact_lookup(existing)

    async def exact_lookup(self, user: dict[str, Any]) -> None:
        report = self.report
        found = await self.lookup("Users", "userName", str(user["userName"]))
        if isinstance(found, ScimError):
            report.observe("filter.users_match", DEVIATES, f"filter refused: {_failure(found)}", filter="client")
            return
        ids = [str(r.get("id")) for r in found]
        if ids == [str(user["id"])]:
            report.observe("filter.users_match", OK, "userName eq an existing account found exactly it")
        elif str(user["id"]) not in ids:
            report.observe(
                "filter.users_match",
                DEVIATES,
                f"userName eq an existing account did not find it ({len(ids)} results)",
                filter="client",
            )
        else:
            report.observe(
                "filter.users_match",
                DEVIATES,
                f"userName eq an existing account found {len(ids)} results",
                filter="client",
            )
        upper = await self.lookup("Users", "userName", str(user["userName"]).upper())
        if isinstance(upper, list) and str(user["id"]) in [str(r.get("id")) for r in upper]:
            report.observe("filter.case", OK, "userName compared case-insensitively (RFC 7643 §4.1.1)")
        else:
            report.observe("filter.case", DEVIATES, "userName compared case-sensitively by the filter")

    # -- writes ---------------------------------------------------------------------------------

    def user_body(self, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "schemas": [USER_SCHEMA],
            "userName": name,
            "name": {"givenName": "Probe", "familyName": "Provisioner"},
            "displayName": f"Provisioner probe {self.tag}",
            "emails": [{"value": f"{name}@example.invalid", "type": "work", "primary": True}],
            "title": "Probe title",
            "active": True,
            **extra,
        }

    async def writes(self) -> None:
        report = self.report
        name = f"{PREFIX}{self.tag}"
        created = await self.create("Users", self.user_body(name), "userName")
        if not isinstance(created, ScimResult) or not created.id:
            report.observe("user.create", DEVIATES, f"POST /Users answered {_answer(created)}; nothing more to try")
            return
        user_id = created.id
        stored = await self.read("Users", user_id) or {}
        report.observe("user.create", OK, f"POST /Users answered {created.status}")
        if stored.get("title") == "Probe title":
            report.observe("attribute.title", OK, "title stored")
        else:
            where = "in the answer, " if (created.resource or {}).get("title") else ""
            report.observe("attribute.title", DEVIATES, f"title accepted {where}but not stored", verify_writes=True)
        await self.duplicate(name)
        second = await self.create("Users", self.user_body(f"{name}-2"), "userName")
        other_id = second.id if isinstance(second, ScimResult) else None
        self.users_exist = True
        await self.replace(user_id, name)
        user_names = {user_id: name}
        if other_id:
            user_names[other_id] = f"{name}-2"
            await self.groups(user_id, other_id, user_names)
        else:
            report.observe("group.members", UNKNOWN, f"a second user could not be created: {_answer(second)}")
        # Now that accounts and groups exist, a filter ignored shows: it answers them all.
        await self.filters({"id": user_id, "userName": name})
        await self.patch_user(user_id)
        await self.if_match(user_id)
        await self.extension(name)
        await self.rename(user_id, name)

    async def duplicate(self, name: str) -> None:
        answer = await self.create("Users", self.user_body(name), "userName")
        if isinstance(answer, ScimError) and answer.status == 409:
            self.report.observe(
                "user.duplicate", OK, f"a second POST of the userName answered 409 {answer.scim_type or ''}".strip()
            )
        elif isinstance(answer, ScimResult):
            self.report.observe(
                "user.duplicate", DEVIATES, f"a second POST of the userName created another account ({answer.status})"
            )
        else:
            self.report.observe(
                "user.duplicate", DEVIATES, f"a second POST of the userName answered {_answer(answer)}, not 409"
            )

    async def replace(self, user_id: str, name: str) -> None:
        answer = await self.attempt(
            "PUT", f"Users/{user_id}", {**self.user_body(name), "id": user_id, "displayName": "Probe PUT"}
        )
        if isinstance(answer, ScimError):
            if answer.status in (404, 405, 501):
                self.put = False
                self.report.observe("user.put", DEVIATES, f"PUT answered {_failure(answer)}: use PATCH", put=False)
            else:
                self.report.observe("user.put", DEVIATES, f"PUT answered {_failure(answer)}")
            return
        stored = await self.read("Users", user_id) or {}
        if stored.get("displayName") == "Probe PUT":
            self.report.observe("user.put", OK, f"PUT answered {answer.status}, stored")
        else:
            self.report.observe(
                "user.put", DEVIATES, f"PUT answered {answer.status} but did not store", verify_writes=True
            )

    async def patch_user(self, user_id: str) -> None:
        operations = [
            {"op": "replace", "path": "name.givenName", "value": "Patched"},
            {"op": "replace", "path": "active", "value": False},
        ]
        answer = await self.attempt("PATCH", f"Users/{user_id}", operations)
        if isinstance(answer, ScimError):
            self.report.observe("user.patch", DEVIATES, f"PATCH replace path answered {_failure(answer)}")
            return
        stored = await self.read("Users", user_id) or {}
        if (stored.get("name") or {}).get("givenName") == "Patched" and stored.get("active") is False:
            self.report.observe(
                "user.patch", OK, f"PATCH replace name.givenName, active answered {answer.status}, stored"
            )
        else:
            self.report.observe(
                "user.patch", DEVIATES, f"PATCH answered {answer.status} but did not store", verify_writes=True
            )

    async def if_match(self, user_id: str) -> None:
        current = await self.attempt("GET", f"Users/{user_id}")
        etag = current.etag if isinstance(current, ScimResult) else None
        if not etag:
            self.report.observe("user.if_match", OK, "no ETag given: If-Match is not used")
            return
        if self.etag_announced is False:
            # use_etags: auto believes /ServiceProviderConfig: no If-Match is sent to this target.
            self.report.observe("user.if_match", OK, "ETag headers, but etag not announced: If-Match is not sent")
            return
        operation = [{"op": "replace", "path": "displayName", "value": "Probe If-Match"}]
        stale = await _with_if_match(self, f"Users/{user_id}", operation, 'W/"provisioner-probe-stale"')
        fresh = await _with_if_match(self, f"Users/{user_id}", operation, etag)
        if isinstance(stale, ScimError) and stale.status == 412 and isinstance(fresh, ScimResult):
            self.report.observe("user.if_match", OK, "a stale If-Match answered 412, the current one succeeded")
        else:
            self.report.observe(
                "user.if_match", DEVIATES, f"If-Match stale answered {_answer(stale)}, current {_answer(fresh)}"
            )

    async def extension(self, name: str) -> None:
        body = self.user_body(f"{name}-ext", **{ENTERPRISE: {"department": "Probe department"}})
        body["schemas"] = [USER_SCHEMA, ENTERPRISE]
        answer = await self.create("Users", body, "userName")
        if isinstance(answer, ScimError):
            self.report.observe(
                "attribute.enterprise", DEVIATES, f"a create with the enterprise extension answered {_failure(answer)}"
            )
            return
        stored = (await self.read("Users", answer.id or "") or {}).get(ENTERPRISE) or {}
        if stored.get("department") == "Probe department":
            self.report.observe("attribute.enterprise", OK, "enterprise extension accepted and stored")
        else:
            self.report.observe(
                "attribute.enterprise", DEVIATES, "enterprise extension accepted but not stored", verify_writes=True
            )

    async def rename(self, user_id: str, name: str) -> None:
        answer = await self.attempt(
            "PATCH", f"Users/{user_id}", [{"op": "replace", "path": "userName", "value": f"{name}-renamed"}]
        )
        if isinstance(answer, ScimError):
            self.report.observe(
                "user.rename", DEVIATES, f"a userName rename answered {_failure(answer)}: userName is immutable here"
            )
            return
        stored = await self.read("Users", user_id) or {}
        if stored.get("userName") == f"{name}-renamed":
            self.report.observe("user.rename", OK, f"a userName rename by PATCH answered {answer.status}, stored")
        else:
            self.report.observe(
                "user.rename", DEVIATES, f"a userName rename answered {answer.status} but was not stored"
            )

    # -- groups ---------------------------------------------------------------------------------

    async def groups(self, first: str, second: str, user_names: dict[str, str]) -> None:
        report = self.report
        name = f"{PREFIX}{self.tag}"
        empty = await self.create("Groups", {"schemas": [GROUP_SCHEMA], "displayName": name}, "displayName")
        with_members = await self.create(
            "Groups",
            {"schemas": [GROUP_SCHEMA], "displayName": f"{name}-m", "members": [{"value": first}]},
            "displayName",
        )
        if isinstance(empty, ScimResult) and isinstance(with_members, ScimResult):
            report.observe("group.create", OK, "groups created with and without members")
        elif isinstance(with_members, ScimResult):
            report.observe(
                "group.create",
                DEVIATES,
                f"a group without members answered {_answer(empty)}; with members {with_members.status}",
                group_create_with_members=True,
            )
        else:
            report.observe(
                "group.create",
                DEVIATES,
                f"group create answered {_answer(empty)} without members, {_answer(with_members)} with",
            )
            return
        group_id = with_members.id or ""
        answered = await self.read("Groups", group_id)
        stored = await self.group_members(group_id, answered)
        await self.member_form(stored, first, user_names)
        if stored is None:
            return

        def value(user_id: str) -> str:
            return user_names[user_id] if self.member_value == "userName" else user_id

        a, b = value(first), value(second)
        added = await self.attempt(
            "PATCH", f"Groups/{group_id}", [{"op": "add", "path": "members", "value": [{"value": b}]}]
        )
        now = await self.group_members(group_id, None)
        if isinstance(added, ScimError) or now is None or b not in now:
            report.observe(
                "group.member_add", DEVIATES, f"PATCH add member answered {_answer(added)}; members now {_count(now)}"
            )
            return
        report.observe("group.member_add", OK, f"PATCH add member answered {added.status}, stored")
        # Every form the engine may send, each read back: the first that works is the one to use.
        tried = {
            "filter": await self.removal(
                group_id, "filter", [{"op": "remove", "path": f"members[value eq {_quoted(a)}]"}], a, b
            ),
            "list": await self.removal(
                group_id, "list", [{"op": "remove", "path": "members", "value": [{"value": a}]}], a, b
            ),
            "put": await self.removal_by_put(group_id, f"{name}-m", a, b) if self.put else (False, "not tried: no PUT"),
        }
        working = next((form for form, (worked, _) in tried.items() if worked), None)
        for form, (worked, detail) in tried.items():
            if worked or working is None:
                report.observe(f"group.member_remove_{form}", OK if worked else DEVIATES, detail)
            elif working != form and list(tried).index(working) < list(tried).index(form):
                report.observe(f"group.member_remove_{form}", OK, f"{detail} (not needed: the {working} form works)")
            else:
                report.observe(
                    f"group.member_remove_{form}",
                    DEVIATES,
                    detail,
                    **({"verify_writes": True} if form in self.silent_failures else {}),
                )
        if working is None:
            report.observe("group.member_remove", DEVIATES, "no form of member removal worked")
        elif working != "filter":
            report.observe(
                "group.member_remove", DEVIATES, f"members are removed with the {working} form", member_removal=working
            )

    async def group_members(self, group_id: str, answered: dict[str, Any] | None) -> list[str] | None:
        """The group's members as the target lists them, another way when a GET leaves them out."""
        answered = answered if answered is not None else await self.read("Groups", group_id)
        members = _members(answered)
        if members is not None and members:
            if self.members_returned is None:
                self.members_returned = True
            return members
        asked = await self.attempt("GET", f"Groups/{group_id}", attributes="members")
        members = _members(asked.resource if isinstance(asked, ScimResult) else None)
        if members:
            return members
        if self.members_returned is None:
            self.members_returned = False
            self.report.observe(
                "group.members_returned",
                DEVIATES,
                "GET /Groups/{id} never lists members, even with attributes=members",
                group_members_returned=False,
            )
        return None

    async def member_form(self, stored: list[str] | None, first: str, user_names: dict[str, str]) -> None:
        report = self.report
        if stored is None:
            report.observe("group.member_value", UNKNOWN, "members are not listed: cannot tell what value they carry")
            return
        if self.members_returned:
            report.observe("group.members_returned", OK, "GET /Groups/{id} lists members")
        if stored == [first]:
            report.observe("group.member_value", OK, "members[].value is the user's id")
        elif stored == [user_names[first]]:
            self.member_value = "userName"
            report.observe(
                "group.member_value", DEVIATES, "members[].value is the user's userName", member_value="userName"
            )
        else:
            report.observe("group.member_value", DEVIATES, f"a group created with 1 member lists {len(stored)}")

    async def removal(
        self, group_id: str, form: str, operations: list[dict[str, Any]], a: str, b: str
    ) -> tuple[bool, str]:
        """Remove member ``a`` with one PATCH form; whether only ``a`` went, read back, and what happened."""
        answer = await self.attempt("PATCH", f"Groups/{group_id}", operations)
        return await self.removed(group_id, form, answer, a, b)

    async def removal_by_put(self, group_id: str, name: str, a: str, b: str) -> tuple[bool, str]:
        body = {"schemas": [GROUP_SCHEMA], "id": group_id, "displayName": name, "members": [{"value": b}]}
        answer = await self.attempt("PUT", f"Groups/{group_id}", body)
        worked, detail = await self.removed(group_id, "put", answer, a, b)
        return worked, f"PUT of the member list {detail}"

    async def removed(
        self, group_id: str, form: str, answer: ScimResult | ScimError, a: str, b: str
    ) -> tuple[bool, str]:
        after = await self.group_members(group_id, None) or []
        if isinstance(answer, ScimError):
            outcome = (False, f"answered {_failure(answer)}")
        elif a in after:
            # A success that did nothing: this target's answers must be checked by reading back.
            self.silent_failures.add(form)
            outcome = (False, f"answered {answer.status} but the member is still there")
        elif b not in after:
            outcome = (False, f"answered {answer.status} and removed the other member too: never use it")
        else:
            outcome = (True, f"answered {answer.status}, only that member removed")
        # Back as it was for the next form: a in, b in.
        missing = [m for m in (a, b) if m not in after]
        if missing:
            await self.attempt(
                "PATCH",
                f"Groups/{group_id}",
                [{"op": "add", "path": "members", "value": [{"value": m} for m in missing]}],
            )
        return outcome

    # -- cleanup --------------------------------------------------------------------------------

    async def cleanup(self) -> None:
        """Delete everything made (groups first), then anything left under the names asked for."""
        try:
            await self._cleanup()
        except ScimError as exc:
            left = ", ".join(f"{endpoint}/{resource_id}" for endpoint, resource_id in self.made)
            self.report.cleanup.append(f"stopped by {exc}; delete by hand what is left of: {left}")

    async def _cleanup(self) -> None:
        for endpoint, resource_id in sorted(self.made, key=lambda made: made[0] != "Groups"):
            answer = await self.attempt("DELETE", f"{endpoint}/{resource_id}")
            outcome = "deleted" if isinstance(answer, ScimResult) else f"DELETE answered {_answer(answer)}"
            self.report.cleanup.append(f"{endpoint}/{resource_id}: {outcome}")
        if self.made:
            gone = await self.attempt("GET", f"{self.made[0][0]}/{self.made[0][1]}")
            if isinstance(gone, ScimError) and gone.status == 404:
                self.report.observe("delete", OK, "DELETE answered, then GET answered 404")
            else:
                self.report.observe("delete", DEVIATES, f"after DELETE, GET answered {_answer(gone)}")
        # A create whose answer was lost, or a rename, may have left something under another id.
        leftovers = 0
        for endpoint, attribute, value in self.names:
            for candidate in (value, f"{value}-renamed"):
                found = await self.lookup(endpoint, attribute, candidate)
                for resource in found if isinstance(found, list) else []:
                    if str(resource.get(attribute)) == candidate and str(resource.get(attribute)).startswith(PREFIX):
                        await self.attempt("DELETE", f"{endpoint}/{resource['id']}")
                        leftovers += 1
        if leftovers:
            self.report.cleanup.append(f"{leftovers} leftover resources found by name and deleted")


async def _with_if_match(
    probe: Probe, path: str, operations: list[dict[str, Any]], etag: str
) -> ScimResult | ScimError:
    body = {"schemas": [SCHEMA_PATCH_OP], "Operations": operations}
    try:
        return await probe.client.send(ScimRequest("PATCH", path, body=body, if_match=etag))
    except AuthError:
        raise
    except ScimError as exc:
        return exc


def _answer(answer: ScimResult | ScimError | None) -> str:
    if answer is None:
        return "nothing"
    if isinstance(answer, ScimError):
        return _failure(answer)
    return str(answer.status)


def _count(members: list[str] | None) -> str:
    return "not listed" if members is None else str(len(members))


def _quoted(value: str) -> str:
    return orjson.dumps(value).decode()


async def probe_target(client: ScimClient, report: ProbeReport) -> ProbeReport:
    """Run the probe with ``client``; with ``report.write``, everything made is deleted whatever happens."""
    probe = Probe(client, report)
    await probe.discover()
    existing = await probe.paging()
    if not report.write:
        await probe.filters(existing)
        return report
    try:
        await probe.writes()
    finally:
        # Also on Ctrl-C (the task is cancelled) and on errors: shielded, so a second interrupt
        # during cleanup does not leave test accounts behind.
        await asyncio.shield(probe.cleanup())
    return report


async def run_probe(config_path: Path, target: str, *, write: bool) -> ProbeReport:
    """Probe a configured target; raise UserError for an unknown target, ScimError when it cannot be reached."""
    config = load_config(config_path)
    if target not in config.targets:
        known = ", ".join(sorted(config.targets)) or "none"
        raise UserError(f"{config_path}: no target {target!r} (targets: {known})")
    target_config = config.targets[target]
    session = TargetSession(target_config)
    client = ScimClient(
        target_config.base_url,
        auth=session.auth,
        timeout=target_config.timeout,
        verify=session.verify,
        # One attempt per request: the probe reports what the target answered, not what a retry got.
        retry=RetryPolicy(max_attempts=1),
        limiter=session.limiter,
        allow_insecure_http=target_config.allow_insecure_http,
        quirks=Quirks(),
    )
    try:
        return await probe_target(client, ProbeReport(target, target_config.base_url, write))
    finally:
        await client.aclose()
        await session.aclose()


def command(args: argparse.Namespace, run: Callable[..., Awaitable[ProbeReport]] = run_probe) -> int:
    """The ``probe`` command: exit 0 when probed, 3 for a config error, 4 when the target cannot be probed."""
    try:
        report = asyncio.run(run(args.config, args.target, write=args.write))
    except KeyboardInterrupt:
        print("interrupted; the probe deleted what it had created", file=sys.stderr)
        return 130
    except ScimError as exc:
        print(f"error: cannot probe {args.target}: {exc}", file=sys.stderr)
        return EXIT_NOT_OK
    if args.suggest:
        sys.stdout.write(suggestion_yaml(report.quirks()))
    elif args.json:
        sys.stdout.write(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for observation in report.observations:
            print(observation.line())
        for line in report.cleanup:
            print(f"cleanup   {line}")
        quirks = report.quirks()
        print("suggested: " + (", ".join(f"{k}={v}" for k, v in quirks.items()) or "no quirks (the defaults fit)"))
    return EXIT_OK
