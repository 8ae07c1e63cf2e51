"""Dynamic /probe targets without a server: the target syntax, the auth modules, the registry's limit and TTL."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from exporter.config import AuthModule, ConfigError, load_settings
from exporter.dynamic import Address, Registry, allowed, parse_target, target_config


@pytest.mark.parametrize(("text", "address"), [
    ("db1.example.org:5433/app", Address("db1.example.org", 5433, "app")),
    ("db1", Address("db1", 5432, "postgres")),
    ("10.0.0.7/orders", Address("10.0.0.7", 5432, "orders")),
    ("[2001:db8::1]:6432/x", Address("[2001:db8::1]", 6432, "x")),
])
def test_targets_are_host_port_and_database_with_defaults(text: str, address: Address) -> None:
    assert parse_target(text) == address


@pytest.mark.parametrize("text", ["", "db1:0/x", "db1:70000/x", "db 1/x", "db1:5432/a/b", "host=db1", "db1:/x",
                                  "user@db1/x", "db1/" + "x" * 64])
def test_malformed_targets_are_refused_with_the_expected_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT/DB|out of range"):
        parse_target(text)


def test_a_target_is_built_from_the_address_and_the_auth_module() -> None:
    module = AuthModule(user="mon", password_env="PW", sslmode="require", options={"sslrootcert": "/ca.pem"},
                        labels={"env": "prod"})
    cfg = target_config(parse_target("[2001:db8::1]:6432/app"), module)
    assert cfg.name == "[2001:db8::1]:6432/app"
    assert conninfo_to_dict(cfg.dsn) == {"host": "2001:db8::1", "port": "6432", "dbname": "app", "user": "mon",
                                         "sslmode": "require", "sslrootcert": "/ca.pem"}
    assert cfg.password_env == "PW" and cfg.labels == {"env": "prod"}
    assert "password" not in cfg.dsn


def test_a_password_command_gets_the_probed_address() -> None:
    module = AuthModule(user="mon", password_command=["aws", "rds", "generate-db-auth-token", "--hostname", "{host}",
                                                      "--port", "{port}", "--username", "{user}", "{region}"],
                        password_command_ttl=300)
    cfg = target_config(parse_target("db1.example.org:5433/app"), module)
    assert cfg.password_command == ["aws", "rds", "generate-db-auth-token", "--hostname", "db1.example.org",
                                    "--port", "5433", "--username", "mon", "{region}"]
    assert cfg.password_command_ttl == 300 and cfg.password_file is None
    assert module.password_command is not None and module.password_command[4] == "{host}"  # the module unchanged


def test_allowed_targets_limit_where_the_credentials_go() -> None:
    module = AuthModule(user="mon", allowed_targets=["*.db.internal:*/*", "10.0.0.?:5432/*"])
    assert allowed(parse_target("a.db.internal/app"), module)
    assert allowed(parse_target("10.0.0.7/app"), module)
    assert not allowed(parse_target("evil.example.org/app"), module)
    assert not allowed(parse_target("10.0.0.17/app"), module)


def test_the_registry_holds_a_limited_number_of_targets_and_lets_unprobed_ones_expire() -> None:
    now = [0.0]
    registry = Registry(limit=2, ttl=600, clock=lambda: now[0])
    assert registry.claim("a:5432/postgres", "m") and registry.claim("b:5432/postgres", "m")
    assert not registry.claim("c:5432/postgres", "m")  # full: the caller answers 429
    assert not registry.claim("a:5432/postgres", "m")  # exists
    now[0] = 500.0
    assert registry.touch("a:5432/postgres", "m") == "m"  # a is probed again, b is not
    assert registry.touch("b:5432/postgres", "other") == "m"  # another module does not keep it alive
    assert registry.touch("c:5432/postgres", "m") is None
    now[0] = 700.0
    assert registry.expired() == ["b:5432/postgres"]
    assert "b:5432/postgres" not in registry and len(registry) == 1
    assert registry.claim("c:5432/postgres", "m")  # b's place is free again
    now[0] = 1301.0  # c was claimed at 700: 601 s ago
    assert sorted(registry.expired()) == ["a:5432/postgres", "c:5432/postgres"]


def test_auth_modules_alone_make_a_configuration_and_bad_ones_name_their_path() -> None:
    settings = load_settings(raw={"auth_modules": {"mon": {"user": "pgvitals", "password_env": "PW"}},
                                  "dynamic_target_ttl": "5m"}, environ={"PW": "x"})
    assert settings.auth_modules["mon"].sslmode == "prefer" and settings.dynamic_target_ttl == 300
    assert settings.max_dynamic_targets == 100
    with pytest.raises(ConfigError) as error:
        load_settings(raw={"auth_modules": {"mon": {"user": "pgvitals", "password_env": "PW", "sslmode": "on",
                                                    "options": {"host": "x"}}},
                           "max_dynamic_targets": -1}, environ={})
    problems = error.value.problems
    assert any(p.startswith("auth_modules.mon.sslmode: expected one of disable") for p in problems), problems
    assert any(p.startswith("auth_modules.mon.options: 'host' is not an option here") for p in problems), problems
    assert any(p.startswith("auth_modules.mon.password_env: environment variable PW is not set") for p in problems)
    assert any(p.startswith("max_dynamic_targets: Input should be greater than or equal to 0") for p in problems)
    with pytest.raises(ConfigError) as error:
        load_settings(raw={"auth_modules": {"mon": {"user": "pgvitals", "password_env": "PW",
                                                    "password_command": "aws rds generate-db-auth-token"}}},
                      environ={"PW": "x"})
    assert any(p.startswith("auth_modules.mon.password_command: expected a list of arguments")
               for p in error.value.problems), error.value.problems
    assert "auth_modules.mon.password_command: give either password_command or password_env" in error.value.problems
    with pytest.raises(ConfigError) as error:
        load_settings(raw={}, environ={})
    assert error.value.problems == ["targets: at least one target (or pgbouncer, or auth module for /probe) is needed"]
