"""Why head-only fine-tuning stays near the majority class in experiments/peft_sst2.yaml.

    python experiments/peft_sst2_probe.py ../shared/data

The classifier head sees tanh(pooler([CLS])), BERT's pooled output. all-MiniLM-L6-v2 was
trained through mean pooling, so its pooler never was: this prints, for the first 256 SST-2
test sentences (max length 48), how much each candidate feature varies across sentences and the
held-out accuracy of a ridge probe on it (192 sentences to fit, 64 to test; features
standardised on the 192; ridge 10). It reads features only; no federated run is involved.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from fedjax_lm.models.pretrained import from_pretrained


def probe(f: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Held-out accuracy of a ridge regression on +-1 labels (a linear probe in closed form)."""
    f = (f - f[train].mean(0)) / (f[train].std(0) + 1e-6)
    w = np.linalg.solve(f[train].T @ f[train] + 10 * np.eye(f.shape[1]),
                        f[train].T @ (2 * y[train] - 1))
    return float(((f[test] @ w > 0) == y[test]).mean())


def main(data_dir: Path) -> None:
    pre = from_pretrained("minilm", 2)
    lines = (data_dir / "sst2" / "test.tsv").read_text().splitlines()[1:257]
    text, label = zip(*(line.rsplit("\t", 1) for line in lines), strict=True)
    enc = pre.tokenizer(list(text), padding="max_length", truncation=True, max_length=48,
                        return_tensors="np")
    out = pre.model.apply(pre.params, {"input_ids": jnp.asarray(enc["input_ids"]),
                                       "attention_mask": jnp.asarray(enc["attention_mask"])},
                          train=False)
    x, mask = np.asarray(out.last_hidden_state), enc["attention_mask"][..., None]
    pooler = pre.params["pooler"]
    features = {"pooled (what the head sees)": np.tanh(x[:, 0] @ np.asarray(pooler["kernel"])
                                                       + np.asarray(pooler["bias"])),
                "[CLS] hidden state": x[:, 0],
                "mean over tokens (how the checkpoint was trained)": (x * mask).sum(1)
                / mask.sum(1)}
    y = np.array([int(v) for v in label])
    order = np.random.default_rng(0).permutation(len(y))
    for name, f in features.items():
        print(f"{name}: mean |f| {np.abs(f).mean():.3f}, std across sentences "
              f"{f.std(0).mean():.4f}, ridge probe accuracy "
              f"{probe(f, y, order[:192], order[192:]):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
