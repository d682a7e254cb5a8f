"""The README's Python examples run as written and learn."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run_and_loss_falls():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2, "README should hold the engine example and the new-algorithm one"
    namespace: dict = {}
    for block in blocks[:2]:  # the second example reuses the first one's data and loss
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, "README.md", "exec"), namespace)
        losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", out.getvalue())]
        assert len(losses) == 10
        assert losses[-1] < 0.7 * losses[0]
    # The clipped algorithm really clips: clients moved further than the bound (0.1), the
    # server, a mean of clipped updates, did not.
    metrics = namespace["out"].metrics
    assert float(metrics.client_update_norm.max()) > 0.1 >= float(metrics.update_norm) - 1e-6
