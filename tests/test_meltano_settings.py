"""End to end: every numeric setting through `meltano config set` and through env vars."""

from __future__ import annotations

import json
import shutil
import typing as t

import pytest
from helpers import ROOT

# The session's plugins and this worker's .meltano (fixtures), shared with test_meltano.
from test_meltano import emitted_count, installed, meltano, project_env, sys_dir  # noqa: F401

from tap_invoca_destinations.tap import TapInvocaDestinations

if t.TYPE_CHECKING:
    from pathlib import Path

    from invoca_server import InvocaServer

pytestmark = pytest.mark.e2e

# Each numeric setting as a user types it, and what the tap must work with.
NUMERIC = {
    "page_size": ("40", 40),
    "max_concurrency": ("2", 2),
    "request_timeout": ("30", 30),
    "max_tries": ("3", 3),
    "max_retry_seconds": ("30", 30),
    "retry_initial_wait": ("0.5", 0.5),
}


@pytest.fixture
def settings_project(sys_dir: Path, tmp_path: Path) -> Path:  # noqa: F811 - the fixture
    """A copy of the project (`config set` changes meltano.yml) sharing the plugins."""
    root = tmp_path / "project"
    (root / "output").mkdir(parents=True)
    shutil.copy(ROOT / "meltano.yml", root / "meltano.yml")
    (root / ".meltano").symlink_to(sys_dir)  # as test_meltano's `project`
    return root


def tap_config(env: dict[str, str], project: Path) -> dict[str, t.Any]:
    """The settings the tap works with, from the config Meltano hands it."""
    dumped = meltano(env, "invoke", "--dump=config", "tap-invoca-destinations", cwd=project)
    return dict(TapInvocaDestinations(config=json.loads(dumped.stdout)).config)


def assert_runs_with_every_setting(
    env: dict[str, str], project: Path, server: InvocaServer
) -> None:
    config = tap_config(env, project)
    for name, (_, want) in NUMERIC.items():
        assert config[name] == want, name
    result = meltano(env, "run", "tap-invoca-destinations", "target-jsonl", cwd=project)
    assert emitted_count(result) == 250
    assert any("limit=41" in path for path in server.stats.paths)  # page_size reached the tap


def test_numeric_settings_through_meltano_config_set(
    settings_project: Path, server: InvocaServer
) -> None:
    project = settings_project
    env = project_env(project, server)
    for name, (text, _) in NUMERIC.items():
        result = meltano(env, "config", "set", "tap-invoca-destinations", name, text, cwd=project)
        assert "Unknown setting" not in result.stderr, name
    assert "!!" not in (project / "meltano.yml").read_text(encoding="utf-8")
    assert_runs_with_every_setting(env, project, server)


def test_numeric_settings_through_meltano_env_vars(
    settings_project: Path, server: InvocaServer
) -> None:
    project = settings_project
    env = project_env(project, server)
    env.update({f"TAP_INVOCA_DESTINATIONS_{n.upper()}": text for n, (text, _) in NUMERIC.items()})
    assert_runs_with_every_setting(env, project, server)
