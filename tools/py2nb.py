"""Authoring aid: turn a percent-format script (``# %%`` code cells, ``# %% [markdown]`` text cells) into a
clean notebook with no outputs. A cell opened with ``# %% tags=["parameters"]`` becomes papermill's
parameters cell.

    python tools/py2nb.py notebooks/src/00_procedural_heads.py notebooks/00_procedural_heads.ipynb
"""

import json
import re
import sys

import nbformat


def convert(src: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    cells, kind, tags, buf = [], None, [], []

    def flush():
        if kind is None:
            return
        text = "\n".join(buf).strip("\n")
        if not text:
            return
        if kind == "markdown":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            c = nbformat.v4.new_code_cell(text)
            if tags:
                c.metadata["tags"] = tags
            cells.append(c)

    for line in src.splitlines():
        m = re.match(r"^# %%(.*)$", line)
        if m:
            flush()
            rest = m.group(1)
            kind = "markdown" if "[markdown]" in rest else "code"
            t = re.search(r"tags=(\[.*\])", rest)
            tags = json.loads(t.group(1)) if t else []
            buf = []
        else:
            buf.append(line)
    flush()
    for c in cells:
        c.pop("id", None)
    nb.cells = cells
    nb.nbformat, nb.nbformat_minor = 4, 4
    return nb


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    nb = convert(open(src).read())
    with open(dst, "w") as f:
        nbformat.write(nb, f)
    print(f"{dst}: {len(nb.cells)} cells")
