"""TLS: https only unless the caller opts in to http://; a custom CA bundle can be given."""

from __future__ import annotations

import ssl
from pathlib import Path

import certifi
import pytest

from connectors import OAuth2ClientCredentials, ScimClient


def test_http_base_url_is_refused_with_a_message_naming_url_and_option() -> None:
    with pytest.raises(ValueError) as caught:
        ScimClient("http://scim.example/v2")

    assert "'http://scim.example/v2'" in str(caught.value)
    assert "allow_insecure_http=True" in str(caught.value)


async def test_http_base_url_is_accepted_when_allowed() -> None:
    async with ScimClient("http://127.0.0.1:8080/v2", allow_insecure_http=True) as client:
        assert client.base_url == "http://127.0.0.1:8080/v2"


def test_other_schemes_are_refused() -> None:
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        ScimClient("ftp://scim.example/v2", allow_insecure_http=True)


def test_http_token_url_is_refused_too() -> None:
    with pytest.raises(ValueError, match="allow_insecure_http"):
        OAuth2ClientCredentials("http://login.example/token", "id", "secret")


async def test_verify_accepts_a_ca_bundle_path(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes())

    for verify in (str(bundle), bundle):
        async with ScimClient("https://scim.example/v2", verify=verify) as client:
            assert client.base_url == "https://scim.example/v2"


async def test_verify_accepts_an_ssl_context() -> None:
    async with ScimClient("https://scim.example/v2", verify=ssl.create_default_context()):
        pass


def test_a_missing_ca_bundle_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CA bundle .* does not exist"):
        ScimClient("https://scim.example/v2", verify=tmp_path / "missing.pem")


async def test_disabling_verification_is_never_silent(caplog: pytest.LogCaptureFixture) -> None:
    async with ScimClient("https://scim.example/v2", verify=False):
        pass

    assert "TLS certificate verification is disabled for https://scim.example/v2" in caplog.text
