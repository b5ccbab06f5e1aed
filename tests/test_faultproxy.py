"""The fault proxy itself, against a real scim2-server: transparent at rate 0, each fault on demand."""

from __future__ import annotations

import email.utils
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from provisioner.demo import ScimServer, start_scim_server
from tests.faultproxy import DEFAULT_KINDS, FaultProxy, fault_proxy  # noqa: F401 - fault_proxy is a fixture

CORE = "urn:ietf:params:scim:schemas:core:2.0:User"
_names = itertools.count(1)


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScimServer]:
    """One scim2-server for this module: every test uses its own userNames."""
    server = start_scim_server()
    try:
        yield server
    finally:
        server.stop()


def client(base_url: str, token: str | None, **options: Any) -> httpx.Client:
    headers = {"Accept": "application/scim+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=base_url + "/", headers=headers, timeout=options.pop("timeout", 5), **options)


def new_user(**extra: Any) -> dict[str, Any]:
    n = next(_names)
    return {"schemas": [CORE], "userName": f"fp-user-{n}@example.com", "displayName": f"User {n}", **extra}


def count_named(http: httpx.Client, user_name: str) -> int:
    """How many users the server holds with this userName."""
    response = http.get("Users", params={"filter": f'userName eq "{user_name}"'})
    assert response.status_code == 200
    return int(response.json()["totalResults"])


def same_origin(text: str, proxy: FaultProxy, upstream: ScimServer) -> str:
    """A body with the proxy's origin written as the upstream's, for comparing."""
    return text.replace(proxy.origin, f"http://127.0.0.1:{upstream.port}")


def test_rate_zero_is_transparent(fault_proxy, upstream: ScimServer) -> None:
    """Create, get, filter, patch and errors through the proxy look like the server's own answers."""
    proxy = fault_proxy(upstream.base_url, rate=0.0)
    assert proxy.base_url == f"{proxy.origin}/v2"
    with client(proxy.base_url, upstream.token) as via, client(upstream.base_url, upstream.token) as direct:
        created = via.post("Users", json=new_user(title="Engineer"))
        assert created.status_code == 201
        user_id = created.json()["id"]
        # The client's Host reached the server: locations name the proxy.
        assert created.headers["location"] == f"{proxy.base_url}/Users/{user_id}"
        assert created.json()["meta"]["location"] == created.headers["location"]

        by_name = {"filter": f'userName eq "{created.json()["userName"]}"'}
        for path, params in ((f"Users/{user_id}", None), ("Users", by_name)):
            a, b = via.get(path, params=params), direct.get(path, params=params)
            assert (a.status_code, a.headers.get("etag"), a.headers["content-type"]) == (
                b.status_code, b.headers.get("etag"), b.headers["content-type"],
            )  # fmt: skip
            assert same_origin(a.text, proxy, upstream) == b.text

        etag = created.headers["etag"]
        patch = {
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "path": "title", "value": "Architect"}],
        }
        patched = via.patch(f"Users/{user_id}", json=patch, headers={"If-Match": etag})
        assert patched.status_code in (200, 204)  # scim2-server answers 204 with the new ETag
        assert patched.headers["etag"] != etag
        assert direct.get(f"Users/{user_id}").json()["title"] == "Architect"

        # A stale If-Match reaches the server and its real 412 comes back.
        stale = via.patch(f"Users/{user_id}", json=patch, headers={"If-Match": etag})
        stale_direct = direct.patch(f"Users/{user_id}", json=patch, headers={"If-Match": etag})
        assert stale.status_code == stale_direct.status_code == 412

        missing_via, missing_direct = via.get("Users/nope"), direct.get("Users/nope")
        assert (missing_via.status_code, missing_via.text) == (missing_direct.status_code, missing_direct.text)

        assert via.delete(f"Users/{user_id}").status_code == 204
        assert direct.get(f"Users/{user_id}").status_code == 404

    stats = proxy.stats
    assert stats.injected == 0
    assert stats.requests == stats.forwarded == 7


def test_authorization_is_forwarded(fault_proxy, upstream: ScimServer) -> None:
    proxy = fault_proxy(upstream.base_url)
    with client(proxy.base_url, None) as anonymous, client(proxy.base_url, upstream.token) as authorized:
        assert anonymous.get("Users").status_code == 401
        assert authorized.get("Users").status_code == 200


def test_keep_alive_connections_are_reused(fault_proxy, upstream: ScimServer) -> None:
    """The proxy speaks HTTP/1.1 with keep-alive even though scim2-server closes every connection."""
    proxy = fault_proxy(upstream.base_url)
    with client(proxy.base_url, upstream.token) as via:
        responses = [via.get("ServiceProviderConfig") for _ in range(3)]
    assert {r.http_version for r in responses} == {"HTTP/1.1"}
    assert all(r.status_code == 200 for r in responses)


@pytest.mark.parametrize(
    ("kind", "method", "status"),
    [
        ("429", "GET", 429),
        ("503", "GET", 503),
        ("502", "POST", 502),
        ("412", "PATCH", 412),
        ("invalid_json", "GET", 200),
    ],
)
def test_a_fault_at_rate_one(fault_proxy, upstream: ScimServer, kind: str, method: str, status: int) -> None:
    """Rate 1.0 with one kind: every eligible request gets that fault; nothing faked reaches the server."""
    with client(upstream.base_url, upstream.token) as direct:
        created = direct.post("Users", json=new_user()).json()
        before = direct.get(f"Users/{created['id']}").headers["etag"]
    proxy = fault_proxy(upstream.base_url, rate=1.0, seed=3, kinds=[kind])
    with client(proxy.base_url, upstream.token) as via:
        if method == "GET":
            response = via.get(f"Users/{created['id']}")
        elif method == "POST":
            user = new_user()
            response = via.post("Users", json=user)
        else:
            patch = {
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "replace", "path": "title", "value": "Changed"}],
            }
            response = via.patch(f"Users/{created['id']}", json=patch, headers={"If-Match": before})
    assert response.status_code == status
    assert proxy.stats.faults == {kind: 1}
    if kind == "invalid_json":
        with pytest.raises(ValueError):
            response.json()
        assert proxy.stats.forwarded == 1  # a GET is safe: the real body, cut in half
        return
    assert proxy.stats.forwarded == 0
    if kind == "502":
        assert "502 Bad Gateway" in response.text
    else:
        assert response.json()["status"] == str(status)
    with client(upstream.base_url, upstream.token) as direct:
        if method == "POST":
            assert count_named(direct, user["userName"]) == 0
        if kind == "412":
            after = direct.get(f"Users/{created['id']}")
            assert "title" not in after.json() and "nickName" not in after.json()
            # The race was real: the version moved, so the client's If-Match is stale upstream too.
            assert after.headers["etag"] != before
            assert proxy.stats.race_writes == 2


def test_429_retry_after_takes_every_form(fault_proxy, upstream: ScimServer) -> None:
    proxy = fault_proxy(upstream.base_url, rate=1.0, seed=11, kinds=["429"])
    with client(proxy.base_url, upstream.token) as via:
        values = {via.get("ServiceProviderConfig").headers["retry-after"] for _ in range(30)}
    assert {"0", "1"} <= values
    dates = values - {"0", "1"}
    assert dates, values
    for value in dates:
        assert abs(email.utils.parsedate_to_datetime(value).timestamp() - time.time()) < 5


def test_412_only_for_conditional_writes(fault_proxy, upstream: ScimServer) -> None:
    """A fault that does not apply to a request leaves it alone (a PATCH without If-Match, a GET)."""
    with client(upstream.base_url, upstream.token) as direct:
        created = direct.post("Users", json=new_user()).json()
    proxy = fault_proxy(upstream.base_url, rate=1.0, kinds=["412"])
    patch = {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "replace", "path": "title", "value": "Unconditional"}],
    }
    with client(proxy.base_url, upstream.token) as via:
        assert via.get(f"Users/{created['id']}").status_code == 200
        assert via.patch(f"Users/{created['id']}", json=patch).status_code in (200, 204)
    assert proxy.stats.injected == 0
    assert proxy.stats.forwarded == 2


def test_reset_and_timeout_close_without_answer(fault_proxy, upstream: ScimServer) -> None:
    proxy = fault_proxy(upstream.base_url, rate=1.0, kinds=["reset"])
    with client(proxy.base_url, upstream.token) as via, pytest.raises(httpx.TransportError):
        via.post("Users", json=new_user())
    assert proxy.stats.faults == {"reset": 1}
    assert proxy.stats.forwarded == 0

    slow = fault_proxy(upstream.base_url, rate=1.0, kinds=["timeout"], delay=0.5)
    user = new_user()
    started = time.monotonic()
    with client(slow.base_url, upstream.token, timeout=0.2) as via, pytest.raises(httpx.ReadTimeout):
        via.post("Users", json=user)
    assert time.monotonic() - started < 0.5
    assert slow.stats.forwarded == 0
    with client(upstream.base_url, upstream.token) as direct:
        assert count_named(direct, user["userName"]) == 0


def test_lost_response_applies_the_request_upstream(fault_proxy, upstream: ScimServer) -> None:
    """The create reaches the server and is applied; the client only sees its connection reset."""
    proxy = fault_proxy(upstream.base_url, rate=1.0, kinds=["lost_response"])
    user = new_user()
    with client(proxy.base_url, upstream.token) as via:
        with pytest.raises(httpx.TransportError):
            via.post("Users", json=user)
        # GETs are not writes: lost_response never applies to them.
        found = count_named(via, user["userName"])
    assert found == 1
    assert proxy.stats.faults == {"lost_response": 1}
    assert proxy.stats.forwarded == 2


def test_seeded_schedule_is_reproducible_and_counted(fault_proxy, upstream: ScimServer) -> None:
    """The same seed gives the same faults in the same order; stats add up to the events."""

    def run(seed: int) -> list[str | None]:
        proxy = fault_proxy(upstream.base_url, rate=0.5, seed=seed, kinds=["429", "503", "502", "reset"])
        with client(proxy.base_url, upstream.token) as via:
            for _ in range(40):
                try:
                    via.get("ServiceProviderConfig")
                except httpx.TransportError:
                    pass
        events = proxy.events
        stats = proxy.stats
        assert stats.requests == len(events) == 40
        assert stats.injected == sum(e.fault is not None for e in events)
        assert stats.forwarded == sum(e.forwarded for e in events) == 40 - stats.injected
        for kind, n in stats.faults.items():
            assert n == sum(e.fault == kind for e in events)
        assert 10 <= stats.injected <= 30
        return [e.fault for e in events]

    first = run(5)
    assert run(5) == first
    assert run(6) != first
    assert set(first) == {None, "429", "503", "502", "reset"}


def test_applies_to_and_max_faults_and_configure(fault_proxy, upstream: ScimServer) -> None:
    proxy = fault_proxy(
        upstream.base_url,
        rate=1.0,
        kinds=["503"],
        applies_to=lambda method, path: "ServiceProviderConfig" not in path,
        max_faults=2,
    )
    with client(proxy.base_url, upstream.token) as via:
        assert via.get("ServiceProviderConfig").status_code == 200
        assert [via.get("Users").status_code for _ in range(3)] == [503, 503, 200]
        proxy.reset_stats()
        proxy.configure(rate=0.0)
        assert via.get("Users").status_code == 200
    assert proxy.stats.requests == 1
    assert proxy.stats.injected == 0


def test_default_kinds_and_validation() -> None:
    assert "lost_response" not in DEFAULT_KINDS
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FaultProxy("http://127.0.0.1:1/v2", kinds=["teapot"])
    with pytest.raises(ValueError, match="rate"):
        FaultProxy("http://127.0.0.1:1/v2", rate=2)


def test_stop_ends_delayed_requests_and_frees_the_port(upstream: ScimServer) -> None:
    proxy = FaultProxy(upstream.base_url, rate=1.0, kinds=["timeout"], delay=30).start()
    port = proxy.port
    started = time.monotonic()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with client(proxy.base_url, upstream.token, timeout=10) as via:
                via.get("Users")
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.2)
    proxy.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 5
    assert errors and isinstance(errors[0], httpx.TransportError)
    with httpx.Client(timeout=1) as plain, pytest.raises(httpx.ConnectError):
        plain.get(f"http://127.0.0.1:{port}/v2/Users")
