"""Export to a Hugging Face folder: the inverse of loading. A transformers-saved checkpoint
(the parity fixtures) loads and exports back to the same tensors under the same names."""

import json
from pathlib import Path

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
