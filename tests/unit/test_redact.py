"""Unit tests of ``worker.redact``: passwords out of URLs, DSNs and free text."""

from __future__ import annotations

import pytest

from worker.redact import redact, redact_url, url_secrets


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:s3cret@host:6380", "rediss://:***@host:6380"),
        ("mysql://root:p%40ss@db:3306/shop", "mysql://root:***@db:3306/shop"),
        ("postgresql://app:pw@pg/db?sslmode=require", "postgresql://app:***@pg/db?sslmode=require"),
        # Unencoded "/", "?", "#" and "@" in a password must not leak any part of it.
        ("redis://u:ab/c?d#e@host:1/0", "redis://u:***@host:1/0"),
        ("redis://u:a@b@host", "redis://u:***@host"),
        # Query-string and libpq key/value passwords.
        ("redis://host/0?password=s3cret&db=1", "redis://host/0?password=***&db=1"),
        ("host=db user=app password=s3cret dbname=x", "host=db user=app password=*** dbname=x"),
        ("host=db password='two words' port=1", "host=db password=*** port=1"),
        ("postgresql://h/db?sslpassword=k", "postgresql://h/db?sslpassword=***"),
        # A URL inside a longer message.
        ("cannot reach redis://u:pw@h:1/0: refused", "cannot reach redis://u:***@h:1/0: refused"),
    ],
)
def test_redact_url_masks_the_password_and_keeps_the_user(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis://host:6379/0",
        "redis://user@host:6379/0",
        "rediss://host",
        "unix:///run/redis.sock?db=2",
        "/var/lib/cache-worker/checkpoint.json",
        "",
    ],
)
def test_redact_url_leaves_urls_without_password_alone(url: str) -> None:
    assert redact_url(url) == url


def test_redact_url_is_idempotent() -> None:
    once = redact_url("redis://u:pw@h/0?password=x")
    assert redact_url(once) == once


def test_ambiguous_url_loses_host_rather_than_password() -> None:
    # "@" only in the query: the password/host split is ambiguous, so the mask is wide.
    assert "s3cret" not in redact_url("redis://u:s3/cret@h/0?to=a@b")


def test_redact_replaces_every_occurrence_of_each_secret() -> None:
    text = "auth s3cret failed; retry with s3cret"
    assert redact(text, ["s3cret"]) == "auth *** failed; retry with ***"


def test_redact_masks_percent_encoded_forms() -> None:
    assert redact("redis://:p%40ss%2Fx@h and p@ss/x", ["p@ss/x"]) == "redis://:***@h and ***"


def test_redact_prefers_the_longest_secret() -> None:
    assert redact("abcdef", ["abc", "abcdef"]) == "***"


def test_redact_ignores_empty_and_missing_secrets() -> None:
    assert redact("nothing to hide", [None, ""]) == "nothing to hide"


def test_url_secrets_lists_the_password_and_its_pieces() -> None:
    secrets = url_secrets("redis://u:s3cret-Pa55/w0rd%40x@host:6379/0")
    assert "s3cret-Pa55/w0rd%40x" in secrets
    assert "s3cret-Pa55/w0rd@x" in secrets
    assert {"s3cret-Pa55", "w0rd%40x", "w0rd", "x"} <= set(secrets)
    assert url_secrets("redis://host:6379/0") == []
    assert url_secrets("redis://user@host") == []
