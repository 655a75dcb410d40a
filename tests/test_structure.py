"""The repository's shape: small modules, short functions, no import loops, layers kept, references that resolve.

These read the source (ast and text), so they run in a second and fail as soon as a change breaks a rule.
"""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("spa", "tasks", "flows", "data")
INSTALLED_AS = {"tasks": "spa_tasks", "flows": "spa_flows"}  # folder -> import name (pyproject package-dir)
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LIBRARY = ("spa.config", "spa.errors", "spa.schemas", "spa.run", "spa.models", "spa.data", "spa.judges", "spa.training",
           "spa.evaluation")  # below the stages: never imports them, the demo, the CLI, the flows or Prefect
ABOVE_LIBRARY = ("spa.stages", "spa.demo", "spa_tasks", "spa_flows", "prefect")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def python_modules() -> dict[str, Path]:
    """Import name -> file of every first-party module (tasks/ and flows/ under their installed names)."""
    mods = {}
    for path in tracked_files():
        rel = path.relative_to(ROOT)
        if rel.suffix != ".py" or rel.parts[0] not in CODE_DIRS:
            continue
        parts = [INSTALLED_AS.get(rel.parts[0], rel.parts[0]), *rel.parts[1:]]
        parts[-1] = parts[-1][:-3]
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module a file imports (function-level imports too), as the most specific known module name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = python_modules()
    return {mod: {m for m in imports_of(path, known) if m in known and m != mod} for mod, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_loops():
    assert cycles(import_graph()) == []


def test_library_never_imports_upward():
    bad = []
    for mod, deps in import_graph().items():
        if mod.startswith(LIBRARY):
            bad += [f"{mod} -> {d}" for d in deps if d.startswith(ABOVE_LIBRARY)]
    for mod, path in python_modules().items():  # third-party names are not in the graph: read them directly
        if mod.startswith("spa") and not mod.startswith(("spa_tasks", "spa_flows")):
            bad += [f"{mod} -> prefect" for name in imports_of(path, {}) if name.split(".")[0] == "prefect"]
    assert bad == []


# The layers, lowest first: a module imports only modules of its own layer or of lower ones (function-level
# imports included). Same-layer imports are allowed (the judges' scoring and the training margin share Eq. 4).
# The `spa` command (spa_tasks.cli) starts the flows, so it sits above them.
LAYERS = (("spa.errors", "spa.schemas"), ("spa.config",), ("spa.run",), ("spa.models",),
          ("spa.data", "spa.judges", "spa.training", "spa.evaluation"), ("spa.stages",), ("spa.demo",),
          ("spa_tasks",), ("spa_flows",), ("spa_tasks.cli",))


def layer_of(module: str) -> int | None:
    """The layer of the most specific entry of :data:`LAYERS` that names ``module`` or a package above it."""
    found = [(len(n), k) for k, names in enumerate(LAYERS) for n in names if module == n or module.startswith(n + ".")]
    return max(found)[1] if found else None


def test_imports_only_go_down_the_layers():
    up = [f"{mod} -> {dep}" for mod, deps in import_graph().items() for dep in deps
          if layer_of(mod) is not None and layer_of(dep) is not None and layer_of(dep) > layer_of(mod)]
    assert up == []
    assert layer_of("spa.config.hub") == 1 and layer_of("spa.data.sources") == 4 and layer_of("spa_flows.steps") == 8
    assert layer_of("spa_tasks.cli") == 9 and layer_of("spa_tasks.stage_tasks") == 7


def test_stages_holds_stages_of_one_shape():
    """Every module of spa/stages/ is a stage: a module-level ``run(cfg, ...)`` returning a ``StageResult``, with no
    function nested inside it (the stage's body is a module-level function given to ``run_stage``)."""
    odd = []
    for mod, path in python_modules().items():
        if not mod.startswith("spa.stages.") or path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        runs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
        if not runs or ast.unparse(runs[0].returns) != "StageResult":
            odd.append(f"{mod}: no run(...) -> StageResult")
        elif any(isinstance(n, ast.FunctionDef | ast.Lambda) for n in ast.walk(runs[0]) if n is not runs[0]):
            odd.append(f"{mod}: run() defines a function inside it")
    assert odd == []


def test_modules_are_small():
    long = {str(p.relative_to(ROOT)): n for p in python_modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_functions_are_short():
    long = {}
    for path in python_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if (n := node.end_lineno - start + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert long == {}


def test_every_package_is_installed():
    """pyproject lists every folder with an ``__init__.py`` (a non-editable install would miss the others)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, p in python_modules().items() if p.name == "__init__.py" and not m.startswith("data")}
    assert packages == listed


_PATH_REF = re.compile(r"(?<![\w./<>\"-])((?:spa|tasks|flows|tests|bench|docs|configs|data|docker)/[\w./-]*\w)")
NOT_YET_WRITTEN = {"bench/results/p7_gpu.json"}  # written by a benchmark that needs a GPU (none lent so far)


def references(text: str) -> set[str]:
    """Repository paths a text names (``spa/run/layout.py``, ``docs/algorithm.md``, ``configs/demo.yaml``)."""
    return {m.rstrip(".") for m in _PATH_REF.findall(text)}


def test_reference_finder():
    text = ("see `docs/algorithm.md`, spa/run/layout.py: and runs/demo/run (not ours), data/ and x/spa/y.py, "
            "<run>/data/seed.parquet, a package's \"tasks/alpaca_eval/x.json\"")
    assert references(text) == {"docs/algorithm.md", "spa/run/layout.py"}


def test_every_reference_resolves_inside_the_repository():
    outside = "../" + "shared"  # spelled apart so this file does not name it
    missing, pointers_out = [], []
    for path in tracked_files():
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".sh"} and path.name != "run":
            continue
        if path == Path(__file__).resolve():  # names missing paths on purpose (the finder's own tests)
            continue
        text = path.read_text(errors="replace")
        if outside in text:
            pointers_out.append(str(path.relative_to(ROOT)))
        for ref in references(text):
            if not (ROOT / ref).exists() and ref not in NOT_YET_WRITTEN:
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert pointers_out == []
    assert missing == []


def readme_tree() -> list[str]:
    """The folders and files the README's architecture tree names (``spa/run/``, ``spa/config/``...)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Architecture", 1)[1].split("```", 2)[1]
    paths, parents = [], []
    for line in block.splitlines()[1:]:
        m = re.match(r"^([ │├└─]*)(\S+/?)", line)
        if not m or not m.group(2).strip():
            continue
        depth = len(m.group(1)) // 4
        parents = parents[:depth] + [m.group(2)]
        paths.append("".join(parents))
    return paths


def test_readme_tree_matches_the_folders():
    named = readme_tree()
    assert named, "README's architecture section has no tree"
    assert [p for p in named if not (ROOT / p).exists()] == []
    folders = {f"spa/{p.name}/" for p in (ROOT / "spa").iterdir() if (p / "__init__.py").exists()}
    top = {f"{p.name}/" for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
           and p.name not in {"runs", "__pycache__"} and not p.name.endswith(".egg-info")}
    assert sorted((folders | top) - set(named)) == []


@pytest.mark.parametrize("bad", ["spa/nothing_here.py", "docs/missing.md"])
def test_a_missing_reference_is_caught(bad):
    assert not (ROOT / bad).exists() and references(f"see {bad}") == {bad}


def test_every_bench_script_compiles():
    """A benchmark runs for hours in the background: a syntax error (a ``global`` after a use, say) must show
    here, not when its turn comes."""
    scripts = sorted((ROOT / "bench").glob("*.py"))
    assert scripts
    for path in scripts:
        compile(path.read_text(), str(path), "exec")

