"""A target's config turned into SCIM clients: auth, retry policy and limits shared by its workers."""

from __future__ import annotations

import functools
import os
import ssl
from dataclasses import dataclass, field, replace

import httpx
import structlog

from connectors import (
    BearerAuth,
    Capabilities,
    OAuth2ClientCredentials,
    Quirks,
    RateLimit,
    RetryPolicy,
    Schema,
    ScimClient,
    TargetLimiter,
)
from provisioner import redaction
from provisioner.config import BearerAuthConfig, OAuth2Config, ScimSourceConfig, TargetConfig, parse_rate

log = structlog.get_logger("provisioner.targets")


async def discover(client: ScimClient, config: TargetConfig, *, update_method: str) -> Capabilities:
    """What the target says it supports, overridden where the config says so (many targets report wrongly)."""
    capabilities = await client.capabilities()
    client.history.clear()  # the discovery call is not any operation's
    overrides: dict[str, bool] = {}
    if update_method != "auto":
        overrides["patch"] = update_method == "patch"
    if config.use_etags != "auto":
        overrides["etag"] = config.use_etags == "always"
    capabilities = replace(capabilities, **overrides)
    log.debug("capabilities", target=config.base_url, patch=capabilities.patch, etag=capabilities.etag)
    return capabilities


async def discover_schemas(config: TargetConfig) -> tuple[dict[str, Schema] | None, list[str] | None]:
    """The target's schemas by URN (``/Schemas``) and its Users' schema extensions (``/ResourceTypes``).

    Either is None when the target does not say (RFC 7643 §6, §7 endpoints are
    optional). A target without the core User schema in its answer gets RFC
    7643's. Raises :class:`connectors.ScimError` when the target cannot be read.
    """
    from provisioner.schema import CORE_USER, RFC7643_SCHEMAS

    session = TargetSession(config)
    client = session.client()
    try:
        schemas = await client.schemas()
        types = await client.resource_types()
    finally:
        await client.aclose()
        await session.aclose()
    users = types.get("Users")
    extensions = [urn for urn, _ in users.extensions] if users else None
    if not schemas:
        return None, extensions
    if not any(urn.casefold() == CORE_USER.casefold() for urn in schemas):
        schemas = {CORE_USER: RFC7643_SCHEMAS[CORE_USER], **schemas}
    return schemas, extensions


@dataclass(slots=True)
class TargetSession:
    """What the clients of one target share during a round of sending; create it inside the event loop.

    An HR system read as a SCIM source (``ScimSourceConfig``) is reached the same way.
    """

    config: TargetConfig | ScimSourceConfig
    # The target's deviations, declared or learned; every client of the session shares them.
    quirks: Quirks = field(default_factory=Quirks)
    limiter: TargetLimiter = field(init=False)
    retry: RetryPolicy = field(init=False)
    auth: httpx.Auth | MaskedTokens | None = field(init=False)
    verify: bool | ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.verify = _tls(config)
        rate = RateLimit(*parse_rate(config.rate_limit)) if config.rate_limit else None
        # Every request to the target counts, token requests and retries included.
        self.limiter = TargetLimiter(max_concurrency=config.max_concurrency, rate_limit=rate)
        self.retry = RetryPolicy(
            max_attempts=config.retry.max_attempts,
            base=config.retry.backoff_base,
            cap=config.retry.backoff_cap,
            max_retry_after=config.retry.max_retry_after,
            wait_in_place=config.retry.wait_in_place,
        )
        self.auth = _auth(config, self.limiter, self.verify)

    def client(self) -> ScimClient:
        """A client for one worker: its own small connection pool, the shared policy and limits."""
        config = self.config
        return ScimClient(
            config.base_url,
            auth=self.auth,
            timeout=httpx.Timeout(config.timeout, connect=min(config.timeout, 10.0)),
            max_connections=2,
            verify=self.verify,
            retry=self.retry,
            limiter=self.limiter,
            allow_insecure_http=bool(config.allow_insecure_http),
            quirks=self.quirks,
            max_response_bytes=config.max_response_bytes,
        )

    async def aclose(self) -> None:
        """Close what the session holds open (the token client)."""
        if isinstance(self.auth, MaskedTokens):
            await self.auth.aclose()


class MaskedTokens:
    """An OAuth 2.0 token source whose every token joins the masking registry before it is used.

    A target that echoes the access token (in an error body, a header) must
    not put it into a log line, a queue row or an alert: the token is known to
    ``redaction`` from the moment it is fetched, before any request carries it.
    """

    def __init__(self, source: OAuth2ClientCredentials) -> None:
        self.source = source

    def __repr__(self) -> str:
        return f"MaskedTokens({self.source!r})"

    async def token(self) -> str:
        """A valid token (see ``OAuth2ClientCredentials.token``), registered as a secret."""
        return _masked(await self.source.token())

    async def refresh(self, rejected: str) -> str:
        """A new token after a 401, registered as a secret."""
        return _masked(await self.source.refresh(rejected))

    async def aclose(self) -> None:
        """Close the token endpoint's connection pool."""
        await self.source.aclose()


def _masked(token: str) -> str:
    redaction.register(token)
    return token


def _tls(config: TargetConfig | ScimSourceConfig) -> bool | ssl.SSLContext:
    """One TLS context for all the target's clients: building one costs ~30 ms of CPU.

    Kept for the process and shared by every cycle (a daemon starts one session
    per target per cycle); a CA bundle edited on disk (same path, another
    modification time or size) is read again.
    """
    if not config.verify_tls:
        return False
    if config.ca_bundle:
        path = str(config.ca_bundle)
        try:
            stat = os.stat(path)
        except OSError:
            # Let ssl say what is wrong with it.
            return ssl.create_default_context(cafile=path)
        return _bundle_context(path, stat.st_mtime_ns, stat.st_size)
    return _system_context()


@functools.cache
def _system_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


@functools.lru_cache(maxsize=16)
def _bundle_context(path: str, mtime_ns: int, size: int) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=path)


def _auth(
    config: TargetConfig | ScimSourceConfig, limiter: TargetLimiter, verify: bool | ssl.SSLContext
) -> httpx.Auth | MaskedTokens | None:
    auth = config.auth
    if isinstance(auth, BearerAuthConfig):
        return BearerAuth(auth.token.get_secret_value())
    if isinstance(auth, OAuth2Config):
        return MaskedTokens(OAuth2ClientCredentials(
            auth.token_url,
            auth.client_id,
            auth.client_secret.get_secret_value(),
            scope=auth.scope,
            audience=auth.audience,
            auth_method=auth.auth_method,
            limiter=limiter,
            verify=verify,
            allow_insecure_http=bool(config.allow_insecure_http),
        ))
    return None
