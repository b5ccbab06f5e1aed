"""A target's quirks: declared, learned once, heard by a listener, shared by all the target's clients."""

from __future__ import annotations

import pytest

from connectors import Quirks
from provisioner.config import BearerAuthConfig, TargetConfig
from provisioner.targets import TargetSession


def test_defaults_are_what_a_conformant_target_needs() -> None:
    assert Quirks().as_dict() == {
        "filter": "server", "group_create_with_members": False, "group_members_returned": True,
        "member_removal": "filter", "member_value": "id", "page_count": True, "put": True, "verify_writes": False,
    }  # fmt: skip


def test_learning_tells_the_listener_once_per_change() -> None:
    heard: list[tuple[str, object, str]] = []
    quirks = Quirks(on_learn=lambda name, value, reason: heard.append((name, value, reason)))

    quirks.learn("put", False, "PUT /Users/u1 answered 405")
    quirks.learn("put", False, "PUT /Users/u2 answered 405")

    assert quirks.put is False
    assert heard == [("put", False, "PUT /Users/u1 answered 405")]


def test_an_unknown_quirk_is_refused() -> None:
    with pytest.raises(ValueError, match="'filters' is not a target quirk"):
        Quirks().learn("filters", "client", "typo")


@pytest.mark.parametrize(("name", "value"), [("filter", "clients"), ("put", 0), ("member_value", "email")])
def test_a_quirk_takes_only_its_own_values(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"quirk {name} must be one of"):
        Quirks().learn(name, value, "typo")
    with pytest.raises(ValueError, match=f"quirk {name} must be one of"):
        Quirks(**{name: value})  # type: ignore[arg-type]


async def test_every_client_of_a_target_shares_its_quirks() -> None:
    config = TargetConfig(
        base_url="https://scim.example/v2", auth=BearerAuthConfig(type="bearer", token="t"), source="hr",
        mapping="users.yaml", max_response_bytes=1024,
    )  # fmt: skip
    session = TargetSession(config, quirks=Quirks(put=False))
    first, second = session.client(), session.client()
    try:
        first.quirks.learn("filter", "client", "a lookup answered with an unrelated account")

        assert second.quirks is session.quirks
        assert (second.quirks.filter, second.quirks.put) == ("client", False)
        assert first.max_response_bytes == second.max_response_bytes == 1024
    finally:
        await first.aclose()
        await second.aclose()
        await session.aclose()
