"""The README's commands and CI's agree, so CI runs exactly what a new user runs."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (REPO_ROOT / "README.md").read_text()
    top = readme.split("## Layout")[0]
    blocks = [b.strip() for b in _bash_blocks(top)]
    assert len(blocks) == 2, "the README must open with exactly two commands"
    main_job, tests = blocks
    assert "user_llm" in main_job and "pytest" in tests
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    match = re.search(r"TEST_COMMAND='(.*)'", ci)
    assert match and match.group(1) == tests


def test_readme_main_job_names_existing_gin_files():
    readme = (REPO_ROOT / "README.md").read_text()
    main_job = _bash_blocks(readme)[0]
    for name in re.findall(r"--gin_file=(\S+)", main_job):
        assert (REPO_ROOT / "gin" / name).is_file(), name
