"""The config file: strict keys, secrets from the environment or files, paths relative to the file, errors at file:line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from provisioner import redaction
from provisioner.config import BearerAuthConfig, config_warnings, load_config
from provisioner.demo import PROJECT_ROOT
from provisioner.errors import ConfigError
from provisioner.redaction import redact

TOKEN = "tok-9f8e7d6c5b4a"

CONFIG = """\
state: sqlite:///state.db
sources:
  hr:
    type: csv
    path: data/hr.csv
    key: employee_id
targets:
  app:
    base_url: https://scim.example.com/v2/
    auth:
      type: bearer
      token: "${CONFIG_TEST_TOKEN}"
    source: hr
    mapping: mappings/users.yaml
    leaver: delete
"""


def write(tmp_path: Path, text: str = CONFIG) -> Path:
    folder = tmp_path / "conf"
    folder.mkdir(exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in text:
            return number
    raise AssertionError(f"{needle!r} is not in {path}")


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFIG_TEST_TOKEN", TOKEN)


def test_config_is_read_with_the_token_from_the_environment(tmp_path: Path) -> None:
    config = load_config(write(tmp_path))

    target = config.targets["app"]
    assert isinstance(target.auth, BearerAuthConfig)
    assert target.auth.token.get_secret_value() == TOKEN
    assert target.base_url == "https://scim.example.com/v2"
    assert target.leaver == "delete"
    assert config.sources["hr"].key == "employee_id"


def test_the_token_is_never_in_the_configs_repr(tmp_path: Path) -> None:
    config = load_config(write(tmp_path))

    assert TOKEN not in repr(config)
    assert TOKEN not in str(config.model_dump())


def test_the_token_is_masked_once_the_config_is_loaded(tmp_path: Path) -> None:
    load_config(write(tmp_path))

    assert TOKEN not in redact(f"GET /Users?access_token={TOKEN}")


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(path)

    folder = path.parent.resolve()
    assert config.sources["hr"].path == folder / "data" / "hr.csv"
    assert config.targets["app"].mapping == folder / "mappings" / "users.yaml"
    assert config.state == f"sqlite:///{folder / 'state.db'}"


def test_relative_config_path_is_resolved_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path)
    monkeypatch.chdir(tmp_path)

    config = load_config(Path("conf/config.yaml"))

    assert config.sources["hr"].path == (tmp_path / "conf" / "data" / "hr.csv").resolve()
    assert config.sources["hr"].path.is_absolute()


def test_absolute_paths_and_other_databases_are_kept(tmp_path: Path) -> None:
    source = tmp_path / "abs.csv"
    text = CONFIG.replace("path: data/hr.csv", f"path: {source}").replace(
        "state: sqlite:///state.db", "state: postgresql://db.example.com/provisioner"
    )

    config = load_config(write(tmp_path, text))

    assert config.sources["hr"].path == source
    assert config.state == "postgresql://db.example.com/provisioner"


def test_in_memory_sqlite_is_kept(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CONFIG.replace("sqlite:///state.db", '"sqlite:///:memory:"')))

    assert config.state == "sqlite:///:memory:"


@pytest.mark.parametrize(
    ("old", "new", "key", "dotted"),
    [
        pytest.param("state:", "stat:", "stat:", "stat", id="top-level"),
        pytest.param("    key: employee_id\n", "    key: employee_id\n    kye: id\n", "kye:", "sources.hr.kye", id="source"),
        pytest.param("    leaver: delete\n", "    leavr: delete\n", "leavr:", "targets.app.leavr", id="target"),
        pytest.param("      type: bearer\n", "      type: bearer\n      tokn: x\n", "tokn:", "targets.app.auth.tokn", id="auth"),
    ],
)  # fmt: skip
def test_unknown_key_names_file_line_and_key(tmp_path: Path, old: str, new: str, key: str, dotted: str) -> None:
    path = write(tmp_path, CONFIG.replace(old, new, 1))

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert f"{path}:{line_of(path, key)}: {dotted}: unknown key" in str(raised.value)


def test_missing_required_key_names_where_it_belongs(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.replace("    key: employee_id\n", ""))

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert f"{path}:{line_of(path, 'hr:')}: sources.hr.key: required key is missing" in str(raised.value)


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        pytest.param("    leaver: delete\n", "    leaver: archive\n", "leaver:", id="bad-choice"),
        pytest.param("    leaver: delete\n", "    max_concurrency: 0\n", "max_concurrency:", id="out-of-range"),
        pytest.param("https://scim.example.com/v2/", "ftp://scim.example.com", "base_url:", id="not-http"),
        pytest.param("    type: csv\n", "    type: excel\n", "type: excel", id="source-type"),
    ],
)
def test_invalid_value_names_its_line(tmp_path: Path, old: str, new: str, needle: str) -> None:
    path = write(tmp_path, CONFIG.replace(old, new, 1))

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert f"{path}:{line_of(path, needle)}:" in str(raised.value)


def test_http_base_url_without_allow_insecure_http_is_a_config_error_naming_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.replace("https://scim.example.com/v2/", "http://scim.example.com/v2"))

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert f"{path}:{line_of(path, 'base_url:')}:" in str(raised.value)
    assert "base_url" in str(raised.value)


def test_http_base_url_is_accepted_when_allowed_explicitly(tmp_path: Path) -> None:
    text = CONFIG.replace("https://scim.example.com/v2/", "http://127.0.0.1:8081/v2").replace(
        "    leaver: delete\n", "    leaver: delete\n    allow_insecure_http: true\n"
    )

    assert load_config(write(tmp_path, text)).targets["app"].base_url == "http://127.0.0.1:8081/v2"


def test_missing_environment_variable_names_line_and_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONFIG_TEST_TOKEN")
    path = write(tmp_path)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    message = str(raised.value)
    assert message.startswith(f"{path}:{line_of(path, 'token:')}: targets.app.auth.token")
    assert "CONFIG_TEST_TOKEN" in message and "not set" in message


def test_missing_environment_variable_is_blank_when_secrets_are_not_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONFIG_TEST_TOKEN")

    config = load_config(write(tmp_path), secrets=False)

    assert config.targets["app"].source == "hr"


def test_file_reference_reads_the_secret_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "token.txt"
    secret.write_text("from-a-file-123\n", encoding="utf-8")
    path = write(tmp_path, CONFIG.replace("${CONFIG_TEST_TOKEN}", f"${{file:{secret}}}"))

    config = load_config(path)

    auth = config.targets["app"].auth
    assert isinstance(auth, BearerAuthConfig)
    assert auth.token.get_secret_value() == "from-a-file-123"


def test_missing_secret_file_names_line_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    path = write(tmp_path, CONFIG.replace("${CONFIG_TEST_TOKEN}", f"${{file:{missing}}}"))

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert str(raised.value).startswith(f"{path}:{line_of(path, 'token:')}:")
    assert str(missing) in str(raised.value)


def test_interpolation_inside_a_longer_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCIM_HOST", "scim.example.org")
    path = write(tmp_path, CONFIG.replace("https://scim.example.com/v2/", "https://${SCIM_HOST}/v2"))

    assert load_config(path).targets["app"].base_url == "https://scim.example.org/v2"


def test_reference_that_is_not_a_variable_name_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.replace("${CONFIG_TEST_TOKEN}", "${not a name}"))

    with pytest.raises(ConfigError, match=rf"^{path}:{line_of(path, 'token:')}:"):
        load_config(path)


def test_target_referring_to_an_unknown_source_names_line_and_known_sources(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.replace("    source: hr\n", "    source: payroll\n"))

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    message = str(raised.value)
    assert message.startswith(f"{path}:{line_of(path, 'source: payroll')}: targets.app.source")
    assert "'payroll'" in message and "hr" in message


def test_config_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "- just\n- a list\n")

    with pytest.raises(ConfigError, match=rf"^{path}:1:"):
        load_config(path)


def test_invalid_yaml_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.replace("    leaver: delete\n", "    leaver: [delete\n"))

    with pytest.raises(ConfigError, match=rf"^{path}:\d+:13: invalid YAML: parsing a flow sequence"):
        load_config(path)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_the_shipped_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_APP_TOKEN", "example-token")

    config = load_config(PROJECT_ROOT / "config.example.yaml")

    assert config.targets
    for target in config.targets.values():
        assert target.source in config.sources
        assert target.mapping.is_absolute()


# --- transport rules ----------------------------------------------------------------------------


def _target_options(options: str, base_url: str = "https://scim.example.com/v2/") -> str:
    return CONFIG.replace("https://scim.example.com/v2/", base_url).replace(
        "    leaver: delete\n", "    leaver: delete\n" + "".join(f"    {line}\n" for line in options.splitlines())
    )


@pytest.mark.parametrize(
    ("base_url", "allow", "accepted"),
    [
        pytest.param("http://127.0.0.1:8081/v2", "true", True, id="ipv4-loopback"),
        pytest.param("http://[::1]:8081/v2", "true", True, id="ipv6-loopback"),
        pytest.param("http://localhost:8081/v2", "true", True, id="localhost"),
        pytest.param("http://scim.lab.example/v2", "true", False, id="true-is-loopback-only"),
        pytest.param("http://scim.lab.example/v2", "[scim.lab.example]", True, id="named-host"),
        pytest.param("http://other.example/v2", "[scim.lab.example]", False, id="host-not-named"),
        pytest.param("http://127.0.0.1:8081/v2", "[scim.lab.example]", False, id="a-list-is-exact"),
        pytest.param("https://scim.example.com/v2", "false", True, id="https-needs-nothing"),
    ],
)
def test_allow_insecure_http_allows_loopback_or_the_hosts_it_names(
    tmp_path: Path, base_url: str, allow: str, accepted: bool
) -> None:
    path = write(tmp_path, _target_options(f"allow_insecure_http: {allow}", base_url))

    if accepted:
        assert load_config(path).targets["app"].base_url == base_url
    else:
        with pytest.raises(ConfigError, match="clear text") as raised:
            load_config(path)
        assert f"{path}:{line_of(path, 'base_url:')}:" in str(raised.value)


def test_the_token_url_follows_the_same_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFIG_TEST_SECRET", "client-secret-for-config-test")
    text = _target_options("allow_insecure_http: true", "http://127.0.0.1:8081/v2").replace(
        '      type: bearer\n      token: "${CONFIG_TEST_TOKEN}"\n',
        "      type: oauth2\n      token_url: http://login.example.com/token\n      client_id: c\n"
        '      client_secret: "${CONFIG_TEST_SECRET}"\n',
    )

    with pytest.raises(ConfigError, match="token_url"):
        load_config(write(tmp_path, text))


def test_verify_tls_false_with_a_ca_bundle_is_an_error(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not checked before the rule\n", encoding="utf-8")
    path = write(tmp_path, _target_options(f"verify_tls: false\nca_bundle: {bundle}"))

    with pytest.raises(ConfigError, match="verify_tls: false would ignore ca_bundle") as raised:
        load_config(path)
    assert f"{path}:{line_of(path, 'verify_tls:')}:" in str(raised.value)


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        pytest.param("http://hooks.example.com/x", True, id="http-remote"),
        pytest.param("http://127.0.0.1:9000/x", False, id="http-loopback"),
        pytest.param("https://hooks.example.com/x", False, id="https"),
    ],
)
def test_a_webhook_with_an_authorization_header_over_http_is_refused(tmp_path: Path, url: str, refused: bool) -> None:
    text = CONFIG + f'alerts:\n  webhook:\n    url: "{url}"\n    headers: {{Authorization: "Bearer hook-token-1234"}}\n'
    path = write(tmp_path, text)

    if refused:
        with pytest.raises(ConfigError, match="Authorization header over http://"):
            load_config(path)
    else:
        assert load_config(path).alerts.webhook is not None


def test_listen_on_every_interface_is_warned_about(tmp_path: Path) -> None:
    from provisioner.config import config_warnings

    quiet = load_config(write(tmp_path, CONFIG))
    loud = load_config(write(tmp_path, CONFIG + 'daemon: {listen: "0.0.0.0:9464"}\n'))

    assert config_warnings(quiet) == []
    assert [w for w in config_warnings(loud) if "every network interface" in w]


def test_a_state_folder_that_does_not_exist_is_named_at_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.replace("sqlite:///state.db", "sqlite:///missing/state.db"))

    with pytest.raises(ConfigError, match="folder of the state database does not exist") as raised:
        load_config(path)
    assert f"{path}:{line_of(path, 'state:')}:" in str(raised.value)


def test_a_state_url_without_its_driver_is_a_config_error_not_an_import_error() -> None:
    from provisioner.store import check_state_driver, open_store

    # psycopg comes with the test extra: a driver nobody installs stands for a missing one.
    with pytest.raises(ConfigError, match="driver"):
        check_state_driver("postgresql+pg8000://db.example.com/provisioner")
    with pytest.raises(ConfigError, match="driver"):
        open_store("postgresql+pg8000://db.example.com/provisioner")


def test_a_scim_source_filtering_on_last_modified_is_warned_about(tmp_path: Path) -> None:
    """A delta filter makes every user it leaves out a leaver: check says so before a cycle does."""
    path = write(
        tmp_path,
        "sources:\n  hr:\n    type: scim\n    base_url: https://hr.example.com/scim/v2\n"
        "    auth: {type: bearer, token: hr-token-value}\n    key: employeeNumber\n"
        "    filter: 'meta.lastModified gt \"2026-01-01T00:00:00Z\"'\n"
        "targets:\n  app:\n    base_url: https://scim.example.com/v2\n    auth: {type: none}\n"
        "    source: hr\n    mapping: users.yaml\n",
    )

    config = load_config(path)

    [warning] = config_warnings(config)
    assert warning.startswith("sources.hr.filter reads only the users changed since a date")
    assert redaction.is_registered("hr-token-value")


def test_a_scim_source_over_http_is_refused_like_a_target(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "sources:\n  hr:\n    type: scim\n    base_url: http://hr.example.com/scim/v2\n"
        "    auth: {type: bearer, token: hr-token-value}\n    key: employeeNumber\n"
        "targets:\n  app:\n    base_url: https://scim.example.com/v2\n    auth: {type: none}\n"
        "    source: hr\n    mapping: users.yaml\n",
    )

    with pytest.raises(ConfigError, match=rf"^{path}:4: sources\.hr\.base_url: http://hr\.example\.com/scim/v2 is http://"):
        load_config(path)


@pytest.mark.parametrize(
    ("attributes", "key", "ok"),
    [
        pytest.param("[userName, externalId]", "externalId", True, id="core"),
        pytest.param("[userName]", "id", True, id="id-always-returned"),
        pytest.param("[\"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber\"]",
                     "employeeNumber", True, id="extension-attribute"),
        pytest.param("[\"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User\"]", "employeeNumber", True,
                     id="whole-extension"),
        pytest.param("[emails.value]", "emails_work", True, id="typed"),
        pytest.param("[userName, name]", "employeeNumber", False, id="missing"),
    ],
)  # fmt: skip
def test_a_scim_source_asking_for_attributes_must_ask_for_its_key(
    tmp_path: Path, attributes: str, key: str, ok: bool
) -> None:
    path = write(
        tmp_path,
        "sources:\n  hr:\n    type: scim\n    base_url: https://hr.example.com/scim/v2\n"
        f"    auth: {{type: none}}\n    key: {key}\n    attributes: {attributes}\n"
        "targets:\n  app:\n    base_url: https://scim.example.com/v2\n    auth: {type: none}\n"
        "    source: hr\n    mapping: users.yaml\n",
    )

    if ok:
        assert load_config(path).sources["hr"].key == key
        return
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == (
        f"{path}:7: sources.hr.attributes: none of these attributes gives the key '{key}'; "
        "add it (id is always returned)"
    )


def test_a_state_password_read_into_its_url_is_escaped_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.engine import make_url

    monkeypatch.setenv("STATE_PASSWORD", "p@ss/word:1")
    monkeypatch.setenv("STATE_HOST", "db.example.com:5433")
    state = "state: postgresql://prov:${STATE_PASSWORD}@${STATE_HOST}/prov"
    text = CONFIG.replace("state: sqlite:///state.db", state)

    config = load_config(write(tmp_path, text))

    url = make_url(config.state)
    # Only the user:password part is escaped: the host and port read into the URL are kept as they are.
    assert (url.password, url.host, url.port, url.database) == ("p@ss/word:1", "db.example.com", 5433, "prov")
    assert redaction.is_registered("p@ss/word:1")


def test_a_delta_scim_source_with_a_full_read_interval_that_is_not_a_duration_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "sources:\n  hr:\n    type: scim\n    base_url: https://hr.example.com/scim/v2\n"
        "    auth: {type: bearer, token: hr-token-value}\n    key: employeeNumber\n"
        "    delta: true\n    full_every: daily\n"
        "targets:\n  app:\n    base_url: https://scim.example.com/v2\n    auth: {type: none}\n"
        "    source: hr\n    mapping: users.yaml\n",
    )

    with pytest.raises(ConfigError, match=rf"^{path}:8: sources\.hr\.full_every: .*not a duration"):
        load_config(path)
