"""The README's Python example runs as written and learns."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_engine_example_runs_and_loss_falls():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {})
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", out.getvalue())]
    assert len(losses) == 10
    assert losses[-1] < 0.7 * losses[0]
