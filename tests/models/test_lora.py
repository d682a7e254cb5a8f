"""LoRA on the encoders: the unmerged path equals the merged model, fresh adapters change
nothing, one naming across BERT / DistilBERT / ALBERT, PEFT modes select the right leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm.federated import mask_from_predicate
from fedjax_lm.models import ModelLoadError
from fedjax_lm.models.config import LORA_TARGET_NAMES
from fedjax_lm.models.lora import LORA_A, LORA_B
from fedjax_lm.models.peft import merge_lora, rank_mask, trainable_predicate
from tests.models.test_encoder import SMALL, make_batch, tiny

ALL = tuple(LORA_TARGET_NAMES)


def paths(params, leaf=None):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = ["/".join(str(getattr(k, "key", k)) for k in kp) for kp, _ in flat]
    return [p for p in out if leaf is None or p.endswith(leaf)]


def randomise_b(params, seed=0):
    """Give every lora_b random values (fresh ones are zero, which would hide the path)."""
    key = jax.random.key(seed)
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: (jax.random.normal(jax.random.fold_in(key, hash(str(kp)) % 2**31), x.shape)
                       * 0.1 if str(getattr(kp[-1], "key", "")) == LORA_B else x), params)


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "albert"])
def test_unmerged_lora_equals_the_merged_model_and_fresh_adapters_change_nothing(model_type):
    base = tiny(model_type)
    model = tiny(model_type, lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
    params = model.init(jax.random.key(0))
    plain = merge_lora(params, scale=0.0)  # the base weights alone
    batch = make_batch()
    fresh = model.apply(params, batch, train=False).logits
    np.testing.assert_array_equal(fresh, base.apply(plain, batch, train=False).logits)
    trained = randomise_b(params)
    unmerged = model.apply(trained, batch, train=False).logits
    merged = base.apply(merge_lora(trained, 8.0 / 4), batch, train=False).logits
    assert not np.allclose(unmerged, fresh, atol=1e-4)
    np.testing.assert_allclose(unmerged, merged, atol=2e-5)


def test_one_target_naming_for_the_three_encoders():
    where = {"query": "attention/query", "key": "attention/key", "value": "attention/value",
             "attention_output": "attention/output", "intermediate": "ffn_in",
             "output": "ffn_out"}
    for model_type in ("bert", "distilbert", "albert"):
        for target, sub in where.items():
            params = jax.eval_shape(tiny(model_type, lora_rank=2, lora_targets=(target,)).init,
                                    jax.random.key(0))
            assert paths(params, LORA_A) == [f"layers/0/{sub}/{LORA_A}"]
    albert = tiny("albert", num_hidden_layers=3, lora_rank=2, lora_targets=("query",))
    params = jax.eval_shape(albert.init, jax.random.key(0))  # three applications, one adapter
    assert paths(params, LORA_A) == [f"layers/0/attention/query/{LORA_A}"]


def test_lora_a_follows_the_papers_init_and_b_is_zero():
    params = tiny(lora_rank=8, lora_targets=("intermediate",)).init(jax.random.key(0))
    a, b = (params["layers"][0]["ffn_in"][k] for k in (LORA_A, LORA_B))
    bound = 1 / np.sqrt(SMALL["hidden_size"])  # Kaiming-uniform, a = sqrt(5): U(±1/sqrt(d_in))
    assert a.shape == (32, 8) and b.shape == (8, 48) and not np.any(b)
    assert np.max(np.abs(a)) <= bound and np.max(np.abs(a)) > 0.8 * bound


def test_lora_dropout_acts_only_in_training():
    model = tiny(lora_rank=4, lora_targets=("query",), lora_dropout=0.5, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    params = randomise_b(model.init(jax.random.key(0)))
    batch = make_batch()
    no_drop = tiny(lora_rank=4, lora_targets=("query",), hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    train = lambda m: m.apply(params, batch, train=True, rng=jax.random.key(1)).logits  # noqa
    np.testing.assert_array_equal(model.apply(params, batch, train=False).logits,
                                  no_drop.apply(params, batch, train=False).logits)
    assert not np.allclose(train(model), train(no_drop), atol=1e-5)


def test_peft_modes_select_their_leaves():
    params = jax.eval_shape(tiny(lora_rank=2, lora_targets=("query", "value"),
                                 num_hidden_layers=2).init, jax.random.key(0))

    def trained(mode, **kw):
        pred = trainable_predicate(mode, **kw)
        mask = mask_from_predicate(params, pred)
        flags = jax.tree.leaves(mask)
        return {p for p, f in zip(paths(params), flags, strict=True) if f}

    assert trainable_predicate("none") is None
    head = {"head/classifier/bias", "head/classifier/kernel"}
    assert trained("head") == head
    lora = {f"layers/{i}/attention/{t}/{f}" for i in (0, 1) for t in ("query", "value")
            for f in (LORA_A, LORA_B)}
    assert trained("lora") == head | lora
    assert trained("lora", freeze_lora_a=True) == head | {p for p in lora if LORA_B in p}
    assert trained("lora", freeze_layers=1) == head | {p for p in lora if "layers/1" in p}
    bitfit = trained("bitfit")
    assert bitfit - head == {p for p in paths(params, "bias") if not p.startswith("head")}
    none_frozen = trained("none", freeze_layers=1)
    assert not any(p.startswith(("embeddings", "layers/0")) for p in none_frozen)
    assert "layers/1/ffn_in/kernel" in none_frozen and "pooler/kernel" in none_frozen


def test_rank_mask_keeps_each_clients_components():
    params = {"q": {LORA_A: jnp.ones((5, 8)), LORA_B: jnp.ones((8, 3)), "kernel": None},
              "head": jnp.ones((3,))}
    m = rank_mask(np.array([8, 4, 1]))(params, jnp.int32(1))
    np.testing.assert_array_equal(np.broadcast_to(m["q"][LORA_A], (5, 8)).sum(0), [5] * 4 + [0] * 4)
    np.testing.assert_array_equal(np.broadcast_to(m["q"][LORA_B], (8, 3)).sum(1), [3] * 4 + [0] * 4)
    assert float(m["head"]) == 1.0


@pytest.mark.parametrize("overrides, message", [
    (dict(lora_rank=2, lora_targets=("querry",)),
     "unknown LoRA target(s) querry; valid: query, key, value, attention_output, "
     "intermediate, output"),
    (dict(lora_rank=-1, lora_targets=("query",)), "lora_rank must be >= 0, got -1"),
    (dict(lora_rank=33, lora_targets=("query",)),
     "lora_rank 33 exceeds projection query's size 32x32; use a rank <= 32"),
    (dict(lora_rank=2), "lora_rank > 0 needs lora_targets (e.g. query,value)"),
])
def test_bad_lora_configs_are_one_clear_error(overrides, message):
    with pytest.raises(ModelLoadError) as e:
        tiny(**overrides)
    assert str(e.value) == message
