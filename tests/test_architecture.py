"""The package's shape: no import cycles, a pool core that never reaches transformers, small modules.

Imports are read from the source (imports inside functions count), so a cycle or a dependency
hidden in a function body is found without running it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hf_kvpool"
MAX_LINES = 400


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):  # installed as hf_kvpool.triton_kernels
        stem = path.stem
        files["hf_kvpool.triton_kernels" + ("" if stem == "__init__" else f".{stem}")] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports anywhere in its source (package-internal names resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            for alias in node.names:  # `from . import x` imports the submodule x
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(edges.get(node, ()))
    return seen


def test_no_import_cycle():
    edges = graph()
    internal = {n: {m for m in deps if m in edges} for n, deps in edges.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(internal[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(internal):
        if node not in state:
            visit(node, [node])


def test_the_pool_core_never_reaches_transformers():
    edges = graph()
    for core in [n for n in edges if n.startswith("hf_kvpool.core")]:
        reached = closure(core, edges)
        assert not any(m.split(".")[0] == "transformers" for m in reached), (core, sorted(reached))
        assert not any(m.startswith("hf_kvpool.hf") for m in reached), (core, sorted(reached))


def test_no_module_over_400_lines():
    for name, path in module_files().items():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_the_pool_runs_with_transformers_unimportable(tmp_path):
    code = """
        import sys

        class NoTransformers:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError(f"No module named {name!r} (blocked by test)")
                return None

        sys.meta_path.insert(0, NoTransformers())
        import torch
        from hf_kvpool import KVPool
        from hf_kvpool.core.hashing import block_hashes

        pool = KVPool(block_size=4, capacity_bytes=1 << 20)
        k = torch.randn(1, 2, 8, 16)
        chain = block_hashes(list(range(8)), 4, b"ns")
        assert pool.commit(chain, 0, [k, k], 0, 0) == 2
        fetched = pool.fetch([chain], [0], 8, 7)
        assert fetched.columns == 7 and torch.equal(fetched.streams[0][:, :, :7], k[:, :, :7])
        assert "transformers" not in sys.modules
        print("ok")
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "ok"


def test_pyproject_lists_every_package():
    """A package missing from pyproject's list is missing from the wheel (editable installs hide it)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(path.parent.relative_to(ROOT).parts) for path in PACKAGE.rglob("__init__.py")} | {
        "hf_kvpool.triton_kernels"
    }
    assert packages == listed, (
        f"pyproject.toml [tool.setuptools] packages: add {sorted(packages - listed)}, drop {sorted(listed - packages)}"
    )
