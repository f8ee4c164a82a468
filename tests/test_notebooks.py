"""Every notebook runs top to bottom (a cell that raises fails the test), and what it computes holds:
outputs identical to DynamicCache, prompt tokens reused, tenants kept apart (read from the lines the
notebook prints)."""

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def _reused(text: str, label: str) -> int:
    """The number in ``<label> reused [N]`` (one row)."""
    match = re.search(rf"{label}[^\n]*?reused \[(\d+)\]", text)
    assert match, f"no '{label} ... reused [N]' line in:\n{text}"
    return int(match.group(1))


def _check_quickstart(text: str) -> None:
    assert "turn 1 identical: True" in text and "turn 2 identical: True" in text
    assert _reused(text, "turn 1: prompt") == 0
    assert _reused(text, "turn 2: prompt") >= 320  # the whole first turn's prompt, in full blocks
    assert _reused(text, "call 2:") > 0


def _check_agent_loop(text: str) -> None:
    assert "same answers: True" in text
    turns = re.findall(r"reused +(\d+) \(ideal (\d+)[^)]*\) \| (identical|DIFFERENT)", text)
    assert len(turns) == 6 and all(verdict == "identical" for *_, verdict in turns), turns
    reused, ideal = sum(int(r) for r, _, _ in turns), sum(int(i) for _, i, _ in turns)
    assert all(int(r) <= int(i) for r, i, _ in turns) and reused >= 0.9 * ideal > 0


def _check_pool_internals(text: str) -> None:
    assert _reused(text, "tenant b") == 0  # another salt: nothing shared
    assert re.search(r"tenant a again reused \[(\d+)\]", text).group(1) == "192"
    rates = {int(c): float(r) for c, r in re.findall(r"capacity +(\d+) blocks: .*hit rate ([\d.]+)", text)}
    assert rates[256] > 0.5 and rates[16] < rates[256]  # reuse, and less of it in a small pool


CHECKS = {
    "01_quickstart.ipynb": _check_quickstart,
    "02_agent_loop.ipynb": _check_agent_loop,
    "03_pool_internals.ipynb": _check_pool_internals,
}


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2
    assert {p.name for p in NOTEBOOKS} <= set(CHECKS), "give each notebook a check in CHECKS"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    text += "".join(
        o.get("data", {}).get("text/plain", "") for o in outputs if o.output_type == "execute_result"
    )
    CHECKS[path.name](text)
