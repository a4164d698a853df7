"""The README's Python example runs as written, from the repository's root."""

import os
import re

from conftest import ROOT


def test_readme_python_example_runs(monkeypatch, capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has a Python example"
    monkeypatch.chdir(ROOT)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "rank `E`" in printed and "'passes'" in printed
