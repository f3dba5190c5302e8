"""The README's code examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _block(name: str) -> str:
    text = README.read_text()
    section = re.search(rf"<!-- {name}:begin -->(.*?)<!-- {name}:end -->", text, re.S)
    assert section, f"README has no {name} block"
    code = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert code, f"the {name} block has no python code"
    return code.group(1)


def test_tbptt_example_runs():
    namespace: dict = {}
    exec(compile(_block("tbptt-example"), "README tbptt-example", "exec"), namespace)
    assert namespace["state"].requires_grad is False
    assert namespace["loss"].item() > 0
