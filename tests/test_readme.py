"""README.md's "From Python" examples run as written."""

import re

from clihelp import REPO

from charrnn import checkpoint

SECTION = "## From Python"


def python_blocks(markdown: str) -> list[str]:
    """The ```python blocks of the section, in order."""
    start = markdown.index(SECTION + "\n")
    end = markdown.find("\n## ", start + len(SECTION))
    section = markdown[start:] if end == -1 else markdown[start:end]
    return re.findall(r"^```python\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)


def test_the_from_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 2 and "charrnn.train" in blocks[0] and "callbacks=" in blocks[1]
    for name in ("data", "configs"):
        (tmp_path / name).symlink_to(REPO / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)

    namespace = {"__name__": "readme"}
    for number, block in enumerate(blocks):
        exec(compile(block, f"README.md From Python block {number + 1}", "exec"), namespace)  # noqa: S102

    for run, steps in (("tiny", 100), ("gru", 60)):
        files = checkpoint.step_files(tmp_path / "runs" / run / "checkpoints")
        assert files and files[-1].name == f"step-{steps:09d}.safetensors", run
    assert namespace["summary"].steps == 60 and namespace["config"].model.cell == "gru"
    assert isinstance(namespace["texts"], list) and len(namespace["texts"]) == 4
    assert namespace["text"].startswith("ROMEO:")
    printed = capsys.readouterr().out
    assert "JULIET:" in printed and "step 20:" in printed and "step 60:" in printed  # stream, and the callback
