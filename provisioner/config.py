"""The config file: YAML validated by pydantic, secrets from the environment or files.

Every error names the file, the line and the key. ``${NAME}`` reads an
environment variable and ``${file:/path}`` a file's content, anywhere a string
is allowed; values that land in secret fields are masked in every log line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from provisioner import redaction
from provisioner.alerts import AlertsConfig
from provisioner.quarantine import QuarantinePolicy
from provisioner.errors import ConfigError
from provisioner.transport import is_clear_text, is_loopback, url_host
from provisioner.yamlfile import Loc, YamlDocument, load_yaml

_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BearerAuthConfig(_Strict):
    """A static bearer token."""

    type: Literal["bearer"]
    token: SecretStr


class NoAuthConfig(_Strict):
    """No credentials (a local test target)."""

    type: Literal["none"]


class OAuth2Config(_Strict):
    """OAuth 2.0 client credentials (RFC 6749 §4.4): a token fetched, cached and refreshed."""

    type: Literal["oauth2"]
    token_url: str
    client_id: str
    client_secret: SecretStr
    scope: str | list[str] | None = None
    audience: str | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"


AuthConfig = Annotated[BearerAuthConfig | OAuth2Config | NoAuthConfig, Field(discriminator="type")]


class RetryConfig(_Strict):
    """Retries of one call within a round (the queue retries across rounds after that)."""

    max_attempts: int = Field(default=5, ge=1, le=20)
    backoff_base: float = Field(default=0.5, gt=0)
    backoff_cap: float = Field(default=30.0, gt=0)
    max_retry_after: float = Field(default=120.0, ge=0)
    # A Retry-After up to this many seconds is waited by the worker; a longer one puts the
    # operation back in the queue, due when the target said, and the cycle goes on.
    wait_in_place: float = Field(default=5.0, ge=0)


class ScheduleConfig(_Strict):
    """When the daemon runs a source's cycle: every N (``15m``, ``1h``, ``90s``) or a crontab line."""

    every: str = "15m"
    cron: str | None = None

    @field_validator("every")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("cron")
    @classmethod
    def _crontab(cls, value: str | None) -> str | None:
        if value is not None:
            # Here, not at the top: only a config with a crontab line needs the scheduler to load.
            from apscheduler.triggers.cron import CronTrigger

            CronTrigger.from_crontab(value)  # raises ValueError with the reason
        return value

    @property
    def every_seconds(self) -> float:
        """The interval in seconds."""
        return parse_duration(self.every)


class DaemonConfig(_Strict):
    """The long-running daemon (``provisioner run``)."""

    # /metrics and /healthz; loopback by default. null: no HTTP listener.
    listen: str | None = "127.0.0.1:9464"
    shutdown_grace: float = Field(default=30.0, ge=0, le=3600)
    retry_interval: float = Field(default=60.0, ge=1)
    # Seconds without a tick of the event loop after which /healthz answers "stuck" (503): something
    # (a mapping expression that never ends) blocks the daemon. Planning 100k records takes seconds.
    stuck_after: float = Field(default=120.0, ge=5)
    # Finished operations (succeeded, superseded, cancelled, resolved) older than this are
    # deleted once a day; failed and waiting ones are kept until handled. null: keep everything.
    retention: str | None = "90d"
    # This instance's name in logs, metrics, `status` and the queue rows it claims; unique among
    # the instances sharing a database. null: hostname-pid. A stable name lets a restarted
    # instance take back its own running operations at once instead of after their lease.
    instance: str | None = Field(default=None, min_length=1, max_length=200)
    # How long a claimed operation stays this instance's without renewal (renewed every third
    # of it while the daemon runs); a dead instance's operations are taken back after it.
    lease: str = "10m"

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @field_validator("lease")
    @classmethod
    def _lease(cls, value: str) -> str:
        if parse_duration(value) < 1:
            raise ValueError("a lease of at least 1s")
        return value


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``2h``, ``1d``; raise ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not match:
        raise ValueError(f"not a duration like 90s, 15m, 2h or 1d: {text!r}")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def parse_rate(text: str) -> tuple[float, float]:
    """``10/s``, ``180/min``, ``3600/h`` as (requests, per seconds); raise ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*", text)
    if not match:
        raise ValueError(f"not a rate like 10/s, 180/min or 3600/h: {text!r}")
    return float(match.group(1)), {"s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2)[0]]


class _SourceCommon(_Strict):
    """What every kind of source has: the key column, the truncation guard, the schedule."""

    # The column (SCIM: attribute) naming each person; records sharing a key are all rejected.
    key: str = Field(min_length=1)
    # A source with fewer usable records than this fails the cycle before planning
    # (a truncated export must not look like mass leavers). An empty source always fails.
    min_records: int = Field(default=1, ge=1)
    schedule: ScheduleConfig = ScheduleConfig()


class SourceConfig(_SourceCommon):
    """A CSV or JSON Lines file, read anew every cycle."""

    type: Literal["csv", "jsonl"]
    path: Path
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    encoding: str = "utf-8-sig"

    def describe(self) -> str:
        """How messages name this source: its file."""
        return str(self.path)


class SqlSourceConfig(_SourceCommon):
    """A query run against any database SQLAlchemy reaches; its result columns are the record's columns."""

    type: Literal["sql"]
    # A SQLAlchemy URL (sqlite:///hr.db, postgresql+psycopg://reader@db/hr). A password in it must be
    # ${ENV} or ${file:PATH} (escaped where it lands in the URL, so any character works), or given apart in `password`.
    url: SecretStr
    password: SecretStr | None = None
    query: str = Field(min_length=1)
    # Rows fetched from the database at a time (a server-side cursor where the driver has one).
    chunk_size: int = Field(default=1000, ge=1, le=100_000)
    # Seconds to connect; statements run as long as the database lets them.
    connect_timeout: float = Field(default=30.0, gt=0, le=600)
    # "config.yaml:6: sources.hr.query" by key, set when read from a file: what a database's
    # answer is about (the query, the URL) is named where the author wrote it.
    _at: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _database_url(cls, value: SecretStr) -> SecretStr:
        try:
            make_url(value.get_secret_value())
        except (ArgumentError, ValueError):
            raise ValueError("not a database URL like sqlite:///hr.db or postgresql+psycopg://reader@host/hr") from None
        return value

    def engine_url(self) -> URL:
        """The URL to connect with, ``password`` included."""
        url = make_url(self.url.get_secret_value())
        return url.set(password=self.password.get_secret_value()) if self.password is not None else url

    def describe(self) -> str:
        """How messages name this source: its URL with the password hidden."""
        return make_url(self.url.get_secret_value()).render_as_string(hide_password=True)

    def at(self, key: str) -> str:
        """Where a message about ``key`` (``url``, ``query``) points: ``config.yaml:6: sources.hr.query``.

        A source not read from a file (built in code) is named by :meth:`describe`.
        """
        return self._at.get(key) or self.describe()


class _HttpEndpoint(_Strict):
    """A SCIM endpoint the engine calls (a target, a SCIM source): URL, credentials, HTTP limits and checks.

    The checks that need the whole file (clear-text credentials, ``ca_bundle``) are in :func:`load_config`.
    """

    base_url: str
    auth: AuthConfig
    # Seconds one request may take in all, answer included (also each connect/read/write at most).
    timeout: float = Field(default=30.0, gt=0, le=600)
    # A larger answer body is refused as invalid (retried later), never read whole: 16 MiB.
    max_response_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    verify_tls: bool = True
    ca_bundle: Path | None = None
    retry: RetryConfig = RetryConfig()
    # Requests per second or minute to this endpoint, retries and token requests included: "10/s", "180/min".
    rate_limit: str | None = None
    # http:// sends credentials in clear text: refused unless said here. true: loopback hosts only
    # (127.0.0.0/8, ::1, localhost: a local test server); a list: exactly these host names.
    allow_insecure_http: bool | list[str] = False

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("allow_insecure_http")
    @classmethod
    def _insecure_hosts(cls, value: bool | list[str]) -> bool | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty host list allows nothing: write false, or name the hosts")
            return [host.strip().lower().strip("[]") for host in value]
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    def insecure_http_allowed(self, url: str) -> bool:
        """Whether ``url`` may be sent over plain http:// (see ``allow_insecure_http``)."""
        if not is_clear_text(url):
            return True
        host = url_host(url) or ""
        if self.allow_insecure_http is True:
            return is_loopback(host)
        if isinstance(self.allow_insecure_http, list):
            return host in self.allow_insecure_http
        return False


class ScimSourceConfig(_HttpEndpoint, _SourceCommon):
    """An HR system's SCIM 2.0 endpoint, read page by page (RFC 7644 §3.4.2); auth as a target's."""

    type: Literal["scim"]
    # The resource endpoint read: Users (RFC 7644 §3.2).
    endpoint: str = "Users"
    # A SCIM filter (RFC 7644 §3.4.2.2) selecting the source's population: `active eq true`. A full
    # read takes it as the whole population, so a user it leaves out is a leaver: never write a
    # `meta.lastModified gt …` filter here, set `delta: true` instead.
    filter: str | None = None
    # Delta reads: a cycle reads only the users whose meta.lastModified is after the highest one the
    # last cycle saw (less `delta_overlap`) and plans only them, as `sync --only` does: nobody else is
    # a leaver. The first cycle, and the first one `full_every` after the last full read, read everyone.
    delta: bool = False
    full_every: str = "1d"
    delta_overlap: str = "60s"
    # Only these attributes are asked for (RFC 7644 §3.4.2.5); null: what the server returns by default.
    attributes: list[str] | None = None
    page_size: int = Field(default=100, ge=1, le=10_000)
    # What TargetSession needs of a target: one request at a time is plenty for paging.
    max_concurrency: int = Field(default=1, ge=1, le=16)

    @field_validator("full_every", "delta_overlap")
    @classmethod
    def _delta_duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("attributes")
    @classmethod
    def _asks_for_key(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        # Without the key every record would be rejected, and the cycle refused as an empty source.
        key = info.data.get("key")
        if value is None or not key or key == "id" or any(_may_hold(entry, key) for entry in value):
            return value
        raise ValueError(f"none of these attributes gives the key '{key}'; add it (id is always returned)")

    def describe(self) -> str:
        """How messages name this source: the endpoint it reads."""
        return f"{self.base_url}/{self.endpoint.strip('/')}"


def _may_hold(entry: str, key: str) -> bool:
    """Whether asking for attribute ``entry`` (RFC 7644 §3.4.2.5) brings the record column ``key``.

    ``key`` is a column of :mod:`provisioner.sources.scim`'s records: an attribute
    (``externalId``), an extension's by its short name (``employeeNumber``), or a
    multi-valued one by type (``emails_work``). A whole extension (its URN) may hold it.
    """
    name = entry.rsplit(":", 1)[-1] if entry.lower().startswith("urn:") else entry
    if entry.lower().startswith("urn:") and name[:1].isupper():
        return True  # the extension's URN itself (…:2.0:User): all its attributes
    name = name.split(".", 1)[0].casefold()
    return name in (key.casefold(), key.split("_", 1)[0].casefold())


AnySourceConfig = Annotated[SourceConfig | SqlSourceConfig | ScimSourceConfig, Field(discriminator="type")]


class QuirksConfig(_Strict):
    """How a target deviates from RFC 7643/7644, declared; each key is a field of ``connectors.Quirks``.

    A key left out (null) is not declared: the RFC default applies, or what the
    engine learned from the target's answers (a 501/405, a failed read-back),
    which is kept in the state database (``target_quirk``) and shown by ``status``.
    A declared key wins over a learned one at start.
    """

    # client: the target ignores or mangles filters; page through the endpoint and match here.
    filter: Literal["server", "client"] | None = None
    # false: the target rejects the count parameter when paging.
    page_count: bool | None = None
    # false: adopt and update with PATCH only (the target has no PUT).
    put: bool | None = None
    # How a group member is removed: path members[value eq "ID"], a members value list, GET + PUT.
    member_removal: Literal["filter", "list", "put"] | None = None
    # false: GET /Groups/{id} does not report members; read them another way or trust stored state.
    group_members_returned: bool | None = None
    # true: a group must be created with its members (POST with members).
    group_create_with_members: bool | None = None
    # What the target puts in members[].value: the member's id, or its userName.
    member_value: Literal["id", "userName"] | None = None
    # true: read each written resource back and compare (the target's 200s cannot be trusted).
    verify_writes: bool | None = None

    def declared(self) -> dict[str, Any]:
        """The keys set in the config file, with their values."""
        return {name: value for name, value in self.model_dump().items() if value is not None}
class ReconcileConfig(_Strict):
    """A target's ``reconcile:`` block: the reaction to each situation reconciliation finds.

    Situations are midPoint's (linked, unlinked, unmatched, deleted, disputed);
    every reaction is a queue operation, sent only with ``--repair`` or by the daemon.
    """

    # A linked account whose attributes drifted from what the source says: update it, or only report it.
    linked: Literal["update", "report"] = "update"
    # A linked account the target no longer has (GET answers 404): create it again, or only report it.
    deleted: Literal["recreate", "report"] = "recreate"
    # An account the match attribute gives to an identity that has none linked: adopt it, or only report it.
    unlinked: Literal["link", "report"] = "link"
    # An account no identity in scope owns: report it, disable it, or delete it once seen for `delete_after`.
    unmatched: Literal["report", "disable", "delete"] = "report"
    delete_after: str = "7d"
    # Two accounts for one identity, or one account claimed by two: always reported, never touched.
    disputed: Literal["report"] = "report"
    # Accounts per page read from the target.
    page_size: int = Field(default=100, ge=1, le=10_000)

    @field_validator("delete_after")
    @classmethod
    def _grace(cls, value: str) -> str:
        parse_duration(value)
        return value


def parse_interval(text: str | None) -> float | None:
    """Seconds in an interval that may be off: ``0`` or null (None), else as :func:`parse_duration`."""
    if text is None or text.strip() == "0":
        return None
    seconds = parse_duration(text)
    return seconds or None


class TargetConfig(_HttpEndpoint):
    """One SCIM 2.0 target and how identities reach it."""

    source: str
    mapping: Path
    leaver: Literal["disable", "delete"] = "disable"
    # The deletion brake: a cycle that would disable or delete more accounts than this
    # (a count, and a share of the linked active accounts) is held for approval. null: no limit.
    max_deprovision: int | None = Field(default=50, ge=0)
    max_deprovision_share: float | None = Field(default=0.10, ge=0, le=1)
    enabled: bool = True
    max_concurrency: int = Field(default=4, ge=1, le=64)
    update_method: Literal["auto", "patch", "put"] = "auto"
    # Look the account up by the mapping's match attribute before POSTing: on every create,
    # only when a create is retried (its first answer may have been lost), or never.
    match_before_create: Literal["always", "retries", "never"] = "retries"
    # An update whose account vanished from the target: create it again, or send it to review.
    on_missing: Literal["recreate", "review"] = "recreate"
    use_etags: Literal["auto", "always", "never"] = "auto"
    quarantine: QuarantinePolicy = QuarantinePolicy()
    # Groups and memberships (mappings/groups.yaml); null: no groups are managed in this target.
    groups: Path | None = None
    # Member changes per PATCH /Groups/{id} (AWS IAM Identity Center accepts at most 100).
    max_members_per_patch: int = Field(default=100, ge=1, le=10_000)
    # How a member is removed: path members[value eq "ID"] (RFC 7644 §3.5.2.2), or path members with a value list.
    group_member_removal: Literal["filter", "list"] = "filter"
    remove_leavers_from_groups: bool = True
    # A managed group no longer defined and left without members is deleted in the target: under
    # additive, one that still holds members we do not manage is kept for them. Deletes go through the
    # member brake below (each counts as removing its members), whatever group_members says.
    delete_empty_groups: bool = False
    # auto: PATCH when the target supports it, else GET + PUT of the whole member list.
    group_update_method: Literal["auto", "patch", "put"] = "auto"
    # Each linked group's members are read from the target at most this often and drift is corrected
    # (a member removed by hand is added back); "0s": every cycle; null: never.
    group_reconcile_every: str | None = "1d"
    # Members of a managed group that are not accounts we manage (added by hand, by another tool):
    # additive leaves them and reconciliation reports them; exact has `reconcile --repair` remove them.
    group_members: Literal["exact", "additive"] = "additive"
    # The brake on member removals under `group_members: exact` (the cycle's and reconciliation's):
    # a run that would remove more members than this (a count, and a share of the members of our
    # groups) is held for approval, as max_deprovision holds leavers. null: no limit.
    max_member_removals: int | None = Field(default=50, ge=0)
    max_member_removal_share: float | None = Field(default=0.10, ge=0, le=1)
    # Which HTTP calls keep their request and response bodies in the queue (`queue show`): those of
    # operations that did not succeed and any call answered with an error (failures), or every call
    # (all: about 1 KB a call more in the state database, and ~10 % more CPU per operation).
    call_bodies: Literal["failures", "all"] = "failures"
    # Deviations of this target from the RFCs, declared (learned ones are added at run time).
    quirks: QuirksConfig = QuirksConfig()
    # An attribute or schema extension the target does not declare (/ResourceTypes, /Schemas):
    # omit: leave it out of payloads with one warning; refuse: operations carrying it fail, naming it.
    unsupported_attributes: Literal["omit", "refuse"] = "omit"
    # The daemon reads every account back and reacts per `reconcile:` this often; "0" or null: never.
    reconcile_every: str | None = "1d"
    reconcile: ReconcileConfig = ReconcileConfig()

    @field_validator("group_reconcile_every")
    @classmethod
    def _reconcile_every(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @field_validator("reconcile_every", mode="before")
    @classmethod
    def _reconcile_interval(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # `reconcile_every: 0` in YAML is a number
        if isinstance(value, str):
            parse_interval(value)
        return value


class Config(_Strict):
    """The whole config file."""

    state: str = "sqlite:///provisioner.db"
    sources: dict[str, AnySourceConfig]
    targets: dict[str, TargetConfig]
    daemon: DaemonConfig = DaemonConfig()
    alerts: AlertsConfig = AlertsConfig()
    # Where the file was read from; relative paths in it are relative to its folder.
    origin: Path = Field(default=Path("config.yaml"), exclude=True)


def load_config(path: Path, *, secrets: bool = True) -> Config:
    """Read, interpolate and validate a config file.

    ``secrets=False`` is for commands that only read the state database (the
    review queue): references that cannot be resolved become empty strings.
    """
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of keys")
    data = _interpolate(doc.data, (), doc, strict=secrets)
    try:
        config = Config.model_validate({**data, "origin": path})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, doc)) from None
    _check_references(config, doc)
    _refuse_written_passwords(config, doc)
    _register_secrets(config)
    resolved = _resolve_paths(config, path.resolve().parent)
    for name, source in resolved.sources.items():
        if isinstance(source, SqlSourceConfig):
            locs = [("sources", name, key) for key in ("url", "query")]
            source._at = {loc[-1]: f"{doc.where(loc)}: {_dotted(loc)}" for loc in locs}
    _check_state(resolved.state, doc)
    endpoints: list[tuple[Loc, _HttpEndpoint]] = [
        (("targets", name), target) for name, target in resolved.targets.items()
    ]
    endpoints += [(("sources", n), s) for n, s in resolved.sources.items() if isinstance(s, ScimSourceConfig)]
    for loc, endpoint in endpoints:
        _refuse_clear_text(loc, endpoint, doc)
        _refuse_unverified_ca(loc, endpoint, doc)
        if endpoint.ca_bundle is not None and not endpoint.ca_bundle.is_file():
            at = (*loc, "ca_bundle")
            raise ConfigError(f"{doc.where(at)}: {_dotted(at)}: no such file: {endpoint.ca_bundle}")
    return resolved


def _interpolate(value: Any, loc: Loc, doc: YamlDocument, *, strict: bool) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, k), doc, strict=strict) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), doc, strict=strict) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        userinfo = _userinfo_span(value)
        return _INTERPOLATION.sub(
            lambda m: _escaped_in(userinfo, m, _lookup_or_blank(m.group(1).strip(), loc, doc, strict)), value
        )
    return value


_PLACEHOLDER = "\x00"


def _userinfo_span(template: str) -> tuple[int, int] | None:
    """Where a URL template's ``user:password`` part lies (RFC 3986 §3.2.1), or None for no URL.

    Found on the template with each ``${...}`` stood in by one placeholder, since a reference such as
    ``${file:/run/secrets/pw}`` holds a ``/`` of its own. The span is in template positions.
    """
    skeleton = _INTERPOLATION.sub(lambda m: _PLACEHOLDER * len(m.group(0)), template)
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://", skeleton)
    if scheme is None:
        return None
    authority = re.match(r"[^/?#]*", skeleton[scheme.end() :])
    at = authority.group(0).rfind("@") if authority else -1
    return (scheme.end(), scheme.end() + at) if at >= 0 else None


def _escaped_in(userinfo: tuple[int, int] | None, match: re.Match[str], value: str) -> str:
    # A password read into a URL's user:password part is percent-encoded there (RFC 3986 §3.2.1):
    # unescaped, an '@' or '/' in it would end the part, and the rest would be taken for the host
    # name, printed, stored and sent to DNS. SQLAlchemy and psycopg decode it again.
    if userinfo is not None and userinfo[0] <= match.start() < userinfo[1]:
        return quote(value, safe="")
    return value


def _lookup_or_blank(reference: str, loc: Loc, doc: YamlDocument, strict: bool) -> str:
    try:
        return _lookup(reference, loc, doc)
    except ConfigError:
        if strict:
            raise
        return ""


def _lookup(reference: str, loc: Loc, doc: YamlDocument) -> str:
    where = f"{doc.where(loc)}: {_dotted(loc)}"
    if reference.startswith("file:"):
        secret_path = Path(reference[len("file:") :]).expanduser()
        try:
            return secret_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read secret file {secret_path}: {exc.strerror}") from None
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", reference):
        raise ConfigError(f"{where}: '${{{reference}}}' is not an environment variable name or file:PATH")
    if reference not in os.environ:
        raise ConfigError(f"{where}: environment variable {reference} is not set")
    return os.environ[reference]


def _describe(exc: ValidationError, doc: YamlDocument) -> str:
    lines = []
    for error in exc.errors():
        loc = _yaml_loc(error["loc"], doc)
        named = loc
        message = error["msg"]
        if error["type"] == "value_error":
            # A validator's ValueError: its own words are the message, without pydantic's label.
            message = message.removeprefix("Value error, ")
        elif error["type"] == "assertion_error":
            message = message.removeprefix("Assertion failed, ")
        elif error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "union_tag_invalid":
            # A discriminated union (a source's or an auth's type) reports its tag at the parent.
            loc = _yaml_loc((*error["loc"], "type"), doc)
            named = loc
            expected = error.get("ctx", {}).get("expected_tags", "")
            message = f"unknown type {error.get('ctx', {}).get('tag')!r}; one of {expected}"
        elif error["type"] == "union_tag_not_found":
            named = (*loc, "type")
            message = "required key is missing"
        elif error["type"] == "missing":
            # The missing key has no line of its own: point at its parent, name the key.
            named = (*loc, error["loc"][-1])
            message = "required key is missing"
        lines.append(f"{doc.where(loc)}: {_dotted(named)}: {message}")
    return "\n".join(lines)


def _yaml_loc(loc: tuple[Any, ...], doc: YamlDocument) -> Loc:
    # Discriminated unions add the tag ("bearer") to the location; it is not a YAML key.
    kept: list[str | int] = []
    for part in loc:
        candidate = (*kept, part)
        if candidate in doc.lines or isinstance(part, int):
            kept.append(part)
    return tuple(kept)


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _check_references(config: Config, doc: YamlDocument) -> None:
    for name, target in config.targets.items():
        if target.source not in config.sources:
            known = ", ".join(sorted(config.sources)) or "none"
            loc = ("targets", name, "source")
            raise ConfigError(f"{doc.where(loc)}: {_dotted(loc)}: no source named '{target.source}' (known: {known})")


def _refuse_clear_text(at: Loc, target: _HttpEndpoint, doc: YamlDocument) -> None:
    urls: list[tuple[Loc, str]] = [((*at, "base_url"), target.base_url)]
    if isinstance(target.auth, OAuth2Config):
        urls.append(((*at, "auth", "token_url"), target.auth.token_url))
    for loc, url in urls:
        if target.insecure_http_allowed(url):
            continue
        host = url_host(url)
        if target.allow_insecure_http is True:
            hint = (f"allow_insecure_http: true allows loopback hosts only; {host} is not one "
                    f"(name it to allow it: allow_insecure_http: [{host}])")  # fmt: skip
        elif target.allow_insecure_http:
            hint = f"{host} is not in allow_insecure_http"
        else:
            hint = "use https://, or set allow_insecure_http: true (a local test server on loopback only)"
        raise ConfigError(
            f"{doc.where(loc)}: {_dotted(loc)}: {url} is http://, so credentials would travel in clear text; {hint}"
        )


def _refuse_unverified_ca(at: Loc, target: _HttpEndpoint, doc: YamlDocument) -> None:
    if not target.verify_tls and target.ca_bundle is not None:
        loc = (*at, "verify_tls")
        raise ConfigError(
            f"{doc.where(loc)}: {_dotted(loc)}: verify_tls: false would ignore ca_bundle; "
            "keep verify_tls: true to trust the ca_bundle, or remove ca_bundle"
        )


def _check_state(state: str, doc: YamlDocument) -> None:
    """The state URL is a database URL, and a SQLite file's folder exists."""
    where = f"{doc.where(('state',))}: state"
    try:
        url = make_url(state)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"{where}: not a database URL like sqlite:///provisioner.db ({exc})") from None
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        folder = Path(url.database).parent
        if not folder.is_dir():
            raise ConfigError(f"{where}: the folder of the state database does not exist: {folder}")


def config_warnings(config: Config) -> list[str]:
    """What is allowed but probably not meant; ``check`` prints these and the daemon logs them."""
    found = []
    listen = config.daemon.listen
    if listen:
        host = listen.rpartition(":")[0].strip("[]")
        if host in ("", "0.0.0.0", "::"):
            found.append(
                f"daemon.listen {listen} serves /metrics and /healthz on every network interface; "
                "bind 127.0.0.1 (the default) unless a scraper elsewhere must reach it"
            )
    for name, source in config.sources.items():
        if isinstance(source, ScimSourceConfig) and source.filter and "lastmodified" in source.filter.lower():
            # Every cycle reads a whole snapshot: whoever the filter leaves out is a leaver.
            found.append(
                f"sources.{name}.filter reads only the users changed since a date; every user it leaves out "
                "is a leaver in each cycle (the deletion brake holds mass leavers): a source's filter must "
                "select the whole population; `delta: true` reads only the changes, safely"
            )
    return found


def _refuse_written_passwords(config: Config, doc: YamlDocument) -> None:
    """A SQL source's password comes from the environment or a file, never from the config file's text."""
    raw_sources = doc.data.get("sources") if isinstance(doc.data, dict) else None
    for name, source in config.sources.items():
        if not isinstance(source, SqlSourceConfig) or not isinstance(raw_sources, dict):
            continue
        raw = raw_sources.get(name) if isinstance(raw_sources.get(name), dict) else {}
        written = []
        url = raw.get("url")
        if isinstance(url, str):
            try:
                in_url = make_url(url).password
            except (ArgumentError, ValueError):
                in_url = None
            if in_url and "${" not in str(in_url):
                written.append("url")
        password = raw.get("password")
        if isinstance(password, str) and password and "${" not in password:
            written.append("password")
        for key in written:
            loc = ("sources", name, key)
            raise ConfigError(
                f"{doc.where(loc)}: {_dotted(loc)}: a password written in the config file; "
                "read it from the environment or a file: ${HR_DB_PASSWORD} or ${file:/run/secrets/hr-db}"
            )


def _register_secrets(config: Config) -> None:
    # A PostgreSQL state URL may carry a password: it is a secret like a target's token.
    password = re.match(r"^[\w+]+://[^:/@]*:([^@/]+)@", config.state)
    if password:
        # As written in the URL (escaped) and as the database sees it.
        redaction.register(password.group(1))
        redaction.register(unquote(password.group(1)))
    auths: list[AuthConfig] = [target.auth for target in config.targets.values()]
    for source in config.sources.values():
        if isinstance(source, ScimSourceConfig):
            auths.append(source.auth)
        elif isinstance(source, SqlSourceConfig):
            url_password = source.engine_url().password
            if url_password:
                redaction.register(str(url_password))
                # As it is written inside a URL: escaped.
                redaction.register(quote(str(url_password), safe=""))
    for auth in auths:
        if isinstance(auth, BearerAuthConfig):
            redaction.register(auth.token.get_secret_value())
        elif isinstance(auth, OAuth2Config):
            redaction.register(auth.client_secret.get_secret_value())


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else base / p

    sources: dict[str, SourceConfig | SqlSourceConfig | ScimSourceConfig] = {}
    for n, s in config.sources.items():
        if isinstance(s, SourceConfig):
            sources[n] = s.model_copy(update={"path": resolve(s.path)})
        elif isinstance(s, ScimSourceConfig):
            sources[n] = s.model_copy(update={"ca_bundle": s.ca_bundle and resolve(s.ca_bundle)})
        else:
            sources[n] = s.model_copy(update={"url": SecretStr(_relative_sqlite(s.url.get_secret_value(), resolve))})
    targets = {
        n: t.model_copy(
            update={
                "mapping": resolve(t.mapping),
                "ca_bundle": t.ca_bundle and resolve(t.ca_bundle),
                "groups": t.groups and resolve(t.groups),
            }
        )
        for n, t in config.targets.items()
    }
    state = _relative_sqlite(config.state, resolve)
    return config.model_copy(update={"sources": sources, "targets": targets, "state": state})


def _relative_sqlite(url: str, resolve: Any) -> str:
    """A SQLite URL's relative file path made relative to the config file's folder."""
    match = re.match(r"^(sqlite(?:\+\w+)?:///)(?!/)(.+)$", url)
    if match and match.group(2) != ":memory:":
        return f"{match.group(1)}{resolve(Path(match.group(2)))}"
    return url
