"""The README's layout lists every module of the project, so a newcomer finds a behaviour from the map."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("config", "workflows", "labs", "metrics", "machines", "hypervisors", "portal")


def layout() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Layout, top to bottom")
    return readme[start : readme.index("```", readme.index("```", start) + 3)]


def test_the_readme_layout_names_every_module():
    text = layout()
    named = set(re.findall(r"[\w.]+\.py\b", text))
    missing = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts or path.name in ("__init__.py", "apps.py"):
                continue
            if path.parent.name == "commands":  # commands are listed by name
                if path.stem not in text:
                    missing.append(str(path.relative_to(ROOT)))
            elif path.name not in named:
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"README layout does not name: {missing}"
    for package in PACKAGES:
        assert re.search(rf"^{package}/", text, re.M), package
