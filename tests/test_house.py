"""The shape of the package, held by tests: imports form no cycle, no module imports another's private names, every
module stays a readable size, and the training loop reads in one sitting."""
import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1]/"expert_lab"


def _modules():
    out = {}
    for p in PKG.rglob("*.py"):
        if p.name == "_modidx.py": continue
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name, path, mods):
    "(module imported, names taken from it) for every `from ... import` in `path`, function bodies included."
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom): continue
        base = node.module or ""
        if node.level:
            up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
            base = ".".join(up + ([node.module] if node.module else []))
        if not base.startswith("expert_lab"): continue
        for a in node.names:
            target = f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
            yield target, a.name


def test_no_import_cycle():
    mods = _modules()
    graph = defaultdict(set)
    for name, path in mods.items():
        for target, _ in _imports(name, path, mods):
            if target in mods and target != name and not target.startswith(name + "."): graph[name].add(target)
    state, cycles = {}, []
    def visit(n, path):
        state[n] = "open"
        for m in graph[n]:
            if state.get(m) == "open": cycles.append(path[path.index(m):] + [m])
            elif m not in state: visit(m, path + [m])
        state[n] = "done"
    for n in mods:
        if n not in state: visit(n, [n])
    assert cycles == []


def test_no_private_names_across_modules():
    mods = _modules()
    leaks = [(name, f"{t}.{n}") for name, path in mods.items() for t, n in _imports(name, path, mods)
             if n.startswith("_") and t != name and not (t.startswith(name + ".") or name.startswith(t + "."))]
    assert leaks == []


def test_modules_stay_readable():
    big = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert {n: k for n, k in big.items() if k > 400} == {}


def test_the_training_loop_reads_in_one_sitting():
    tree = ast.parse((PKG/"train.py").read_text())
    [fn] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert fn.end_lineno - fn.lineno + 1 <= 50


def _reach(start, mods):
    "Every package module `start` imports, directly or through others (function bodies included)."
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        for target, _ in _imports(n, mods[n], mods):
            if target in mods and target not in seen: seen.add(target); todo.append(target)
    return seen


def _third_party(path):
    "Top-level names of the non-package modules `path` imports, function bodies included."
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module: out.add(node.module.split(".")[0])
    return out


def test_the_kernel_side_knows_nothing_of_the_parent():
    "What the runbook runs inside its kernel reaches neither papermill nor the parent's module, however deep."
    mods = _modules()
    reach = _reach("expert_lab.notebook_run", mods) | {"expert_lab.notebook_run"}
    assert "expert_lab.execute" not in reach
    parent_libs = {"papermill", "nbconvert", "nbclient", "jupyter_client"}
    assert {n: sorted(_third_party(mods[n]) & parent_libs) for n in reach if _third_party(mods[n]) & parent_libs} == {}


def test_the_runbook_imports_only_the_kernel_side():
    import json
    cells = json.loads((PKG.parent/"nbs"/"train_expert.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "from expert_lab.notebook_run import" in code and "expert_lab.execute" not in code


def test_the_training_loop_knows_only_training():
    "train.py reaches no distillation, nor the layers a student looks its teachers up with, however deep (function bodies too)."
    reach = _reach("expert_lab.train", _modules())
    assert "expert_lab.distill" not in reach
    above = {"ensemble", "catalog", "runs", "preflight", "cli", "execute", "notebook_run", "sweeps", "slurm", "lock",
             "tracking", "labbook", "tune"}
    assert reach.isdisjoint({f"expert_lab.{m}" for m in above})


def _rhythm():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rhythm", PKG.parent/"tools"/"rhythm.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod.rhythm


# the notebooks issue 24 named, and their floors: fastcore's 01_basics reads at 7.1 lines per exported cell and
# 1.18 test cells per definition
RHYTHM = ["05_train", "08_cli", "06f_execute", "06h_notebook_run", "07a_sweeps", "06b_ensemble", "03_augment",
          # and the notebooks written since, in that rhythm from the start
          "00b_signals", "00c_flags", "06i_labbook", "07c_tune", "07d_studies", "04_models", "06a_plots"]

@pytest.mark.parametrize("name", RHYTHM)
def test_notebooks_read_one_function_at_a_time(name):
    r = _rhythm()(PKG.parent/"nbs"/f"{name}.ipynb")
    assert r["lines_per_cell"] <= 15, f"{name}: {r['lines_per_cell']:.1f} lines per exported cell (floor 15)"
    assert r["tests_per_def"] >= 0.8, f"{name}: {r['tests_per_def']:.2f} test cells per definition (floor 0.8)"


def test_the_rhythm_counts_what_it_says():
    "A made-up notebook: two exported cells of 2 and 4 lines, 3 definitions, 2 test cells, one example cell."
    import json, tempfile
    cell = lambda src: dict(cell_type="code", source=src, metadata={}, outputs=[], execution_count=None)
    nb = dict(cells=[cell("#| export\ndef f(x): return x\n\ng = 1"), cell("f(2)"), cell("test_eq(f(2), 2)"),
                     cell("#| export\nclass A:\n    pass\n\ndef h(): pass\n# why"), cell("assert h() is None")],
              metadata={}, nbformat=4, nbformat_minor=5)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)/"x.ipynb"; p.write_text(json.dumps(nb))
        r = _rhythm()(p)
    assert (r["lines_per_cell"], r["defs"], r["tests"], r["cells"]) == (3.0, 3, 2, 2)
