"""Check that meltano.yml and the README describe the tap as `--about` reports it.

- meltano.yml is valid YAML and defines the `tap-invoca-destinations` extractor;
- every capability it declares is one that `tap-invoca-destinations --about` reports;
- it declares every setting of the tap's own (the SDK's built-in settings may be
  left out), and no setting that `--about` does not know;
- boolean and integer settings have the matching `kind`, and the secret ones are
  `sensitive: true`;
- the README's Capabilities section lists exactly the capabilities `--about` reports.

Run by scripts/test (through pre-commit) and by the pre-commit hook. Exit 1 with one line per problem.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
NAME = "tap-invoca-destinations"
KINDS = {"boolean": {"boolean"}, "integer": {"integer"}}


def _about() -> dict:
    executable = shutil.which(NAME, path=str(Path(sys.executable).parent)) or NAME
    out = subprocess.run(  # noqa: S603 (our own executable, fixed arguments)
        [executable, "--about", "--format=json"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    return json.loads(out)


def _own_settings() -> set[str]:
    from tap_invoca_destinations.tap import TapInvocaDestinations  # noqa: PLC0415

    return set(TapInvocaDestinations.config_jsonschema["properties"])


def _types(schema: dict) -> set[str]:
    found = schema.get("type", [])
    types = {found} if isinstance(found, str) else set(found)
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        types |= _types(option)
    return types - {"null"}


def _readme_capabilities() -> set[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Capabilities\n", 1)[-1].split("\n## ", 1)[0]
    bullets = [line for line in section.splitlines() if line.startswith("- `")]
    return {name for line in bullets for name in re.findall(r"`([a-z-]+)`", line.split(":")[0])}


def main() -> int:
    """Compare meltano.yml and README.md with `--about`; print problems, return the exit code."""
    project = yaml.safe_load((ROOT / "meltano.yml").read_text(encoding="utf-8"))
    extractors = (project.get("plugins") or {}).get("extractors") or []
    entry = next((e for e in extractors if e.get("name") == NAME), None)
    if entry is None:
        print(f"meltano.yml: no extractor named {NAME}")
        return 1

    about = _about()
    props = about["settings"]["properties"]
    problems = []

    extra = set(entry.get("capabilities") or []) - set(about["capabilities"])
    problems += [f"capability {c!r} is not reported by --about" for c in sorted(extra)]

    declared = {s["name"]: s for s in entry.get("settings") or []}
    problems += [f"setting {n!r} is not in --about" for n in sorted(set(declared) - set(props))]
    problems += [f"setting {n!r} is not declared" for n in sorted(_own_settings() - set(declared))]

    for name, setting in declared.items():
        schema = props.get(name)
        if schema is None:
            continue
        types = _types(schema)
        for json_type, kinds in KINDS.items():
            if types == {json_type} and setting.get("kind") not in kinds:
                problems.append(
                    f"setting {name!r} is {json_type} but has kind {setting.get('kind')!r}"
                )
        if schema.get("secret") and not setting.get("sensitive"):
            problems.append(f"setting {name!r} is secret but not `sensitive: true`")

    messages = [f"meltano.yml: {problem}" for problem in problems]
    listed = _readme_capabilities()
    reported = set(about["capabilities"])
    messages += [
        f"README.md: Capabilities lists {c!r}, which --about does not report"
        for c in sorted(listed - reported)
    ]
    messages += [
        f"README.md: Capabilities misses {c!r}, which --about reports"
        for c in sorted(reported - listed)
    ]
    for message in messages:
        print(message)
    return 1 if messages else 0


if __name__ == "__main__":
    sys.exit(main())
