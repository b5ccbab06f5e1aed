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

from apscheduler.triggers.cron import CronTrigger
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from sqlalchemy.engine import make_url
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


class SourceConfig(_Strict):
    """Where identity records come from."""

    type: Literal["csv", "jsonl"]
    path: Path
    key: str = Field(min_length=1)
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    encoding: str = "utf-8-sig"
    # A source with fewer usable records than this fails the cycle before planning
    # (a truncated export must not look like mass leavers). An empty source always fails.
    min_records: int = Field(default=1, ge=1)
    schedule: ScheduleConfig = ScheduleConfig()


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


class TargetConfig(_Strict):
    """One SCIM 2.0 target and how identities reach it."""

    base_url: str
    auth: AuthConfig
    source: str
    mapping: Path
    leaver: Literal["disable", "delete"] = "disable"
    # The deletion brake: a cycle that would disable or delete more accounts than this
    # (a count, and a share of the linked active accounts) is held for approval. null: no limit.
    max_deprovision: int | None = Field(default=50, ge=0)
    max_deprovision_share: float | None = Field(default=0.10, ge=0, le=1)
    enabled: bool = True
    max_concurrency: int = Field(default=4, ge=1, le=64)
    # Seconds one request may take in all, answer included (also each connect/read/write at most).
    timeout: float = Field(default=30.0, gt=0, le=600)
    # A larger answer body is refused as invalid (retried later), never read whole: 16 MiB.
    max_response_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    update_method: Literal["auto", "patch", "put"] = "auto"
    # Look the account up by the mapping's match attribute before POSTing: on every create,
    # only when a create is retried (its first answer may have been lost), or never.
    match_before_create: Literal["always", "retries", "never"] = "retries"
    # An update whose account vanished from the target: create it again, or send it to review.
    on_missing: Literal["recreate", "review"] = "recreate"
    use_etags: Literal["auto", "always", "never"] = "auto"
    verify_tls: bool = True
    ca_bundle: Path | None = None
    quarantine: QuarantinePolicy = QuarantinePolicy()
    retry: RetryConfig = RetryConfig()
    # Requests per second or minute to this target, retries and token requests included: "10/s", "180/min".
    rate_limit: str | None = None
    # http:// sends credentials in clear text: refused unless said here. true: loopback hosts only
    # (127.0.0.0/8, ::1, localhost: a local test server); a list: exactly these host names.
    allow_insecure_http: bool | list[str] = False
    # Groups and memberships (mappings/groups.yaml); null: no groups are managed in this target.
    groups: Path | None = None
    # Member changes per PATCH /Groups/{id} (AWS IAM Identity Center accepts at most 100).
    max_members_per_patch: int = Field(default=100, ge=1, le=10_000)
    # How a member is removed: path members[value eq "ID"] (RFC 7644 §3.5.2.2), or path members with a value list.
    group_member_removal: Literal["filter", "list"] = "filter"
    remove_leavers_from_groups: bool = True
    # A managed group no longer defined and left without members is deleted in the target.
    delete_empty_groups: bool = False
    # auto: PATCH when the target supports it, else GET + PUT of the whole member list.
    group_update_method: Literal["auto", "patch", "put"] = "auto"
    # Each linked group's members are read from the target at most this often and drift is corrected
    # (a member removed by hand is added back); "0s": every cycle; null: never.
    group_reconcile_every: str | None = "1d"
    # Members of a managed group that are not accounts we manage (added by hand, by another tool):
    # additive leaves them and reconciliation reports them; exact has `reconcile --repair` remove them.
    group_members: Literal["exact", "additive"] = "additive"
    # Deviations of this target from the RFCs, declared (learned ones are added at run time).
    quirks: QuirksConfig = QuirksConfig()
    # An attribute or schema extension the target does not declare (/ResourceTypes, /Schemas):
    # omit: leave it out of payloads with one warning; refuse: operations carrying it fail, naming it.
    unsupported_attributes: Literal["omit", "refuse"] = "omit"
    # The daemon reads every account back and reacts per `reconcile:` this often; "0" or null: never.
    reconcile_every: str | None = "1d"
    reconcile: ReconcileConfig = ReconcileConfig()

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

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


class Config(_Strict):
    """The whole config file."""

    state: str = "sqlite:///provisioner.db"
    sources: dict[str, SourceConfig]
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
    _register_secrets(config)
    resolved = _resolve_paths(config, path.resolve().parent)
    _check_state(resolved.state, doc)
    for name, target in resolved.targets.items():
        _refuse_clear_text(name, target, doc)
        _refuse_unverified_ca(name, target, doc)
        if target.ca_bundle is not None and not target.ca_bundle.is_file():
            loc = ("targets", name, "ca_bundle")
            raise ConfigError(f"{doc.where(loc)}: {_dotted(loc)}: no such file: {target.ca_bundle}")
    return resolved


def _interpolate(value: Any, loc: Loc, doc: YamlDocument, *, strict: bool) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, k), doc, strict=strict) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), doc, strict=strict) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        return _INTERPOLATION.sub(lambda m: _lookup_or_blank(m.group(1).strip(), loc, doc, strict), value)
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
        if error["type"] == "extra_forbidden":
            message = "unknown key"
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


def _refuse_clear_text(name: str, target: TargetConfig, doc: YamlDocument) -> None:
    urls: list[tuple[Loc, str]] = [(("targets", name, "base_url"), target.base_url)]
    if isinstance(target.auth, OAuth2Config):
        urls.append((("targets", name, "auth", "token_url"), target.auth.token_url))
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


def _refuse_unverified_ca(name: str, target: TargetConfig, doc: YamlDocument) -> None:
    if not target.verify_tls and target.ca_bundle is not None:
        loc = ("targets", name, "verify_tls")
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
    return found


def _register_secrets(config: Config) -> None:
    # A PostgreSQL state URL may carry a password: it is a secret like a target's token.
    password = re.match(r"^[\w+]+://[^:/@]*:([^@/]+)@", config.state)
    if password:
        redaction.register(password.group(1))
    for target in config.targets.values():
        if isinstance(target.auth, BearerAuthConfig):
            redaction.register(target.auth.token.get_secret_value())
        elif isinstance(target.auth, OAuth2Config):
            redaction.register(target.auth.client_secret.get_secret_value())


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else base / p

    sources = {n: s.model_copy(update={"path": resolve(s.path)}) for n, s in config.sources.items()}
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
    state = config.state
    match = re.match(r"^(sqlite(?:\+\w+)?:///)(?!/)(.+)$", state)
    if match and match.group(2) != ":memory:":
        state = f"{match.group(1)}{resolve(Path(match.group(2)))}"
    return config.model_copy(update={"sources": sources, "targets": targets, "state": state})
