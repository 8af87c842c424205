"""CI must run exactly the README's test command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    assert len(blocks) == 2 and blocks[0].endswith("pangu-ops bench") and blocks[1].endswith("pytest tests")
    assert blocks[0].rsplit("&&", 1)[0] == blocks[1].rsplit("&&", 1)[0], "both commands must set up the same way"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert blocks[1] in ci_lines
