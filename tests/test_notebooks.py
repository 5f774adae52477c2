"""The notebooks run: every code cell of each, in order, in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_run(notebook, tmp_path):
    cells = json.loads(notebook.read_text())["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    script = tmp_path / "notebook.py"
    # A kernel never exits after the cells; ending the process without interpreter
    # teardown keeps Arrow's thread-pool exit abort (apache/arrow#34314) out of the result.
    code += "\n\nimport os, sys\nsys.stdout.flush()\nsys.stderr.flush()\nos._exit(0)"
    script.write_text("if __name__ == '__main__':\n" + "\n".join("    " + line for line in code.splitlines()))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
