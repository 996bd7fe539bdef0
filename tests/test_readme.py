"""The README's Quick start is exactly the two commands the Makefile provides."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_start_commands_are_make_targets():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("setup", "demo", "test", "stop"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    # both quick-start targets create the venv first
    assert re.search(r"^demo: .*services", makefile, re.M) and re.search(r"^services: setup", makefile, re.M)
    assert re.search(r"^test: setup", makefile, re.M)
    assert (ROOT / ".ci/run").read_text().strip().endswith("make test")


def test_top_level_layout():
    for name in ("pyproject.toml", "cluster", "jobs", "bundlerec", "serve", "tests", "README.md", "Makefile",
                 "requirements.lock"):
        assert (ROOT / name).exists(), name


def test_readme_commands_are_real_subcommands():
    """Every `bundlerec …` line of the README's code blocks names a subcommand the command has."""
    from jobs.cli import STAGES

    readme = (ROOT / "README.md").read_text()
    used = set()
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S):
        for line in block.splitlines():
            m = re.match(r"\s*bundlerec (submit )?(?:--\S+ \S+ )*([a-z-]+)", line)
            if m:
                used.add(m.group(2))
    assert used and used <= set(STAGES), used - set(STAGES)


def test_the_documented_stage_commands_parse():
    """Every `bundlerec STAGE …` command in the README's and the data guide's code blocks (continued
    lines joined, comments dropped, `submit` and its options skipped) is accepted by that stage's command."""
    import shlex

    from bundlerec.cli import click_command
    from jobs.cli import STAGES, stage_function

    checked = 0
    for doc in ("README.md", "docs/bring-your-own-data.md"):
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", (ROOT / doc).read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split("  #")[0].split(" # ")[0])
                if not words or words[0] != "bundlerec" or "..." in line or "…" in line or "$" in line:
                    continue
                words = words[1:]
                if words[0] == "submit":  # its own options, then the stage
                    words = words[1:]
                    while words and words[0].startswith("--"):
                        words = words[1:] if words[0] == "--no-wait" else words[2:]
                if words and words[0] in STAGES:
                    click_command(stage_function(words[0])).make_context(words[0], words[1:])
                    checked += 1
    assert checked >= 15, checked
