"""The README's commands are the ones CI runs."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read().strip().splitlines()[-1]
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert ci.startswith("python3 -m venv .venv && ") and "pytest" in ci
    assert ci in readme.splitlines(), "README.md must show .ci/run's command verbatim"


def test_readme_quickstart_command_uses_the_shipped_config():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "fedjax-lite run configs/quickstart.yaml --out runs/quick" in readme
    assert os.path.exists(os.path.join(ROOT, "configs", "quickstart.yaml"))


def test_readme_python_snippets_run(tmp_path):
    """The engine snippet and the DP snippet each run as written, on their own."""
    import re
    import subprocess
    import sys
    readme = open(os.path.join(ROOT, "README.md")).read()
    snippets = re.findall(r"```python\n(.*?)```", readme, re.S)[:2]
    for i, code in enumerate(snippets):
        script = tmp_path / f"snippet{i}.py"
        script.write_text(code + "\nprint('OK')\n")
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=300, cwd=str(tmp_path))
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().endswith("OK")
        assert "failed to converge" not in out.stderr
