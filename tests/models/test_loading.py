"""`from_pretrained` error paths (each with its message) and checkpoint-loading details."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedjax_lm.models import ModelLoadError, from_pretrained

BERT = Path(__file__).resolve().parents[1] / "fixtures" / "parity" / "bert"


def _copy_bert(tmp_path: Path, drop: str | None = None, config: dict | None = None) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    cfg = json.loads((BERT / "config.json").read_text()) | (config or {})
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(BERT / "model.safetensors")
    if drop:
        del tensors[drop]
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_error_type_is_a_value_error():
    assert issubclass(ModelLoadError, ValueError)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found: .*nope"):
        from_pretrained(tmp_path / "nope", num_labels=2)
    with pytest.raises(ModelLoadError, match="not a folder"):
        (tmp_path / "file").write_text("x")
        from_pretrained(tmp_path / "file", num_labels=2)


def test_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json in"):
        from_pretrained(tmp_path, num_labels=2)


def test_missing_safetensors(tmp_path):
    shutil.copy(BERT / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors in"):
        from_pretrained(tmp_path, num_labels=2)


def test_pytorch_bin_is_refused_not_unpickled(tmp_path):
    shutil.copy(BERT / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    refused = r"only pytorch_model\.bin .*never loaded.*safetensors"
    with pytest.raises(ModelLoadError, match=refused):
        from_pretrained(tmp_path, num_labels=2)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'roberta'"):
        from_pretrained(tmp_path, num_labels=2)


def test_shape_mismatch_names_parameter_and_shapes(tmp_path):
    folder = _copy_bert(tmp_path, config={"vocab_size": 100})
    with pytest.raises(
        ModelLoadError,
        match=r"shape mismatch for 'bert\.embeddings\.word_embeddings\.weight': "
        r"checkpoint has \(99, 32\), model expects \(100, 32\)",
    ):
        from_pretrained(folder, num_labels=3, load_tokenizer=False)


def test_classifier_with_other_num_labels_is_a_shape_mismatch():
    with pytest.raises(ModelLoadError, match=r"'classifier\.weight'.*\(32, 3\).*\(32, 5\)"):
        from_pretrained(BERT, num_labels=5, load_tokenizer=False)


def test_missing_required_weight(tmp_path):
    folder = _copy_bert(tmp_path, drop="bert.encoder.layer.1.output.dense.weight")
    with pytest.raises(
        ModelLoadError,
        match=r"missing weight 'bert\.encoder\.layer\.1\.output\.dense\.weight' "
        r"\(needed for layers/1/ffn_out/kernel\)",
    ):
        from_pretrained(folder, num_labels=3, load_tokenizer=False)


def test_missing_head_is_initialised_from_seed(tmp_path):
    folder = _copy_bert(tmp_path, drop="classifier.weight")
    a = from_pretrained(folder, num_labels=3, load_tokenizer=False, head_seed=0)
    b = from_pretrained(folder, num_labels=3, load_tokenizer=False, head_seed=1)
    ref = load_file(BERT / "model.safetensors")
    np.testing.assert_array_equal(
        a.params["pooler"]["kernel"], ref["bert.pooler.dense.weight"].T
    )
    ka, kb = a.params["head"]["classifier"]["kernel"], b.params["head"]["classifier"]["kernel"]
    assert ka.shape == (32, 3) and not np.allclose(ka, kb)
    assert not np.allclose(ka, ref["classifier.weight"].T)  # the partial head was not used


def test_bare_checkpoint_without_arch_prefix_and_extra_weights(tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(BERT / "config.json", folder / "config.json")
    tensors = {k.removeprefix("bert."): v for k, v in load_file(BERT / "model.safetensors").items()}
    tensors["cls.predictions.bias"] = np.zeros(99, np.float32)  # an MLM head: ignored
    save_file(tensors, folder / "model.safetensors")
    bare = from_pretrained(folder, num_labels=3, load_tokenizer=False)
    ref = from_pretrained(BERT, num_labels=3, load_tokenizer=False)
    np.testing.assert_array_equal(
        bare.params["layers"][1]["ffn_in"]["kernel"], ref.params["layers"][1]["ffn_in"]["kernel"]
    )


@pytest.mark.parametrize("name", ["bert-base-cased", "albert-base-v1", "distilbert-base-cased"])
def test_paper_models_fail_offline_with_advice(name, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"could not get '{name}'.*No network.*local path"):
        from_pretrained(name, num_labels=2, local_files_only=True)


def test_overrides_and_trainable_activation_on_a_checkpoint():
    loaded = from_pretrained(
        BERT, num_labels=3, load_tokenizer=False, hidden_act="abu", dtype="bfloat16"
    )
    assert loaded.config.dtype == "bfloat16" and loaded.config.hidden_act == "abu"
    act = loaded.params["layers"][0]["act"]
    np.testing.assert_allclose(act["abu_w"], np.full(5, 0.2))  # initial values, not loaded
    assert loaded.params["layers"][0]["ffn_in"]["kernel"].dtype == np.float32
    with pytest.raises(ValueError, match="unknown EncoderConfig field"):
        from_pretrained(BERT, num_labels=3, load_tokenizer=False, hiden_act="relu")


@pytest.mark.parametrize("config, message", [
    ({"num_attention_heads": 5}, "hidden_size 32 is not a multiple of num_attention_heads 5"),
    ({"hidden_size": "32"}, "hidden_size must be int, got '32'"),
    ({"num_hidden_layers": 1.5}, "num_hidden_layers must be int, got 1.5"),
    ({"hidden_act": "swishy"}, "unknown hidden_act 'swishy'; valid: gelu, "),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be >= 1, got 0"),
])
def test_bad_config_json_names_the_file_and_the_field(tmp_path, config, message):
    """Values that used to fail deep inside the model (a TypeError from `"32" % 2`)."""
    folder = _copy_bert(tmp_path, config=config)
    with pytest.raises(ModelLoadError) as err:
        from_pretrained(folder, num_labels=2, load_tokenizer=False)
    assert str(err.value).startswith(f"{folder / 'config.json'}: {message}")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=r"config\.json holds a JSON list, not an object"):
        from_pretrained(folder, num_labels=2, load_tokenizer=False)


def test_suggest_model():
    from fedjax_lm.models import suggest_model

    assert suggest_model("tiny") == "preset:tiny"
    assert suggest_model("MiniLM") == "minilm" and suggest_model("minlm") == "minilm"
    assert suggest_model("bert-base-cased") is None
