"""The token, in any form, appears in nothing the tap writes; odd tokens are tidied or refused."""

from __future__ import annotations

import json
import typing as t
from urllib.parse import quote, quote_plus

import pytest
from helpers import config_for, run_cli
from invoca_server import Faults

if t.TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from invoca_server import InvocaServer

DEBUG = {"LOGLEVEL": "DEBUG"}
ODD_TOKEN = "SECRET-'q\"b\\s/p+e=a&z%~"  # noqa: S105 - a marker with characters that get escaped


def forms(token: str) -> set[str]:
    """Every form a token is commonly printed in."""
    return {
        token,
        repr(token)[1:-1],
        json.dumps(token)[1:-1],
        json.dumps(token, ensure_ascii=False)[1:-1],
        quote(token, safe=""),
        quote_plus(token),
    }


def assert_nowhere(token: str, *outputs: str) -> None:
    for form in forms(token):
        for output in outputs:
            assert form not in output, f"the token appeared as {form!r}"


@pytest.mark.parametrize("suffix", ["\n", "\r\n", " ", "\t\n"])
def test_surrounding_whitespace_is_stripped(
    tmp_path: Path, make_server: Callable[..., InvocaServer], suffix: str
) -> None:
    server = make_server(50, token="SECRET-trailing-7c1e")  # noqa: S106
    run = run_cli(tmp_path, config_for(server, api_token=server.token + suffix), env=DEBUG)
    assert run.returncode == 0, run.stderr
    assert len(run.records) == 50
    assert_nowhere(server.token, run.stdout, run.stderr)
    assert_nowhere(server.token + suffix, run.stdout, run.stderr)


@pytest.mark.parametrize("token", ["SECRET\x01inner", "SECRET\ninner", "SECRET\x7finner"])
def test_control_characters_are_refused_in_one_line(
    tmp_path: Path, server: InvocaServer, token: str
) -> None:
    run = run_cli(tmp_path, config_for(server, api_token=token), env=DEBUG)
    assert run.returncode != 0
    assert "api_token" in run.stderr
    assert "control characters" in run.stderr
    assert "Traceback" not in run.stderr
    assert_nowhere(token, run.stdout, run.stderr)
    assert server.stats.requests == 0


@pytest.mark.parametrize("status", [None, 403, 500])
def test_an_odd_token_appears_in_no_form_at_debug(
    tmp_path: Path, make_server: Callable[..., InvocaServer], status: int | None
) -> None:
    faults = Faults(status_every={2: status}) if status else Faults()
    server = make_server(120, token=ODD_TOKEN, faults=faults)
    run = run_cli(tmp_path, config_for(server, page_size=50, max_tries=2), env=DEBUG)
    assert run.returncode == (0 if status is None else 1), run.stderr
    assert_nowhere(ODD_TOKEN, run.stdout, run.stderr)
    assert server.stats.token_in_url == 0
