"""Discovery: what a target declares in /ResourceTypes and /Schemas (RFC 7643 §6, §7).

scim2-server gives the conformant answers; the other shapes targets use (a bare
array, one object, no endpoint at all, garbage) come from respx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from connectors import AttributeInfo, BearerAuth, InvalidResponse, PermanentError, ResourceType, RetryPolicy, ScimClient
from provisioner.demo import ScimServer

CORE = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
BASE = "https://scim.example/v2"


@pytest.fixture
async def live(scim_server: ScimServer) -> AsyncIterator[ScimClient]:
    async with ScimClient(scim_server.base_url, auth=BearerAuth(scim_server.token), allow_insecure_http=True) as scim:
        yield scim


@pytest.fixture
async def mocked() -> AsyncIterator[ScimClient]:
    async with ScimClient(BASE, auth=BearerAuth("t"), retry=RetryPolicy(max_attempts=1)) as scim:
        yield scim


async def test_resource_types_name_each_endpoint_and_its_extensions(live: ScimClient) -> None:
    types = await live.resource_types()

    assert types["Users"] == ResourceType("User", "Users", CORE, ((ENTERPRISE, False),))
    assert types["Groups"] == ResourceType("Group", "Groups", GROUP, ())
    assert types["Users"].supports(ENTERPRISE) and not types["Groups"].supports(ENTERPRISE)


async def test_schemas_give_each_attribute_its_characteristics(live: ScimClient) -> None:
    schemas = await live.schemas()

    user = schemas[CORE]
    user_name = user.attribute("userName")
    assert user_name is not None
    assert (user_name.case_exact, user_name.uniqueness, user_name.required) == (False, "server", True)
    password = user.attribute("password")
    assert password is not None and (password.mutability, password.returned) == ("writeOnly", "never")
    emails = user.attribute("emails")
    assert emails is not None and emails.multi_valued and user.attribute("Emails.Value") is not None
    manager = schemas[ENTERPRISE].attribute("manager.value")
    assert manager is not None and manager.type == "string"


@respx.mock(base_url=BASE)
async def test_a_bare_array_of_resource_types_is_read(respx_mock: respx.MockRouter, mocked: ScimClient) -> None:
    respx_mock.get("/ResourceTypes").mock(return_value=httpx.Response(200, json=[
        {"name": "User", "endpoint": "/Users", "schema": CORE,
         "schemaExtensions": [{"schema": ENTERPRISE, "required": True}]},
        {"name": "broken"},
        "not an object",
    ]))  # fmt: skip

    assert await mocked.resource_types() == {"Users": ResourceType("User", "Users", CORE, ((ENTERPRISE, True),))}


@respx.mock(base_url=BASE)
async def test_a_single_schema_object_is_read(respx_mock: respx.MockRouter, mocked: ScimClient) -> None:
    respx_mock.get("/Schemas").mock(return_value=httpx.Response(200, json={
        "id": CORE, "attributes": [{"name": "userName"}, {"name": "externalId", "caseExact": True}, {"type": "x"}],
    }))  # fmt: skip

    schema = (await mocked.schemas())[CORE]

    # Characteristics left out take RFC 7643 §2.2's defaults.
    assert schema.attributes == (AttributeInfo("userName"), AttributeInfo("externalId", case_exact=True))


@pytest.mark.parametrize("status", [404, 405, 501])
@respx.mock(base_url=BASE)
async def test_no_discovery_endpoint_means_unknown(
    respx_mock: respx.MockRouter, mocked: ScimClient, status: int
) -> None:
    respx_mock.get("/ResourceTypes").mock(return_value=httpx.Response(status))
    respx_mock.get("/Schemas").mock(return_value=httpx.Response(status))

    assert await mocked.resource_types() == {}
    assert await mocked.schemas() == {}


@respx.mock(base_url=BASE)
async def test_a_discovery_answer_that_is_no_list_is_an_invalid_response(
    respx_mock: respx.MockRouter, mocked: ScimClient
) -> None:
    respx_mock.get("/Schemas").mock(return_value=httpx.Response(200, json={"message": "hello"}))

    with pytest.raises(InvalidResponse, match="Schemas") as raised:
        await mocked.schemas()

    assert raised.value.status == 200


@respx.mock(base_url=BASE)
async def test_a_discovery_endpoint_refusing_us_is_not_unknown(
    respx_mock: respx.MockRouter, mocked: ScimClient
) -> None:
    """A 401/403 is not "no such endpoint": it raises rather than pretend the target declares nothing."""
    respx_mock.get("/ResourceTypes").mock(return_value=httpx.Response(403))

    with pytest.raises(PermanentError) as raised:
        await mocked.resource_types()

    assert raised.value.status == 403
