"""The README's test command is exactly what CI runs, and its main command names files that exist."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bash_blocks() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    test_command = _bash_blocks()[1]
    assert "pytest" in test_command and "\n" not in test_command
    ci_lines = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert test_command in ci_lines


def test_main_command_trains_the_quickstart_and_samples():
    main_command = _bash_blocks()[0]
    assert "dlm-jax train --config=configs/quickstart.py" in main_command and "dlm-jax sample" in main_command
    assert os.path.isfile(os.path.join(ROOT, "configs", "quickstart.py"))
