"""``hf_kvpool.triton_kernels`` is ours, whatever top-level ``triton_kernels`` is importable.

The kernels live in the repository's top-level ``triton_kernels/`` folder but install as
``hf_kvpool.triton_kernels`` (package-dir mapping in pyproject.toml), because the top-level name is
taken by other distributions. These checks run in fresh interpreters, from a directory that is not
the repository root, so neither the test process's imports nor the working directory leak in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


def run_python(code: str, cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    # keep the caller's PYTHONPATH (made absolute: cwd changes) after the given entries
    inherited = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), *inherited])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_fake_top_level_triton_kernels_does_not_shadow_ours(tmp_path):
    fake = tmp_path / "fake"
    (fake / "triton_kernels").mkdir(parents=True)
    (fake / "triton_kernels" / "__init__.py").write_text("SENTINEL = 'fake top-level triton_kernels'\n")
    work = tmp_path / "work"
    work.mkdir()
    code = """
        import sys
        import hf_kvpool
        import hf_kvpool.triton_kernels as ours
        import triton_kernels
        assert hasattr(ours, "paged_gather") and hasattr(ours, "paged_scatter"), ours.__file__
        assert not hasattr(ours, "SENTINEL"), ours.__file__
        assert triton_kernels.SENTINEL == "fake top-level triton_kernels", triton_kernels.__file__
        assert sys.modules["triton_kernels"] is not ours
        print("ok", ours.__file__, triton_kernels.__file__)
    """
    proc = run_python(code, cwd=work, pythonpath=[fake])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(fake) in proc.stdout


def test_without_triton_hf_kvpool_imports_and_kernels_say_why(tmp_path):
    """With ``import triton`` failing, ``import hf_kvpool`` works and the kernels raise a clear ImportError."""
    code = """
        import sys

        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError(f"No module named {name!r} (blocked by test)")
                return None

        sys.meta_path.insert(0, NoTriton())
        import hf_kvpool
        import hf_kvpool.core.paging
        try:
            import hf_kvpool.triton_kernels
        except ImportError as exc:
            assert "needs Triton" in str(exc) and "backend='torch'" in str(exc), str(exc)
            print("ok")
        else:
            raise AssertionError("hf_kvpool.triton_kernels imported without triton")
    """
    proc = run_python(code, cwd=tmp_path, pythonpath=[])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "ok"
