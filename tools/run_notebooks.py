"""Re-execute the example notebooks in place at their full budget and store the outputs.

    OMP_NUM_THREADS=1 python tools/run_notebooks.py            # both notebooks
    OMP_NUM_THREADS=1 python tools/run_notebooks.py examples/unet_segmentation.ipynb

(``make notebooks``). One CPU thread: on a shared 2-core machine two torch threads train
several times slower. ``tests/test_notebooks.py`` checks that the stored outputs are
consistent with what the notebooks compute.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("examples/resnet18_classification.ipynb", "examples/unet_segmentation.ipynb")


def run(path: Path) -> float:
    """Execute ``path`` in its folder and write it back with its outputs; seconds."""
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=3600, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    _state_wall_time(nb)
    nbformat.write(nb, path)
    return time.perf_counter() - start


def _state_wall_time(nb) -> None:
    """Write the wall time the run printed ("notebook wall time: N s (full budget") into
    the markdown's "Full-budget wall time: **...**" (tests/test_notebooks.py checks both
    agree)."""
    printed = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    found = re.search(r"notebook wall time: (\d+) s \(full budget", printed)
    if found is None:
        return
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = re.sub(
                r"Full-budget wall time: \*\*[^*]*\*\*",
                f"Full-budget wall time: **{found[1]} s**",
                cell.source,
            )


def main(paths: list[str]) -> None:
    for name in paths or NOTEBOOKS:
        path = (ROOT / name).resolve()
        print(f"{name}: executed in {run(path):.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
