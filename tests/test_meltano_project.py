"""meltano.yml agrees with what the tap reports (`--about`): settings, kinds, secrets, capabilities.

Fast: reads meltano.yml with a YAML parser and runs `tap-invoca-destinations --about`;
no Meltano run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
import yaml  # PyYAML comes with meltano; no stubs locked
from helpers import ROOT, clean_env

# Meltano's allowed extractor capabilities; the SDK reports the same names.
MELTANO_CAPABILITIES = {
    "properties", "catalog", "discover", "state", "about", "stream-maps", "activate-version",
    "batch", "test", "log-based", "schema-flattening", "structured-logging",
}  # fmt: skip


def _types(schema: dict[str, t.Any]) -> set[str]:
    kind = schema.get("type", [])
    return ({kind} if isinstance(kind, str) else set(kind)) - {"null"}


def expected_kind(schema: dict[str, t.Any]) -> str:
    """The Meltano `kind` that matches a JSON schema property."""
    types = _types(schema)
    assert len(types) == 1, schema
    [json_type] = types
    if json_type == "string":
        if "enum" in schema:
            return "options"
        if schema.get("format") == "date-time":
            return "date_iso8601"
        return "string"
    return {
        "integer": "integer",
        # Meltano 4's `decimal` cannot come from an env var (a Decimal it cannot
        # serialise) and `config set` writes `!!float '30'`; the tap reads the string.
        "number": "string",
        "boolean": "boolean",
        "object": "object",
        "array": "array",
    }[json_type]


@pytest.fixture(scope="module")
def about() -> dict[str, t.Any]:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tap-invoca-destinations"), "--about", "--format=json"],
        capture_output=True, text=True, check=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def project() -> dict[str, t.Any]:
    return yaml.safe_load((ROOT / "meltano.yml").read_text(encoding="utf-8"))


def plugin(project: dict[str, t.Any], kind: str, name: str) -> dict[str, t.Any]:
    return next(p for p in project["plugins"][kind] if p["name"] == name)


@pytest.fixture(scope="module")
def extractor(project: dict[str, t.Any]) -> dict[str, t.Any]:
    return plugin(project, "extractors", "tap-invoca-destinations")


def test_every_setting_the_tap_accepts_is_declared_and_no_other(
    about: dict[str, t.Any], extractor: dict[str, t.Any]
) -> None:
    declared = [s["name"] for s in extractor["settings"]]
    assert len(declared) == len(set(declared)), "a setting is declared twice"
    assert set(declared) == set(about["settings"]["properties"])


def test_builtin_sdk_settings_are_declared_with_their_kinds(extractor: dict[str, t.Any]) -> None:
    kinds = {s["name"]: s["kind"] for s in extractor["settings"]}
    assert kinds["stream_maps"] == "object"
    assert kinds["stream_map_config"] == "object"
    assert kinds["batch_config"] == "object"
    assert kinds["faker_config"] == "object"
    assert kinds["flattening_enabled"] == "boolean"
    assert kinds["flattening_max_depth"] == "integer"
    assert kinds["emit_activate_version_messages"] == "boolean"


def test_setting_kinds_labels_defaults_and_secrets_agree_with_the_tap(
    about: dict[str, t.Any], extractor: dict[str, t.Any]
) -> None:
    properties = about["settings"]["properties"]
    for setting in extractor["settings"]:
        name = setting["name"]
        schema = properties[name]
        assert setting["kind"] == expected_kind(schema), name
        assert setting.get("label"), name
        assert setting.get("description"), name
        assert bool(setting.get("sensitive")) == bool(schema.get("secret")), name
        assert setting["kind"] != "password", f"{name}: kind password is deprecated"
        if "enum" in schema:
            assert [o["value"] for o in setting["options"]] == schema["enum"], name
        if "value" in setting or "default" in schema:
            assert setting.get("value") == schema.get("default"), name


def test_required_settings_are_one_validation_group(
    about: dict[str, t.Any], extractor: dict[str, t.Any]
) -> None:
    [group] = extractor["settings_group_validation"]
    assert set(group) == set(about["settings"]["required"])


def test_capabilities_are_those_the_tap_reports(
    about: dict[str, t.Any], extractor: dict[str, t.Any]
) -> None:
    assert set(about["capabilities"]) <= MELTANO_CAPABILITIES
    assert len(extractor["capabilities"]) == len(set(extractor["capabilities"]))
    assert set(extractor["capabilities"]) == set(about["capabilities"])


def test_extractor_is_fully_defined(extractor: dict[str, t.Any]) -> None:
    assert extractor["namespace"] == "tap_invoca_destinations"
    assert extractor["pip_url"] == "-e ."
    assert extractor["executable"] == "tap-invoca-destinations"
    assert extractor["select"] == ["destinations.*"]


def test_variants_inherit_and_choose_their_replication(project: dict[str, t.Any]) -> None:
    base = plugin(project, "extractors", "tap-invoca-destinations")
    mirror = plugin(project, "extractors", "tap-invoca-destinations--mirror")
    incremental = plugin(project, "extractors", "tap-invoca-destinations--incremental")
    # The default pipeline reads the whole list (a complete CSV run after run).
    assert base["metadata"]["destinations"]["replication-method"] == "FULL_TABLE"
    assert mirror["inherit_from"] == "tap-invoca-destinations"
    assert mirror["metadata"]["destinations"]["replication-method"] == "FULL_TABLE"
    assert mirror["config"] == {"emit_activate_version_messages": True}
    assert incremental["inherit_from"] == "tap-invoca-destinations"
    assert incremental["metadata"]["destinations"] == {
        "replication-method": "INCREMENTAL",
        "replication-key": "updated_at",
    }


def test_loaders_install_without_meltano_hub(project: dict[str, t.Any]) -> None:
    names = [p["name"] for p in project["plugins"]["loaders"]]
    assert {"target-csv", "target-jsonl", "target-duckdb", "target-postgres"} <= set(names)
    for loader in project["plugins"]["loaders"]:
        assert loader.get("namespace"), loader["name"]
        assert loader.get("executable"), loader["name"]
        assert "variant" not in loader, loader["name"]
        for requirement in loader["pip_url"].split():
            assert "==" in requirement, (loader["name"], requirement)
        for setting in loader["settings"]:
            assert setting.get("kind"), (loader["name"], setting["name"])
        assert set(loader.get("config", {})) <= {s["name"] for s in loader["settings"]}, loader[
            "name"
        ]


def test_postgres_loader_acts_on_activate_version(project: dict[str, t.Any]) -> None:
    config = plugin(project, "loaders", "target-postgres")["config"]
    assert config["load_method"] == "upsert"
    assert config["activate_version"] is True
    assert config["add_record_metadata"] is True  # activate_version needs it
    assert config["hard_delete"] is False  # soft delete by default: _sdc_deleted_at


def test_csv_loader_rewrites_one_file(project: dict[str, t.Any]) -> None:
    config = plugin(project, "loaders", "target-csv")["config"]
    assert config["overwrite_behavior"] == "replace_file"
    assert config["file_naming_scheme"] == "{stream_name}.csv"
