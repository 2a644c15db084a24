"""The package's layering holds (import-linter's contract in pyproject.toml), and the code describes
what is true now rather than narrating which issue brought it."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_each_package_imports_only_from_the_layers_below_it():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_code_does_not_narrate_issues():
    pattern = re.compile(r"\(issue\b|issue: ", re.IGNORECASE)
    hits = [f"{path.relative_to(ROOT)}:{number}" for path in sorted((ROOT / "cspkv").rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
