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
