"""The README and docs/ agree with the code: the configuration table and the commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.cli import build_parser
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The README and the docs that the rest of it moved to (docs/api.md, science.md, ...).
DOCS = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
ROW = re.compile(r"^\| `(IWAE_[A-Z_]+)` \| `([^`]*)` \| (.+) \|$", re.MULTILINE)


def _rendered(default: object) -> str:
    if default is None:
        return "unset"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def test_configuration_table_lists_every_setting_with_its_default():
    documented = {name: default for name, default, _ in ROW.findall(README)}
    expected = {f"IWAE_{n.upper()}": _rendered(f.default) for n, f in Settings.model_fields.items()}
    assert documented == expected


CODE_BLOCKS = "\n".join(re.findall(r"^```bash\n(.*?)^```", DOCS, re.MULTILINE | re.DOTALL))
COMMANDS = re.findall(r"(?:^|\s)iwae ([a-z]+[^\n#&|]*)", CODE_BLOCKS, re.MULTILINE)


def test_the_readme_and_docs_show_the_service_commands():
    assert {c.split()[0] for c in COMMANDS} >= {"serve", "worker"}


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_in_code_blocks_parse(command):
    build_parser().parse_args(command.split())
