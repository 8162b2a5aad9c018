"""What the package and its documents tell a user to type works: every ``gw.<name>`` (after
``import gatewatch as gw``) resolves, every ``from gatewatch... import ...`` in a Python example imports, and
every ``gatewatch ...`` command in a bash example parses.

``gw.`` names are collected from every string in the package's source (remedy texts such as
``gatewatch.findings.REMEDY_TEXTS`` and ``NONFINITE_VALUE_REMEDY``, error messages, docstrings), from README.md
and from docs/*.md.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from gatewatch.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gatewatch"
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
GW_NAME = re.compile(r"(?<![\w.])gw\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
FENCE = re.compile(r"^\s*```\s*([\w-]*)")


def package_strings() -> dict[str, list[str]]:
    """Every string constant of every module of the package (f-string parts included), by file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        out[str(path.relative_to(REPO))] = [n.value for n in ast.walk(tree)
                                            if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return out


def gw_names() -> dict[str, list[str]]:
    """``gw.<dotted.name>`` -> where it is written (file, or file:line for documents)."""
    where: dict[str, list[str]] = defaultdict(list)
    for file, strings in package_strings().items():
        for text in strings:
            for name in GW_NAME.findall(text):
                where[name].append(file)
    for doc in DOCUMENTS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for name in GW_NAME.findall(line):
                where[name].append(f"{doc.relative_to(REPO)}:{number}")
    return dict(where)


def code_blocks(languages: set[str]) -> list[tuple[str, int, str]]:
    """``(document:line, line number, line)`` of each line inside a fenced block tagged with one of
    ``languages``; a line ending in a backslash is joined with the next one."""
    out = []
    for doc in DOCUMENTS:
        language, pending = None, ""
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            fence = FENCE.match(line)
            if fence:
                language = None if language is not None else fence.group(1)
                continue
            if language in languages:
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                out.append((f"{doc.relative_to(REPO)}:{number}", number, pending + line))
                pending = ""
    return out


GETATTR_CHAIN = """
import json, sys
import gatewatch as gw
failed = []
for name in json.loads(sys.argv[1]):
    obj = gw
    try:
        for part in name.split("."):
            obj = getattr(obj, part)
    except AttributeError as err:
        failed.append(f"gw.{name}: {err}")
print(json.dumps(failed))
"""

def example_imports() -> list[tuple[str, str, str]]:
    """``(module, name, document:line)`` of each ``from gatewatch... import name`` (and ``import gatewatch...``)
    in a Python example."""
    items = []
    for where, _, line in code_blocks({"python", "py"}):
        match = re.match(r"^\s*from\s+(gatewatch[\w.]*)\s+import\s+([^#(]+)", line)
        if match:
            items += [(match.group(1), name.split(" as ")[0].strip(), where)
                      for name in match.group(2).split(",") if name.strip()]
        match = re.match(r"^\s*import\s+(gatewatch[\w.]*)", line)
        if match:
            module, _, name = match.group(1).rpartition(".")
            items.append((module or match.group(1), name if module else "__name__", where))
    return items


def is_submodule(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


@pytest.fixture(scope="module")
def resolved() -> dict[str, list[str]]:
    """The ``gw.`` names that do not resolve, by group; each group is resolved in a fresh interpreter so that
    nothing the tests imported makes a name resolve, and the interpreters run at once.

    ``gw.<submodule>...`` names (``gw.remedies.GateDropout``) get an interpreter per submodule, where they are
    the first thing resolved: resolving another name first (``gw.GateWatch``) could import the submodule and
    make it an attribute of the package by accident. The other ``gw.`` names are resolved after them, in the
    first of these interpreters (importing a module never sets a class or function of the package)."""
    groups: dict[str, list[str]] = defaultdict(list)
    others = []
    for name in sorted(gw_names()):
        first = name.split(".")[0]
        if is_submodule(first):
            groups[first].append(name)
        else:
            others.append(name)
    if groups:
        groups[next(iter(groups))] += others
    else:
        groups[""] = others
    procs = {key: subprocess.Popen([sys.executable, "-c", GETATTR_CHAIN, json.dumps(names)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=REPO) for key, names in groups.items()}
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"gw.{key}...: {stderr[-3000:]}"
        out[key] = json.loads(stdout.strip().splitlines()[-1])
    return out


def test_the_scanner_finds_the_remedies_and_the_examples() -> None:
    names = gw_names()
    assert {"remedies.GateDropout", "remedies.GateFreezer", "remedies.UncertaintyWeighting"} <= set(names)
    assert GW_NAME.findall("use gw.remedies.GateDropout(0.1), not my.gw.x or gw_x") == ["remedies.GateDropout"]
    assert any(module == "gatewatch.ablation" for module, _, _ in example_imports())


@pytest.mark.slow
def test_every_gw_name_resolves_after_import_gatewatch_as_gw(resolved: dict[str, list[str]]) -> None:
    """``gw.a.b`` resolves by attribute access alone on ``import gatewatch as gw``, as a user types it."""
    where = gw_names()
    failed = [f for found in resolved.values() for f in found]
    assert not failed, "\n".join(
        f"{f} (written in {', '.join(dict.fromkeys(where[f.split(':')[0][3:]]))})" for f in failed)


def test_every_gatewatch_import_in_a_python_example_works() -> None:
    """Each ``from gatewatch.x import name`` of an example imports (``name`` may be a submodule, as Python's import
    allows); checked in this process, as importing more first cannot make such an import fail or succeed."""
    failed = []
    for module, name, where in example_imports():
        try:
            if not hasattr(importlib.import_module(module), name):
                importlib.import_module(f"{module}.{name}")
        except ImportError as err:
            failed.append(f"{where}: from {module} import {name}: {err}")
    assert not failed, "\n".join(failed)


def commands() -> list[tuple[str, list[str]]]:
    """``(document:line, argv)`` of each ``gatewatch ...`` line of a bash example (after an optional ``$``
    prompt; a trailing ``# comment`` left out; optional parts of a synopsis, ``[--port N]``, taken as given)."""
    out = []
    for where, _, line in code_blocks({"bash", "sh", "shell", "console"}):
        text = re.sub(r"^\s*\$\s+", "", line)
        if not re.match(r"^gatewatch\s", text):
            continue
        argv = shlex.split(text.replace("[", " ").replace("]", " "), comments=True)
        out.append((where, argv[1:]))
    return out


@pytest.mark.parametrize(("where", "argv"), commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_gatewatch_command_in_a_bash_example_parses(where: str, argv: list[str]) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        pytest.fail(f"{where}: `gatewatch {shlex.join(argv)}` does not parse (exit {stop.code})")
    assert callable(args.func)


def test_the_documents_show_each_subcommand() -> None:
    shown = {argv[0] for _, argv in commands()}
    assert {"report", "summarize", "dashboard", "ablate"} <= shown
