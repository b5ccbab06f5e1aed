"""Secrets are masked in anything the engine writes down: logs, queue rows, errors."""

from __future__ import annotations

import json

import pytest
import structlog

from provisioner import logs
from provisioner.redaction import MASK, redact, redact_value, register


def test_a_registered_secret_is_masked_wherever_it_appears() -> None:
    register("s3cr3t-redaction-aa11")

    text = redact("url=https://x.example/?t=s3cr3t-redaction-aa11&again=s3cr3t-redaction-aa11")

    assert "s3cr3t-redaction-aa11" not in text
    assert text.count(MASK) == 2


def test_a_secret_containing_regex_characters_is_masked_literally() -> None:
    register("a.b*c+(d)-redaction")

    assert redact("x a.b*c+(d)-redaction y") == f"x {MASK} y"
    assert redact("x aXbbbc+(d)-redaction y") == "x aXbbbc+(d)-redaction y"


def test_the_longer_of_two_overlapping_secrets_is_masked_whole() -> None:
    register("overlap-redaction")
    register("overlap-redaction-longer")

    assert redact("[overlap-redaction-longer]") == f"[{MASK}]"


def test_short_values_are_not_treated_as_secrets() -> None:
    """Masking 'abc' everywhere would mangle ordinary text; such a token is no secret anyway."""
    register("abc")

    assert redact("abcdef") == "abcdef"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", f"Authorization: Bearer {MASK}", id="jwt"),
        pytest.param("bearer abcdefgh1234", f"bearer {MASK}", id="lower-case"),
        pytest.param("Basic dXNlcjpwYXNzd29yZA==", f"Basic {MASK}", id="basic"),
        pytest.param("détail: BEARER abcdefgh1234", f"détail: BEARER {MASK}", id="non-ascii-text"),
        pytest.param("baſic dXNlcjpwYXNzd29yZA==", f"baſic {MASK}", id="long-s-folded-like-the-pattern"),
    ],
)
def test_bearer_and_basic_credentials_are_masked_even_when_never_registered(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_every_secret_is_masked_however_many_are_registered() -> None:
    """Past a few secrets the text is searched with the one pattern instead of one test per secret."""
    many = [f"many-secrets-{n:03d}-zz" for n in range(40)]
    for secret in many:
        register(secret)

    text = redact(" ".join(many[::7]))

    assert text == " ".join([MASK] * len(many[::7]))


def test_ordinary_words_after_bearer_are_left_alone() -> None:
    assert redact("the bearer of bad news") == "the bearer of bad news"


def test_redact_value_masks_strings_in_nested_data_and_keeps_other_values() -> None:
    register("nested-redaction-77")
    value = {"a": ["x nested-redaction-77", 3, None], "b": {"c": "Bearer zzzzzzzzzz"}, "d": True}

    assert redact_value(value) == {"a": [f"x {MASK}", 3, None], "b": {"c": f"Bearer {MASK}"}, "d": True}


def test_log_lines_never_carry_a_registered_secret(capsys: pytest.CaptureFixture[str]) -> None:
    register("log-redaction-secret-42")
    logs.configure("info", "json")
    try:
        structlog.get_logger("test").info("calling", url="https://x.example/?token=log-redaction-secret-42",
                                          headers={"Authorization": "Bearer qwertyuiopasdf"})  # fmt: skip
    finally:
        structlog.reset_defaults()

    line = capsys.readouterr().err.strip().splitlines()[-1]
    event = json.loads(line)
    assert "log-redaction-secret-42" not in line and "qwertyuiopasdf" not in line
    assert event["url"] == f"https://x.example/?token={MASK}"
    assert event["headers"] == {"Authorization": f"Bearer {MASK}"}


def test_a_secret_with_a_line_break_is_masked_whole_line_by_line_and_json_escaped() -> None:
    register("first-line-5d2a\nsecond-line-9c7e")

    printed = redact("password: first-line-5d2a\nsecond-line-9c7e")
    logged_per_line = [redact(line) for line in "x first-line-5d2a\nsecond-line-9c7e y".splitlines()]
    in_json = redact(json.dumps({"password": "first-line-5d2a\nsecond-line-9c7e"}))

    assert printed == f"password: {MASK}"
    assert logged_per_line == [f"x {MASK}", f"{MASK} y"]
    assert "line-5d2a" not in in_json and "line-9c7e" not in in_json


def test_write_only_values_are_registered_and_masked_in_payloads() -> None:
    from provisioner.redaction import has_write_only, mask_write_only, register_write_only

    payload = {"userName": "ada", "password": "pw-write-only-61f0", "emails": [{"value": "a@x"}]}

    register_write_only(payload)

    assert redact("echo pw-write-only-61f0") == f"echo {MASK}"
    assert mask_write_only(payload) == {**payload, "password": MASK}
    assert has_write_only(payload) and not has_write_only({"userName": "ada"})


def test_a_fetched_oauth_token_joins_the_registry_before_it_is_used() -> None:
    import asyncio

    from provisioner.targets import MaskedTokens

    class Source:
        async def token(self) -> str:
            return "fetched-access-token-0b1c"

        async def refresh(self, rejected: str) -> str:
            return "refreshed-access-token-7e2d"

        async def aclose(self) -> None:
            return None

    tokens = MaskedTokens(Source())  # type: ignore[arg-type]

    first = asyncio.run(tokens.token())
    second = asyncio.run(tokens.refresh(first))

    assert redact(f"{first} {second}") == f"{MASK} {MASK}"
