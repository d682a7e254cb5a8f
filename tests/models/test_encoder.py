"""Behaviour of our encoders beyond parity: dropout, dtypes, kernels, remat, loss, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm.models import (
    EncoderConfig,
    Model,
    classification_eval,
    classification_loss,
    config_from_hf,
    preset,
)
from fedjax_lm.models.hidden_act import HF_ACTIVATIONS

# A wider init than HF's 0.02 so random tiny models give clearly non-trivial outputs.
SMALL = dict(
    vocab_size=50, hidden_size=32, intermediate_size=48, max_position_embeddings=16,
    initializer_range=0.2, num_hidden_layers=1,  # one layer: fast compiles
)


def tiny(model_type: str = "bert", **overrides) -> Model:
    return Model(preset("tiny", model_type, **{**SMALL, **overrides}))


def make_batch(b: int = 4, length: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 50, (b, length)).astype(np.int32)
    lengths = np.array([length, 5, 3, length])[:b]
    attn = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": ids * attn,
        "attention_mask": attn,
        "token_type_ids": np.zeros_like(ids),
        "label": rng.integers(0, 2, b).astype(np.int32),
        "mask": np.ones(b, np.float32),
    }


def _eval_apply(model: Model):
    return jax.jit(lambda p, b: model.apply(p, b, train=False))


class Compiled:
    """A tiny BERT with its jitted eval and train step, compiled once for the whole module."""

    def __init__(self):
        self.model = tiny()
        self.params = self.model.init(jax.random.key(0))
        self.eval = _eval_apply(self.model)
        self.step = jax.jit(jax.value_and_grad(classification_loss(self.model), has_aux=True))
        self.eval_loss = jax.jit(classification_eval(self.model))


@pytest.fixture(scope="module")
def bert():
    c = Compiled()
    return c.model, c.params, c


def _grads(c: Compiled, params, batch, key):
    return c.step(params, batch, key)[1]


def test_dropout_only_when_training(bert):
    model, params, c = bert
    batch = make_batch()
    a, b = c.eval(params, batch).logits, c.eval(params, batch).logits
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(  # eager vs jit: equal up to float rounding
        model.apply(params, batch, train=False, rng=jax.random.key(5)).logits, a, atol=1e-6
    )
    train_loss = lambda k: float(c.step(params, batch, jax.random.key(k))[0][0])
    eval_loss = float(c.eval_loss(params, batch)["loss_sum"]) / len(batch["label"])
    assert train_loss(1) == train_loss(1)
    assert abs(train_loss(1) - train_loss(2)) > 1e-4 and abs(train_loss(1) - eval_loss) > 1e-4
    with pytest.raises(ValueError, match="rng"):
        model.apply(params, batch, train=True)


def test_padding_is_invisible_with_mask_and_visible_with_attend_to_padding(bert):
    model, params, c = bert
    ids = np.array([[5, 6, 7, 8, 9]], np.int32)
    short = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    padded = {
        "input_ids": np.pad(ids, ((0, 0), (0, 3))),
        "attention_mask": np.pad(np.ones_like(ids), ((0, 0), (0, 3))),
    }
    ev = c.eval
    out_short, out_padded = ev(params, short), ev(params, padded)
    np.testing.assert_allclose(out_padded.logits, out_short.logits, atol=1e-5)
    np.testing.assert_allclose(
        out_padded.last_hidden_state[:, :5], out_short.last_hidden_state, atol=1e-5
    )
    leaky = Model(model.config.replace(attend_to_padding=True))
    out_leaky = _eval_apply(leaky)(params, padded)
    assert np.abs(out_leaky.logits - out_short.logits).max() > 1e-4


def test_dot_product_attention_and_remat_match_default(bert):
    model, params, c = bert
    batch = make_batch()
    ref = c.eval(params, batch)
    dpa = _eval_apply(Model(model.config.replace(attention_impl="dot_product")))(params, batch)
    np.testing.assert_allclose(dpa.logits, ref.logits, atol=1e-5)
    np.testing.assert_allclose(dpa.last_hidden_state, ref.last_hidden_state, atol=1e-5)

    # remat changes only the backward pass: same loss and gradients, dropout included.
    key = jax.random.key(3)
    (loss, _), g = c.step(params, batch, key)
    remat = Model(model.config.replace(remat=True))
    (loss_r, _), g_r = jax.jit(jax.value_and_grad(classification_loss(remat), has_aux=True))(
        params, batch, key
    )
    np.testing.assert_allclose(loss_r, loss, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_r, g)


def test_bf16_compute_keeps_fp32_params_and_is_close(bert):
    model, params, c = bert
    bf16 = Model(model.config.replace(dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.init(jax.random.key(0))))
    batch = make_batch()
    out = _eval_apply(bf16)(params, batch)
    ref = c.eval(params, batch)
    assert out.last_hidden_state.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
    np.testing.assert_allclose(
        out.last_hidden_state.astype(np.float32), ref.last_hidden_state, atol=0.1
    )
    np.testing.assert_allclose(out.logits, ref.logits, atol=0.02)


def test_loss_is_masked_mean_and_fully_padded_rows_are_finite(bert):
    model, params, c = bert
    batch = make_batch()
    batch["mask"] = np.array([1, 1, 0, 1], np.float32)
    batch["attention_mask"][2] = 0  # a padding example: no real token at all
    logits = c.eval(params, batch).logits
    assert np.isfinite(logits).all()
    logp = np.asarray(jax.nn.log_softmax(logits))
    nll = -np.take_along_axis(logp, batch["label"][:, None], 1)[:, 0]
    aux = c.eval_loss(params, batch)
    np.testing.assert_allclose(aux["loss_sum"], nll[[0, 1, 3]].sum(), rtol=1e-5)
    assert aux["count"] == 3.0 and aux["count"].dtype == jnp.float32
    pred = np.argmax(np.asarray(logits), -1)
    assert aux["correct"] == float((pred == batch["label"])[[0, 1, 3]].sum())
    # The padded example contributes zero gradient.
    other = dict(batch, input_ids=batch["input_ids"].copy(), label=batch["label"].copy())
    other["input_ids"][2] = 7
    other["label"][2] = 1 - other["label"][2]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        _grads(c, params, batch, jax.random.key(0)), _grads(c, params, other, jax.random.key(0)),
    )


def test_tiny_encoder_trains_with_sgd(bert):
    _, params, c = bert
    batch = make_batch()
    losses = []
    for i in range(6):
        (loss, _), grads = c.step(params, batch, jax.random.key(i))
        losses.append(float(loss))
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    assert losses[-1] < losses[0] - 0.05, losses


def test_vmap_over_clients(bert):
    """The engine's use: per-client params, batches and dropout keys on a leading axis."""
    model, _, c = bert
    clients = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 2))
    batches = {k: np.stack([v, v]) for k, v in make_batch().items()}
    keys = jax.random.split(jax.random.key(1), 2)
    losses, aux = jax.jit(jax.vmap(classification_loss(model)))(clients, batches, keys)
    assert losses.shape == (2,) and aux["count"].shape == (2,)
    for i in range(2):
        one = jax.tree.map(lambda x, i=i: x[i], clients)
        (loss, _), _ = c.step(one, make_batch(), keys[i])
        np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
    assert not np.allclose(losses[0], losses[1])  # different clients, different params


def test_too_long_sequence_is_an_error(bert):
    model, params, _ = bert
    ids = np.ones((1, 17), np.int32)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
        model.apply(params, {"input_ids": ids}, train=False)


def test_init_head_replaces_only_the_head(bert):
    model, params, c = bert
    a = model.init_head(params, jax.random.key(1))
    b = model.init_head(params, jax.random.key(2))
    assert a["embeddings"] is params["embeddings"] and a["pooler"] is params["pooler"]
    assert not np.allclose(a["head"]["classifier"]["kernel"], b["head"]["classifier"]["kernel"])
    np.testing.assert_array_equal(
        a["head"]["classifier"]["kernel"],
        model.init_head(params, jax.random.key(1))["head"]["classifier"]["kernel"],
    )
    distil = tiny("distilbert")
    head = distil.init_head(distil.init(jax.random.key(0)), jax.random.key(0))["head"]
    assert set(head) == {"pre_classifier", "classifier"}


def test_albert_shares_layers_and_factorises_embeddings():
    model = tiny("albert", num_hidden_layers=6, num_hidden_groups=2, embedding_size=16)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert sorted(shapes["layers"]) == [0, 1]  # 2 groups of 1 layer, applied 6 times
    assert model.config.layer_schedule() == [0, 0, 0, 1, 1, 1]
    assert shapes["embeddings"]["word"]["embedding"].shape == (50, 16)
    assert shapes["embeddings"]["projection"]["kernel"].shape == (16, 32)
    out = _eval_apply(model)(model.init(jax.random.key(0)), make_batch())
    assert out.last_hidden_state.shape == (4, 8, 32)


def test_trainable_activation_per_layer():
    shapes = jax.eval_shape(tiny(hidden_act="abu_n", num_hidden_layers=2).init, jax.random.key(0))
    assert [set(shapes["layers"][i]["act"]) for i in range(2)] == [{"abu_n_w", "beta"}] * 2
    model = tiny(hidden_act="abu_n")
    params = model.init(jax.random.key(0))
    loss = lambda p: classification_loss(model)(p, make_batch(), jax.random.key(0))[0]
    grads = jax.jit(jax.grad(loss))(params)
    assert np.abs(grads["layers"][0]["act"]["abu_n_w"]).max() > 0  # reached by the gradient


def test_hf_activation_formulas():
    x = jnp.array([-2.0, -0.5, 1.0, 3.0])
    exact = [-0.04550026, -0.15426877, 0.8413447, 2.9959502]  # x·Φ(x)
    np.testing.assert_allclose(HF_ACTIVATIONS["gelu"](x), exact, rtol=1e-5)
    tanh_gelu = 0.5 * x * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    for name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        np.testing.assert_allclose(HF_ACTIVATIONS[name](x), tanh_gelu, rtol=1e-5, atol=1e-7)
    assert np.abs(HF_ACTIVATIONS["gelu"](x) - tanh_gelu).max() > 1e-5
    np.testing.assert_array_equal(HF_ACTIVATIONS["relu"](x), [0, 0, 1, 3])


def test_presets_and_hf_config_translation():
    n = lambda cfg: sum(
        x.size for x in jax.tree.leaves(jax.eval_shape(Model(cfg).init, jax.random.key(0)))
    )
    # bert-base-uncased BertModel has 109,482,240 parameters; plus a 2-way classifier.
    assert n(preset("base")) == 109_482_240 + 768 * 2 + 2
    mini = preset("mini")
    assert (mini.hidden_size, mini.num_hidden_layers, mini.num_attention_heads) == (384, 6, 12)
    assert preset("tiny", vocab_size=123).vocab_size == 123
    distil = config_from_hf(
        {"model_type": "distilbert", "dim": 64, "n_layers": 3, "n_heads": 4, "hidden_dim": 96,
         "activation": "relu", "seq_classif_dropout": 0.3, "id2label": {"0": "a", "1": "b",
                                                                        "2": "c"}}
    )
    assert (distil.hidden_size, distil.num_hidden_layers, distil.intermediate_size) == (64, 3, 96)
    assert distil.hidden_act == "relu" and distil.classifier_dropout_prob == 0.3
    assert distil.num_labels == 3 and distil.type_vocab_size == 0
    albert = config_from_hf({"model_type": "albert"}, num_labels=4, dtype="bfloat16")
    assert albert.embedding_size == 128 and albert.hidden_act == "gelu_new"
    assert albert.dtype == "bfloat16" and albert.num_labels == 4
    bert = config_from_hf({"model_type": "bert", "hidden_dropout_prob": 0.2})
    assert bert.classifier_dropout_prob == 0.2  # HF: classifier_dropout None → hidden dropout
    with pytest.raises(ValueError, match="unknown EncoderConfig field"):
        config_from_hf({"model_type": "bert"}, not_a_field=1)
    with pytest.raises(ValueError, match="attention_impl"):
        EncoderConfig(attention_impl="flash")
