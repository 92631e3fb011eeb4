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
    """The engine snippet and the DP snippet run as written (the DP one after it, with its
    elided loop filled in by the loop the README shows)."""
    import re
    import subprocess
    import sys
    readme = open(os.path.join(ROOT, "README.md")).read()
    engine, dp = re.findall(r"```python\n(.*?)```", readme, re.S)[:2]
    loop = ("for r in range(rounds):\n"
            "    state, metrics = round_fn(state, data, round_key(root, r))\n"
            "    assert float(metrics['sampling_overflow']) == 0\n#")
    assert "# ... run `rounds` rounds as above" in dp
    script = tmp_path / "snippets.py"
    script.write_text(engine + "\n" + dp.replace("# ... run `rounds` rounds as above", loop)
                      + "\nprint('OK')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("OK")
    assert "failed to converge" not in out.stderr
