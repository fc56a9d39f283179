"""Start-up: ``import monai`` through volumed leaves ``transformers`` and ``scipy.signal`` unimported
(volumed/_startup.py),
and ``volumed --help`` imports neither torch nor MONAI. Checked in fresh interpreters, whose
``sys.modules`` is what a user's process would have."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _modules_after(code: str, **env: str) -> dict:
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if '.' not in m)))\n"
    import os

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return {"modules": set(json.loads(done.stdout.strip().splitlines()[-1])), "stdout": done.stdout}


def test_segment_path_imports_monai_without_transformers_and_transformers_still_works_after():
    out = _modules_after("""
        import volumed.inference.segment
        import sys
        assert "transformers" not in sys.modules, "importing the segment path imported transformers"
        assert "scipy.signal" not in sys.modules, "importing the segment path imported scipy.signal"
        import monai
        from monai.inferers import sliding_window_inference  # MONAI works as usual
        assert type(monai.__loader__).__name__ == "SourceFileLoader" and monai.__spec__.loader is monai.__loader__
        from transformers import AutoModel  # and both import normally afterwards
        from scipy.signal import hilbert
        print("imported", AutoModel.__name__, hilbert.__name__)
    """)
    assert "monai" in out["modules"] and "imported AutoModel hilbert" in out["stdout"]


def test_the_deferral_can_be_switched_off():
    out = _modules_after("import volumed.inference.segment\nimport sys\nprint('signal', 'scipy.signal' in sys.modules)",
                         VOLUMED_MONAI_FULL_IMPORT="1")
    # MONAI's own behaviour, so the checks above can fail.
    assert "transformers" in out["modules"] and "signal True" in out["stdout"]


def test_help_imports_neither_torch_nor_monai():
    out = _modules_after("""
        import sys
        from volumed.cli import app
        sys.argv = ["volumed", "--help"]
        try:
            app()
        except SystemExit as stop:
            assert stop.code == 0
    """)
    assert "segment" in out["stdout"]
    assert not {"torch", "monai", "transformers"} & out["modules"]
