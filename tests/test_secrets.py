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
    backslashed = token.replace("\\", "\\\\")
    return {
        token,
        repr(token)[1:-1],
        backslashed,  # inside the repr of a longer text ...
        backslashed.replace("'", "\\'"),  # ... that holds " as well
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
    # The page at start=49 always fails (by offset: "every 2nd request" let a retry
    # land on a good turn, depending on how the threads interleaved).
    faults = Faults(fail_starts=(49,), fail_status=status) if status else Faults()
    server = make_server(120, token=ODD_TOKEN, faults=faults)
    run = run_cli(tmp_path, config_for(server, page_size=50, max_tries=2), env=DEBUG)
    assert run.returncode == (0 if status is None else 1), run.stderr
    assert_nowhere(ODD_TOKEN, run.stdout, run.stderr)
    assert server.stats.token_in_url == 0


# --- Quoted bodies: redacted before they are escaped or cut --------------------

# One token with ' and \ (a page holding " makes repr escape its ' unlike repr(token)),
# one with " and \.
QUOTE_TOKENS = ["Tq'7x\\kZ-91ab/+&=%~", 'Tq"7x\\kZ-91ab/+&=%~']
CUT_AT = 292  # a quote is cut at 300 characters: the token starts 8 before the cut
QUOTED_BODIES = {
    # A page that is not JSON, holding both quote characters besides the token.
    "html page": (200, "<p class=\"note\" title='t'>token {token} here</p>"),
    "html page, token at the cut": (200, '<p class="n">' + "x" * (CUT_AT - 13) + "{token}</p>"),
    "JSON without data": (200, '{"note": "{token_json}", "q": "\'"}'),
    "403 errors": (403, '{"errors": {"invalid_data": "bad token {token_json}", "class": "X"}}'),
    "403 nested errors": (403, '{"errors": {"invalid_data": [{"token": "{token_json}"}]}}'),
    "403 errors, token at the cut": (
        403,
        '{"errors": {"invalid_data": "' + "y" * (CUT_AT - 14) + '{token_json}"}}',
    ),
    "403 not JSON, token at the cut": (403, '"' + "z" * (CUT_AT - 1) + "{token}"),
    "500 until retries run out": (500, '{"errors": {"handle": "ERR {token_json} \\" \'"}}'),
}


def assert_no_part(token: str, *outputs: str) -> None:
    """No form of the token, nor of any start of it from 4 characters on."""
    for size in range(4, len(token) + 1):
        assert_nowhere(token[:size], *outputs)


@pytest.mark.parametrize(
    ("token", "level"),
    [(QUOTE_TOKENS[0], "DEBUG"), (QUOTE_TOKENS[0], "INFO"), (QUOTE_TOKENS[0], "ERROR"),
     (QUOTE_TOKENS[1], "DEBUG")],
)  # fmt: skip
@pytest.mark.parametrize("body", list(QUOTED_BODIES))
def test_a_quoted_body_never_shows_the_token_escaped_or_cut(
    tmp_path: Path, make_server: Callable[..., InvocaServer], body: str, token: str, level: str
) -> None:
    status, text = QUOTED_BODIES[body]
    faults = Faults(body_every=1, body_status=status, body_text=text)
    server = make_server(120, token=token, faults=faults)
    settings = config_for(server, page_size=50, max_tries=2, max_concurrency=1)
    run = run_cli(tmp_path, settings, env={"LOGLEVEL": level})
    assert run.returncode == 1, run.stderr
    assert server.stats.statuses[status] >= 1
    failure = [line for line in run.stderr.splitlines() if "Sync failed" in line]
    assert len(failure) == 1, run.stderr
    # The quote reached the token: redacted, or cut where the token was.
    assert "<redacted>" in failure[0] or ("cut" in body and "…" in failure[0]), failure[0]
    assert_no_part(token, run.stdout, run.stderr)
