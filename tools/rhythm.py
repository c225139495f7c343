"""How a notebook reads, in fastcore's rhythm: lines per exported code cell, definitions, test cells per definition.
Usage: .venv/bin/python tools/rhythm.py nbs/05_train.ipynb ...   (tests/test_house.py holds the floors)"""
import json, re, sys, ast
from pathlib import Path
TEST = re.compile(r"\b(test_eq|test_ne|test_fail|test_close|test_is|test_warns|test_stdout|assert)\b")
def rhythm(path):
    "Lines per exported code cell (non-blank, directives out), definitions in them, test cells after them."
    cells = [c for c in json.loads(Path(path).read_text())["cells"] if c["cell_type"] == "code"]
    exported, defs, tests = [], 0, 0
    for c in cells:
        src = "".join(c["source"])
        first = src.lstrip().splitlines()[0] if src.strip() else ""
        if re.match(r"#\|\s*export", first):
            lines = [l for l in src.splitlines() if l.strip() and not l.lstrip().startswith("#|")]
            exported.append(len(lines))
            try: tree = ast.parse(src)
            except SyntaxError: continue
            defs += sum(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) for n in tree.body)
        elif TEST.search(src): tests += 1
    return dict(lines_per_cell=sum(exported)/max(len(exported),1), defs=defs, tests=tests, tests_per_def=tests/max(defs,1), cells=len(exported))
if __name__ == "__main__":
  for p in sys.argv[1:]:
    r = rhythm(p); print(f"{Path(p).name:24} {r['lines_per_cell']:5.1f} lines/cell  {r['defs']:3} defs  {r['tests']:3} tests  {r['tests_per_def']:.2f} t/def  {r['cells']} cells")
