"""pfl-research's CIFAR-10 workload as we run it: the partition, the cohort's batches, the
normalisation, and how the comparison reads a run (time to an accuracy, the common level)."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_lm.bench import pfl_cifar10 as pc


def _fed(w: pc.PflCifar10) -> pc.Cifar10Federation:
    rng = np.random.default_rng(0)
    n = w.num_clients * w.per_client + 7
    perm = rng.permutation(n)[: w.num_clients * w.per_client]
    return pc.Cifar10Federation(
        rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n),
        rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 5),
        perm.reshape(w.num_clients, w.per_client))


def test_the_workload_is_the_papers():
    w = pc.PflCifar10()
    assert (w.num_clients, w.per_client, w.cohort, w.batch_size, w.local_steps) == (
        1000, 50, 50, 10, 5)
    assert (w.local_lr, w.server_lr, w.rounds) == (0.1, 1.0, 1500)


def test_cohort_batches_are_each_clients_own_images_once_an_epoch():
    w = pc.PflCifar10(num_clients=6, per_client=4, cohort=3, batch_size=2)
    fed = _fed(w)
    ids = pc.cohort_ids(w, round_idx=5)
    assert len(set(ids.tolist())) == 3 and ids.max() < 6
    assert np.array_equal(ids, pc.cohort_ids(w, 5))  # the round's key fixes the cohort
    batch = pc.cohort_batches(fed, w, ids, 5)
    assert batch["image"].shape == (3, 2, 2, 32, 32, 3) and batch["mask"].sum() == 12
    for k, c in enumerate(ids):
        own = fed.partition[c]
        got = batch["image"][k].reshape(4, 32, 32, 3)
        want = pc.normalize(fed.train_images[own])
        # the same four images, in some order
        match = [int(np.flatnonzero(np.abs(want - g).sum(axis=(1, 2, 3)) == 0)[0])
                 for g in got]
        assert sorted(match) == [0, 1, 2, 3]
        assert np.array_equal(batch["label"][k].reshape(4), fed.train_labels[own][match])


def test_normalize_matches_the_per_channel_formula():
    x = np.full((1, 32, 32, 3), 255, np.uint8)
    np.testing.assert_allclose(pc.normalize(x)[0, 0, 0], (1.0 - pc.MEAN) / pc.STD, rtol=1e-6)


def test_too_many_clients_for_the_dataset_is_refused(tmp_path, monkeypatch):
    w = pc.PflCifar10(num_clients=2000)
    monkeypatch.setattr(pc, "load_cifar10_arrays", lambda *a, **k: ({
        "train": (np.zeros((50000, 32, 32, 3), np.uint8), np.zeros(50000, np.int32)),
        "test": (np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, np.int32))}, True))
    with pytest.raises(ValueError, match="2000 clients x 50 images need 100000"):
        pc.load_federation(tmp_path, w)


def test_time_to_accuracy_and_the_common_level():
    runs = [
        {"framework": "ours", "setting": "vmap", "status": "ok", "round_times_s": [9.0, 1.0, 1.0],
         "evals": [{"round": 1, "accuracy": 0.2, "loss": 2.0, "train_s": 9.0},
                   {"round": 3, "accuracy": 0.4, "loss": 1.6, "train_s": 11.0}]},
        {"framework": "pfl", "setting": "workers=1", "status": "ok",
         "round_times_s": [3.0, 2.0, 2.0],
         "evals": [{"round": 1, "accuracy": 0.3, "loss": 1.9, "train_s": 3.0},
                   {"round": 3, "accuracy": 0.35, "loss": 1.7, "train_s": 7.0}]},
    ]
    assert pc.common_accuracy(runs) == 0.35
    s = pc.summarize_run(runs[0], 0.35)
    assert (s["round_s"], s["first_round_s"], s["train_s"]) == (1.0, 9.0, 11.0)
    assert (s["target_round"], s["target_train_s"], s["accuracy"]) == (3, 11.0, 0.4)
    assert pc.summarize_run(runs[1], 0.5)["target_train_s"] is None
    assert pc.common_accuracy(runs + [{"framework": "flower", "status": "failed"}]) == 0.35
    assert pc.common_accuracy(runs[:1]) is None
    assert pc.parse_setting("actors=2,threads=1") == {"actors": "2", "threads": "1"}
    with pytest.raises(ValueError, match="bad setting 'actors'"):
        pc.parse_setting("actors")
    result = pc._result(pc.PflCifar10(), 3, runs + [{"framework": "flower", "setting": "a=2",
                                                     "status": "failed", "error": "boom"}],
                        [], "t", 0.0, (1.0, 1.0, 1.0), "cpu")
    md = pc.render(result)
    assert "| pfl | workers=1 | 3 | 2.000 | 2.00 | 3.00 | 7.0 | 0.3500 | 1.7000 | 7.0 | — |" in md
    assert "| ours | vmap | 3 | 1.000 | 1.00 | 9.00 | 11.0 | 0.4000 | 1.6000 | 11.0 | — |" in md
    assert "| flower | a=2 | failed: boom |" in md and result["common_accuracy"] == 0.35


@pytest.mark.slow
def test_our_run_is_the_same_with_either_conv_lowering():
    """Two rounds through the engine (vmapped clients, dropout keys, FedAvg): the patches
    lowering reproduces XLA's convolution to float rounding."""
    w = pc.PflCifar10(num_clients=4, per_client=4, cohort=2, batch_size=2, eval_every=2,
                      eval_batch=5)
    fed = _fed(w)
    runs = [pc.run_ours(fed, w, 2, conv_impl=impl, log=lambda _: None)
            for impl in ("xla", "patches")]
    assert [len(r["round_times_s"]) for r in runs] == [2, 2]
    (a,), (b,) = runs[0]["evals"], runs[1]["evals"]
    assert a["round"] == b["round"] == 2 and a["accuracy"] == b["accuracy"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
