"""Packing client data into the engine's [C, S, B, ...] arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedjax_lm.data import (
    iid,
    load_task,
    make_partitioner,
    pack_clients,
    pack_clients_eval,
    pack_eval,
    quantity_skew,
    steps_per_client,
    tokenize_task,
)


def _toy_features(n: int) -> dict[str, np.ndarray]:
    """input_ids[i] = [i, i] so every packed slot says which example it holds."""
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], 2, axis=1)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
        "label": (np.arange(n) % 3).astype(np.int32),
    }


RAGGED = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 30)]  # 10, 3, 17 examples


def test_epoch_mode_shapes_masks_and_ragged_padding() -> None:
    feats = _toy_features(30)
    out = pack_clients(feats, RAGGED, batch_size=4, seed=0, round_idx=0, num_epochs=2)
    # steps: 2*ceil(10/4)=6, 2*ceil(3/4)=2, 2*ceil(17/4)=10 -> S = 10
    assert out["input_ids"].shape == (3, 10, 4, 2)
    assert out["mask"].shape == (3, 10, 4) and out["mask"].dtype == np.float32
    assert out["label"].dtype == np.int32
    assert out["mask"].sum(axis=(1, 2)).tolist() == [20, 6, 34]  # n_c x epochs
    ids = out["input_ids"][..., 0]
    for c, idx in enumerate(RAGGED):
        per_epoch = -(-len(idx) // 4)
        for e in range(2):
            rows = slice(e * per_epoch, (e + 1) * per_epoch)
            real = ids[c, rows][out["mask"][c, rows] == 1]
            assert sorted(real.tolist()) == idx.tolist()  # each example once per epoch
        # padded slots hold one of the client's own examples (never an all-zero row)
        assert set(ids[c][out["mask"][c] == 0].tolist()) <= set(idx.tolist())
    # ragged: client 1 (3 examples) has one short batch per epoch, then all-padding steps
    assert out["mask"][1].sum(1).tolist() == [3, 3, 0, 0, 0, 0, 0, 0, 0, 0]
    assert out["mask"][0].sum(1).tolist() == [4, 4, 2, 4, 4, 2, 0, 0, 0, 0]
    # reshuffled between epochs
    assert not np.array_equal(ids[2, :5], ids[2, 5:10])


def test_drop_last_matches_paper_batching() -> None:
    out = pack_clients(
        _toy_features(30),
        [RAGGED[0], RAGGED[2]],
        batch_size=4,
        seed=0,
        round_idx=0,
        num_epochs=2,
        drop_last=True,
    )
    assert out["mask"].shape == (2, 8, 4)  # 2*floor(17/4) = 8
    assert out["mask"].sum(axis=(1, 2)).tolist() == [16, 32]
    assert (out["mask"][0, :4] == 1).all() and (out["mask"][0, 4:] == 0).all()


def test_step_mode_cycles_exactly_s_times_b() -> None:
    out = pack_clients(_toy_features(30), RAGGED, batch_size=4, seed=1, round_idx=2, num_steps=5)
    assert out["mask"].shape == (3, 5, 4) and (out["mask"] == 1).all()
    ids = out["input_ids"][..., 0].reshape(3, 20)
    # client 1 (3 examples): 20 draws = 6 full shuffled passes + 2
    for p in range(6):
        assert sorted(ids[1, 3 * p : 3 * p + 3].tolist()) == [10, 11, 12]
    # client 2 (17 examples): first 17 draws are one pass
    assert sorted(ids[2, :17].tolist()) == list(range(13, 30))


def test_deterministic_per_round_and_independent_of_other_clients() -> None:
    feats = _toy_features(30)
    kw = dict(batch_size=4, seed=7, num_epochs=1)
    a = pack_clients(feats, RAGGED, round_idx=3, **kw)
    b = pack_clients(feats, RAGGED, round_idx=3, **kw)
    c = pack_clients(feats, RAGGED, round_idx=4, **kw)
    for key in a:
        assert np.array_equal(a[key], b[key])
    assert not np.array_equal(a["input_ids"], c["input_ids"])
    # partial participation: client 2 alone gets the very same batches as in the full round
    sub = pack_clients(feats, RAGGED, round_idx=3, client_ids=[2, 0], **kw)
    assert sub["input_ids"].shape[0] == 2
    assert np.array_equal(sub["input_ids"][0], a["input_ids"][2])
    assert np.array_equal(sub["input_ids"][1], a["input_ids"][0, : sub["input_ids"].shape[1]])


def test_pad_steps_to_fixes_shape_across_rounds() -> None:
    sizes = [len(p) for p in RAGGED]
    steps = steps_per_client(sizes, 4, num_epochs=1)
    assert steps.tolist() == [3, 1, 5]
    out = pack_clients(
        _toy_features(30),
        RAGGED,
        batch_size=4,
        seed=0,
        round_idx=0,
        client_ids=[1],
        num_epochs=1,
        pad_steps_to=int(steps.max()),
    )
    assert out["mask"].shape == (1, 5, 4) and out["mask"].sum() == 3


def test_pack_eval_and_per_client_eval() -> None:
    feats = _toy_features(30)
    ev = pack_eval(feats, 8)
    assert ev["input_ids"].shape == (4, 8, 2) and ev["mask"].sum() == 30
    assert ev["input_ids"][..., 0].reshape(-1)[:30].tolist() == list(range(30))  # in order
    sub = pack_eval(feats, 8, indices=np.arange(5, 10))
    assert sub["mask"].shape == (1, 8) and sub["mask"].sum() == 5
    per = pack_clients_eval(feats, RAGGED, 4)
    assert per["mask"].shape == (3, 5, 4)
    assert per["mask"].sum(axis=(1, 2)).tolist() == [10, 3, 17]
    assert per["input_ids"][2, ..., 0].reshape(-1)[:17].tolist() == list(range(13, 30))


def test_image_packing_float32(shared_data: Path, cache_dir: Path) -> None:
    from fedjax_lm.data import image_features

    task = load_task("cifar10", shared_data, cache_dir=cache_dir, per_class=2)
    feats = image_features(task.train)
    part = iid(task.train.labels, 4, seed=0)  # 4 x 5
    out = pack_clients(feats, part, batch_size=2, seed=0, round_idx=0, num_epochs=1)
    assert set(out) == {"image", "label", "mask"}
    assert out["image"].shape == (4, 3, 2, 32, 32, 3) and out["image"].dtype == np.float32
    assert out["image"].min() >= 0.0 and out["image"].max() <= 1.0
    assert out["mask"].sum() == 20
    ev = pack_eval(image_features(task.test), 8)
    assert ev["image"].shape == (3, 8, 32, 32, 3) and ev["mask"].sum() == 20


@pytest.mark.parametrize(
    "name,params,num_clients",
    [
        ("iid", {}, 4),
        ("label_sorted", {}, 4),
        ("dirichlet", {"alpha": 0.5}, 4),
        ("majority", {"p": 0.8, "k": 1}, 4),
        ("quantity_skew", {"beta": 1.0}, 4),
    ],
)
def test_every_partitioner_packs_imdb(
    imdb_fixture, tokenizer, cache_dir: Path, name: str, params: dict, num_clients: int
) -> None:
    tok = tokenize_task(imdb_fixture, tokenizer, 32, cache_dir=cache_dir)
    feats = tok["train"].features
    part = make_partitioner(name, **params)(imdb_fixture.train.labels, num_clients, 0)
    sizes = [len(p) for p in part]
    out = pack_clients(feats, part, batch_size=8, seed=0, round_idx=0, num_epochs=2)
    steps = int(steps_per_client(sizes, 8, num_epochs=2).max())
    assert out["input_ids"].shape == (num_clients, steps, 8, 32)
    for key in ("attention_mask", "token_type_ids"):
        assert out[key].shape == (num_clients, steps, 8, 32)
    assert out["label"].shape == out["mask"].shape == (num_clients, steps, 8)
    assert out["mask"].sum(axis=(1, 2)).tolist() == [2 * s for s in sizes]
    assert (out["attention_mask"][..., 0] == 1).all()  # no all-padding rows, even when masked
    ev = pack_eval(tok["test"].features, 16)
    assert ev["input_ids"].shape == (7, 16, 32) and ev["mask"].sum() == 100


def test_natural_partition_packs_blog(blog_fixture, tokenizer, cache_dir: Path) -> None:
    tok = tokenize_task(blog_fixture, tokenizer, 16, cache_dir=cache_dir)
    part = make_partitioner("natural", groups=blog_fixture.train.groups)(
        blog_fixture.train.labels, None, 0
    )
    out = pack_clients(tok["train"].features, part, batch_size=5, seed=0, round_idx=0, num_steps=3)
    assert out["input_ids"].shape == (10, 3, 5, 16)
    # every client's batches hold only its own author's label
    assert all(len(np.unique(out["label"][c])) == 1 for c in range(10))


def test_quantity_skew_pack_mask_sums(imdb_fixture) -> None:
    part = quantity_skew(imdb_fixture.train.labels, 6, seed=2, beta=0.3)
    feats = {"input_ids": np.zeros((200, 4), np.int32), "label": imdb_fixture.train.labels}
    out = pack_clients(feats, part, batch_size=16, seed=0, round_idx=1, num_epochs=3)
    assert out["mask"].sum(axis=(1, 2)).tolist() == [3 * len(p) for p in part]
