"""Authoring aid: turn a jupytext percent-format script into a clean source notebook.

    .venv/bin/python tools/nb.py draft.py nbs/01_data.ipynb      # write the notebook
    .venv/bin/python tools/nb.py nbs/01_data.ipynb draft.py      # and back, to edit as text

The notebook stays the source of truth; the .py draft is scratch and is not committed.
"""
import subprocess, sys
from pathlib import Path

import jupytext

KERNELSPEC = {"display_name": "expert-lab", "language": "python", "name": "expert-lab"}


def _keep_ids(nb, old):
    "Reuse the old notebook's cell ids (same source first, else same position) so exports don't churn."
    by_src = {}
    for c in old.cells: by_src.setdefault(c.source, c.id)
    used = set()
    for c in nb.cells:
        if by_src.get(c.source) not in (None, *used): c.id = by_src[c.source]; used.add(c.id)
    for i, c in enumerate(nb.cells):
        if c.id not in used and i < len(old.cells) and old.cells[i].id not in used: c.id = old.cells[i].id; used.add(c.id)


def to_notebook(src: Path, dst: Path):
    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata = {"kernelspec": KERNELSPEC}
    if dst.exists(): _keep_ids(nb, jupytext.read(dst))
    jupytext.write(nb, dst, fmt="ipynb")
    subprocess.run([str(Path(sys.executable).with_name("nbdev-clean")), "--fname", str(dst)], check=True)


def to_script(src: Path, dst: Path):
    nb = jupytext.read(src)
    nb.metadata.setdefault("jupytext", {})["notebook_metadata_filter"] = "-all"
    nb.metadata["jupytext"]["cell_metadata_filter"] = "tags,-all"
    jupytext.write(nb, dst, fmt="py:percent")


if __name__ == "__main__":
    src, dst = map(Path, sys.argv[1:3])
    (to_notebook if dst.suffix == ".ipynb" else to_script)(src, dst)
    print(f"wrote {dst}")
