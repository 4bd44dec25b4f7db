"""`.env.example` lists exactly the environment variables the portal reads, each with its default.

The reads are found in the source rather than by running the settings: every call of `os.getenv`,
`os.environ.get`, `os.environ[...]` and the `portal/env.py` helpers in the portal's packages, so a new
setting (in `config/settings.py`, a management command or an app) fails here until it is in the example.
"""

import ast
from pathlib import Path

from portal.env import _FALSE, _TRUE

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("config", "portal", "hypervisors", "machines")
HELPERS = {"envbool", "envint", "envlist", "envsecret"}  # portal/env.py; envsecret also reads NAME_FILE
NO_DEFAULT = object()  # a read whose default is not a literal string (computed, or none at all)


def _env_call(node: ast.Call) -> str | None:
    """Which kind of environment read the call is: "getenv", a helper's name, or None."""
    f = node.func
    if isinstance(f, ast.Name) and f.id in HELPERS:
        return f.id
    if isinstance(f, ast.Attribute) and f.attr in HELPERS and isinstance(f.value, ast.Name) and f.value.id == "env":
        return f.attr
    if isinstance(f, ast.Attribute) and f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id == "os":
        return "getenv"
    if isinstance(f, ast.Attribute) and f.attr == "get" and _is_os_environ(f.value):
        return "getenv"
    return None


def _is_os_environ(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and getattr(node.value, "id", "") == "os"


def reads_in(source: str, where: str) -> tuple[dict[str, list[tuple[str, object]]], list[str]]:
    """{variable: [(helper, literal default or NO_DEFAULT)]} of the reads in `source`, and the places
    that read a variable whose name is not a literal (which this test could not check)."""
    reads: dict[str, list[tuple[str, object]]] = {}
    opaque = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and (kind := _env_call(node)):
            name, default = (node.args + [None, None])[:2]
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                opaque.append(f"{where}:{node.lineno}")
                continue
            literal = isinstance(default, ast.Constant) and isinstance(default.value, str)
            reads.setdefault(name.value, []).append((kind, default.value if literal else NO_DEFAULT))
            if kind == "envsecret":
                reads.setdefault(f"{name.value}_FILE", []).append(("getenv", NO_DEFAULT))
        elif isinstance(node, ast.Subscript) and _is_os_environ(node.value) and isinstance(node.ctx, ast.Load):
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                reads.setdefault(node.slice.value, []).append(("getenv", NO_DEFAULT))
            else:
                opaque.append(f"{where}:{node.lineno}")
    return reads, opaque


def portal_reads() -> tuple[dict[str, list[tuple[str, object]]], list[str]]:
    reads: dict[str, list[tuple[str, object]]] = {}
    opaque = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            found, unnamed = reads_in(path.read_text(), str(path.relative_to(ROOT)))
            for name, uses in found.items():
                reads.setdefault(name, []).extend(uses)
            # The helpers themselves take the name as an argument; their callers are what is checked.
            if path != ROOT / "portal" / "env.py":
                opaque += unnamed
    return reads, opaque


def example() -> dict[str, str]:
    entries: dict[str, str] = {}
    for number, line in enumerate((ROOT / ".env.example").read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and name == name.strip() and name.isidentifier(), f".env.example:{number}: not NAME=value: {line!r}"
        assert name not in entries, f".env.example:{number}: {name} is listed twice"
        entries[name] = value
    return entries


def test_the_scanner_sees_every_way_of_reading_the_environment():
    source = """
import os
from portal import env
from portal.env import envbool, envint, envlist, envsecret
A = os.getenv("A", "1")
B = os.environ.get("B")
C = os.environ["C"]
D = envbool("D", "False")
E = envint("E", "3")
F = envlist("F", "x,y")
G = envsecret("G", "")
H = env.envint("H", str(A))
I = os.getenv(f"{A}_X")
os.environ["NOT_A_READ"] = "1"
"""
    reads, opaque = reads_in(source, "snippet")
    assert set(reads) == {"A", "B", "C", "D", "E", "F", "G", "G_FILE", "H"}
    assert reads["A"] == [("getenv", "1")] and reads["D"] == [("envbool", "False")]
    assert reads["B"] == [("getenv", NO_DEFAULT)] and reads["H"] == [("envint", NO_DEFAULT)]
    assert opaque == ["snippet:13"]


def test_every_variable_the_portal_reads_is_in_the_example_and_nothing_else():
    reads, opaque = portal_reads()
    listed = example()
    assert not opaque, f"environment read with a computed name (name it literally so it can be checked): {opaque}"
    assert {"PORTAL_DATA_DIR", "PORTAL_SECRET_KEY", "DATABASE_URL", "PORTAL_ADMIN_USER"} <= set(reads)
    missing = sorted(set(reads) - set(listed))
    assert not missing, f"read by the portal but not in .env.example: {missing}"
    stale = sorted(set(listed) - set(reads))
    assert not stale, f"in .env.example but read nowhere in {', '.join(PACKAGES)}: {stale}"


def _same(kind: str, a: str, b: str) -> bool:
    if kind == "envbool":
        return (a.strip().lower() in _TRUE) == (b.strip().lower() in _TRUE) and {
            a.strip().lower(),
            b.strip().lower(),
        } <= (_TRUE | _FALSE)
    return a.strip() == b.strip()


def test_the_example_gives_each_literal_default():
    reads, _ = portal_reads()
    listed = example()
    wrong = [
        f"{name}: code {default!r}, example {listed[name]!r}"
        for name, uses in sorted(reads.items())
        if name in listed
        for kind, default in uses
        if isinstance(default, str) and not _same(kind, default, listed[name])
    ]
    assert not wrong, f".env.example gives other defaults than the code: {wrong}"
