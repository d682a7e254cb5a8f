"""`--lora-ranks` as a list, resource tiers or a uniform range: each client's rank, with exact
tier sizes and a placement seeded from the run's seed."""

import jax
import numpy as np
import pytest

from fedjax_lm.grid import ConfigError
from fedjax_lm.models import Model, preset
from fedjax_lm.runner.checks import from_dict
from fedjax_lm.runner.peft import build_peft, lora_settings, model_overrides, rank_spec

HIDDEN, LAYERS = 64, 2  # preset:tiny


def cfg(ranks: str, **kw):
    return from_dict({"model": "preset:tiny", "peft": "lora", "lora_ranks": ranks, **kw})


def population(ranks: str, n: int, seed: int = 0) -> np.ndarray:
    return rank_spec(cfg(ranks, seed=seed)).population(n, seed)


def counts(pop: np.ndarray) -> dict[int, int]:
    values, n = np.unique(pop, return_counts=True)
    return dict(zip(values.tolist(), n.tolist(), strict=True))


def test_tiers_give_exact_sizes_by_largest_remainder():
    assert counts(population("2:0.5,4:0.3,8:0.2", 10)) == {2: 5, 4: 3, 8: 2}
    # 64 clients: 32, 19.2, 12.8 -> 32, 19, 12 and the one left to the largest remainder (8)
    assert counts(population("2:0.5,4:0.3,8:0.2", 64)) == {2: 32, 4: 19, 8: 13}
    assert counts(population("8:0.25,2:0.75", 3)) == {2: 2, 8: 1}  # 0.75 vs 2.25: 8 gets one


def test_uniform_is_equal_tiers_over_every_whole_rank():
    assert counts(population("uniform:2,8", 70)) == {r: 10 for r in range(2, 9)}
    assert counts(population("uniform:4,4", 5)) == {4: 5}
    assert lora_settings(cfg("uniform:2,6"))["lora_rank"] == 6  # R = the largest rank


def test_placement_is_seeded_and_a_list_is_round_robin():
    a, b = population("2:0.5,8:0.5", 100, seed=0), population("2:0.5,8:0.5", 100, seed=1)
    np.testing.assert_array_equal(a, population("2:0.5,8:0.5", 100, seed=0))
    assert not np.array_equal(a, b) and counts(a) == counts(b) == {2: 50, 8: 50}
    np.testing.assert_array_equal(population("2,4,8", 7), [2, 4, 8, 2, 4, 8, 2])


def test_the_plan_masks_and_counts_bytes_with_the_seeded_population():
    c = cfg("2:0.5,8:0.5", lora_rank=8, seed=3)
    model = Model(preset("tiny", num_labels=2, vocab_size=1000, **model_overrides(c)))
    params = jax.eval_shape(model.init, jax.random.key(0))
    plan = build_peft(c, params, 6)
    np.testing.assert_array_equal(plan.ranks, population("2:0.5,8:0.5", 6, seed=3))
    head = sum(x.size * 4 for x in jax.tree.leaves(params["head"]))
    per_rank = LAYERS * 2 * (HIDDEN + HIDDEN) * 4  # query and value: A column + B row
    ids = np.arange(6)
    assert plan.client_bytes(ids) == head + 5 * per_rank  # mean rank (3·2 + 3·8) / 6
    mask = plan.client_mask(params, int(np.argmax(plan.ranks == 2)))
    a = np.asarray(mask["layers"][0]["attention"]["query"]["lora_a"])
    np.testing.assert_array_equal(a[0], np.arange(8) < 2)


@pytest.mark.parametrize("ranks, error", [
    ("2:0.5,4:0.4", r"^lora_ranks 2:0.5,4:0.4: tier shares must be > 0 and sum to 1 \(they sum "
                    r"to 0.9\)$"),
    ("2:0.5,2:0.5", r"a rank appears in two tiers; merge their shares$"),
    ("2:0.5,4", r"tiers are rank:share pairs; give a list \(2,4,8\), tiers"),
    ("2:half,4:0.5", r"a share is not a number"),
    ("uniform:8,2", r"^lora_ranks uniform:8,2: the lower bound 8 exceeds the upper 2$"),
    ("uniform:2", r"uniform takes two bounds \(uniform:2,8\)$"),
    ("uniform:2,x", r"'x' is not a whole number"),
    ("2:0.5,16:0.5", r"^lora_ranks must lie in \[1, lora_rank=8\], got 2,16$"),
])
def test_malformed_rank_specs_are_refused_in_one_line(ranks, error):
    with pytest.raises(ConfigError, match=error):
        cfg(ranks, lora_rank=8)
