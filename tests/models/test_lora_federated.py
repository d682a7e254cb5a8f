"""LoRA in federated rounds: FFA is exact, FedIT is not, `exact` refactors the mean product,
and a rank-4 client inside an R = 8 masked program equals a native rank-4 run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lm import federated as fl
from fedjax_lm.federated.lowrank import refactor
from fedjax_lm.models import classification_loss
from fedjax_lm.models.lora import LORA_A, LORA_B
from fedjax_lm.models.peft import rank_mask, trainable_predicate
from tests.models.test_encoder import tiny

TARGETS = ("query", "value")


def client_data(num_clients, steps=2, batch=4, length=8, seed=0):
    rs = np.random.RandomState(seed)
    return {
        "input_ids": rs.randint(1, 50, (num_clients, steps, batch, length)).astype(np.int32),
        "attention_mask": np.ones((num_clients, steps, batch, length), np.int32),
        "token_type_ids": np.zeros((num_clients, steps, batch, length), np.int32),
        "label": rs.randint(0, 2, (num_clients, steps, batch)).astype(np.int32),
        "mask": np.ones((num_clients, steps, batch), np.float32),
    }


def lora_model(rank, **kw):
    return tiny(lora_rank=rank, lora_targets=TARGETS, lora_alpha=kw.pop("alpha", 8.0), **kw)


def rounds(model, params, *, ffa=False, aggregator=None, client_mask=None, optimizer=None):
    """`run(data, ids) -> server params after one round from `params`` (one engine: cohorts
    of one shape compile once)."""
    mask = fl.mask_from_predicate(params, trainable_predicate("lora", freeze_lora_a=ffa))
    algorithm = fl.fedavg(classification_loss(model), optimizer or optax.sgd(0.5),
                          trainable=mask, aggregator=aggregator, client_mask=client_mask)
    engine = fl.FederatedEngine(algorithm, fl.ExecutorConfig(donate=False))
    state = engine.init(params, jax.random.key(0))
    return lambda data, ids=None: engine.run_round(state, data, client_ids=ids).state.params


def round_of(model, params, data, *, ids=None, **kw):
    return rounds(model, params, **kw)(data, ids)


def products(params):
    """A·B of every adapter, by path."""
    out = {}
    for i, layer in params["layers"].items():
        for t in ("query", "value"):
            ab = layer["attention"][t]
            out[(i, t)] = np.asarray(ab[LORA_A], np.float64) @ np.asarray(ab[LORA_B], np.float64)
    return out


def clients_alone(run, data):
    """Each client's own round (one-client cohorts: the server takes its model exactly)."""
    return [run({k: v[i:i + 1] for k, v in data.items()}, np.array([i]))
            for i in range(data["mask"].shape[0])]


def test_ffa_is_exact_and_fedit_is_not():
    model, data = lora_model(4), client_data(3)
    params = model.init(jax.random.key(1))
    run = rounds(model, params, ffa=True)
    ffa, alone = run(data), clients_alone(run, data)
    for key, prod in products(ffa).items():
        mean = np.mean([products(p)[key] for p in alone], axis=0)
        np.testing.assert_allclose(prod, mean, atol=1e-7)
        assert np.abs(mean).max() > 1e-4  # the clients did move
    np.testing.assert_array_equal(ffa["layers"][0]["attention"]["query"][LORA_A],
                                  params["layers"][0]["attention"]["query"][LORA_A])
    run = rounds(model, params)
    fedit, alone = run(data), clients_alone(run, data)
    gaps = [np.abs(prod - np.mean([products(p)[key] for p in alone], axis=0)).max()
            for key, prod in products(fedit).items()]
    assert max(gaps) > 1e-6  # mean(A)·mean(B) != mean(A·B)


@pytest.mark.slow
def test_exact_aggregation_equals_the_mean_product_when_its_rank_fits():
    """Ranks 1 and 2 under R = 4: the mean product has rank <= 3, so refactoring is exact."""
    model, data = lora_model(4), client_data(2)
    params = model.init(jax.random.key(1))
    kw = dict(aggregator=fl.factor_product_mean(), client_mask=rank_mask(np.array([1, 2])))
    exact = round_of(model, params, data, ids=np.array([0, 1]), **kw)
    alone = clients_alone(rounds(model, params, client_mask=kw["client_mask"]), data)
    for key, prod in products(exact).items():
        mean = np.mean([products(p)[key] for p in alone], axis=0)
        np.testing.assert_allclose(prod, mean, atol=2e-7)


def test_refactor_is_the_best_rank_r_approximation():
    rs = np.random.RandomState(0)
    m = rs.randn(12, 9).astype(np.float32)
    a, b = refactor(jnp.asarray(m), 3, 2.0)
    u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(np.asarray(a) @ np.asarray(b), (u[:, :3] * s[:3]) @ vt[:3],
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(a)), 2.0, rtol=1e-5)


def test_refactor_under_vmap_decomposes_one_matrix_at_a_time():
    """Vectorized federations vmap the server's refactor: every SVD must still be one
    unbatched LAPACK call (a batched one blocks an XLA:CPU pool thread, and several at once
    deadlocked a 2-core sweep), and the result must equal numpy's per matrix."""
    import re

    rs = np.random.RandomState(1)
    m = rs.randn(3, 2, 12, 9).astype(np.float32)  # [federations, pairs, d, o]
    f = jax.jit(jax.vmap(jax.vmap(lambda x: refactor(x, 3))))
    a, b = f(jnp.asarray(m))
    for i in range(3):
        for j in range(2):
            u, sv, vt = np.linalg.svd(m[i, j].astype(np.float64), full_matrices=False)
            np.testing.assert_allclose(np.asarray(a[i, j] @ b[i, j]),
                                       (u[:, :3] * sv[:3]) @ vt[:3], atol=1e-5)
    hlo = f.lower(jnp.asarray(m)).compile().as_text()
    if jax.default_backend() == "cpu":
        svds = [ln for ln in hlo.splitlines() if "lapack_sgesdd" in ln]
        assert svds and all(re.search(r"= \(f32\[12,9\]\{", ln) for ln in svds), svds


def test_a_rank_4_client_in_an_r8_masked_program_equals_a_native_rank_4_run():
    """Same scale alpha / R (16 / 8 = 8 / 4), same base, Adam, LoRA dropout on."""
    wide, narrow = lora_model(8, alpha=16.0, lora_dropout=0.2), lora_model(4, lora_dropout=0.2)
    params8 = wide.init(jax.random.key(1))

    def cut(params):
        out = jax.tree.map(lambda x: x, params)
        for layer in out["layers"].values():
            for t in TARGETS:
                ab = layer["attention"][t]
                ab[LORA_A], ab[LORA_B] = ab[LORA_A][:, :4], ab[LORA_B][:4]
        return out

    data = client_data(1)
    kw = dict(ids=np.array([1]), optimizer=optax.adam(1e-2))
    masked = round_of(wide, params8, data, client_mask=rank_mask(np.array([8, 4])), **kw)
    native = round_of(narrow, cut(params8), data, **kw)
    np.testing.assert_allclose(products(masked)[(0, "query")], products(native)[(0, "query")],
                               atol=1e-6)
    assert np.abs(products(native)[(0, "query")]).max() > 1e-4
    for x, y in zip(jax.tree.leaves(cut(masked)), jax.tree.leaves(native), strict=True):
        np.testing.assert_allclose(x, y, atol=2e-6)
    assert not np.any(masked["layers"][0]["attention"]["query"][LORA_A][:, 4:])  # zero-padded


@pytest.mark.slow
def test_per_client_bytes_follow_the_adapters_not_the_model():
    """Compiled (XLA memory analysis) and carried bytes of one more client in the chunk
    program: LoRA at ranks 2 and 8 against full fine-tuning of the same encoder."""
    from fedjax_lm.scale import memory as mem

    batch = mem.text_batch(1, 2, 8)

    def estimate(rank):
        model = lora_model(rank) if rank else tiny()
        params = jax.eval_shape(model.init, jax.random.key(0))
        mask = (fl.mask_from_predicate(params, trainable_predicate("lora")) if rank else None)
        est = mem.estimate_memory(classification_loss(model), params, optax.adam(1e-3), batch,
                                  trainable=mask, widths=(1, 2))
        return est, fl.trainable.count(mask, params)[0]

    (full, full_t), (r2, r2_t), (r8, r8_t) = (estimate(r) for r in (0, 2, 8))
    for est, t in ((full, full_t), (r2, r2_t), (r8, r8_t)):
        assert est.client_state_bytes == 4 * t + 4  # params, delta, Adam's mu and nu; count
    assert r8_t - r2_t == 6 * 2 * (32 + 32) * 4  # 6 more components of 2 adapters
    # Each full client holds at least one more copy of the model than a LoRA one does.
    assert r8.per_client_bytes < full.per_client_bytes - full_t
