"""Export to a Hugging Face folder: the inverse of loading. A transformers-saved checkpoint
(the parity fixtures) loads and exports back to the same tensors under the same names."""

import json
import os
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from fedjax_lm.models import from_pretrained
from fedjax_lm.models.export import export_merged

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"


@pytest.mark.parametrize("arch", ["bert", "distilbert", "albert"])
def test_a_transformers_checkpoint_exports_back_to_its_own_tensors_and_config(arch, tmp_path):
    source = FIXTURES / arch
    hf = json.loads((source / "config.json").read_text())
    loaded = from_pretrained(source, len(hf["id2label"]), load_tokenizer=False)
    export_merged(loaded.config, loaded.params, tmp_path)
    ours = load_file(tmp_path / "model.safetensors")
    theirs = load_file(source / "model.safetensors")
    assert set(ours) <= set(theirs)  # theirs may hold buffers (position ids) we never read
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("model_type", "architectures", "id2label", "vocab_size"):
        assert config[key] == hf[key], key
    again = from_pretrained(tmp_path, len(hf["id2label"]), load_tokenizer=False)
    assert again.config == loaded.config


TORCH_PYTHON = os.environ.get("FEDJAX_LM_TORCH_PYTHON")  # a python with torch + transformers
TORCH_SCRIPT = """
import json, sys
import numpy as np, torch
from transformers import AutoModelForSequenceClassification
folder, batch = sys.argv[1], json.load(open(sys.argv[2]))
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
with torch.no_grad():
    if model.config.model_type == "distilbert":  # it takes no token types
        batch.pop("token_type_ids", None)
    out = model(**{k: torch.tensor(v) for k, v in batch.items()})
json.dump(out.logits.numpy().tolist(), open(sys.argv[3], "w"))
"""


@pytest.mark.slow
@pytest.mark.skipif(not TORCH_PYTHON, reason="set FEDJAX_LM_TORCH_PYTHON to a python with "
                                             "torch and transformers (not in this venv)")
@pytest.mark.parametrize("arch", ["bert", "distilbert", "albert"])
def test_merged_lora_export_runs_in_transformers_pytorch_like_ours(arch, tmp_path):
    """The merged export of a LoRA model: transformers' PyTorch class on the folder gives our
    unmerged model's logits (1e-4), and our loader reads it back to the same logits."""
    from tests.models.test_encoder import make_batch, tiny
    from tests.models.test_lora import ALL, randomise_b

    model = tiny(arch, lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
    params = randomise_b(model.init(jax.random.key(0)))
    batch = {k: np.asarray(v) for k, v in make_batch().items() if k != "label"}
    ours = np.asarray(model.apply(params, batch, train=False).logits)
    export_merged(model.config, params, tmp_path / "hf")
    (tmp_path / "batch.json").write_text(json.dumps({k: v.tolist() for k, v in batch.items()}))
    (tmp_path / "run.py").write_text(TORCH_SCRIPT)
    subprocess.run([TORCH_PYTHON, tmp_path / "run.py", tmp_path / "hf", tmp_path / "batch.json",
                    tmp_path / "logits.json"], check=True, timeout=300)
    theirs = np.array(json.loads((tmp_path / "logits.json").read_text()))
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    reloaded = from_pretrained(tmp_path / "hf", ours.shape[-1], load_tokenizer=False)
    again = reloaded.model.apply(reloaded.params, batch, train=False).logits
    np.testing.assert_allclose(np.asarray(again), ours, atol=1e-5)
