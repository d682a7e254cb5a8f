"""Tokenisation with a real WordPiece tokenizer, and its on-disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedjax_lm.data import DataError, tokenize_split, tokenize_task, tokenizer_fingerprint


def test_truncate_pad_masks(imdb_fixture, tokenizer, tmp_path: Path) -> None:
    out = tokenize_task(imdb_fixture, tokenizer, 64, cache_dir=tmp_path)
    tr = out["train"].features
    assert set(tr) == {"input_ids", "attention_mask", "token_type_ids", "label"}
    assert tr["input_ids"].shape == (200, 64) and tr["input_ids"].dtype == np.int32
    assert out["test"].features["input_ids"].shape == (100, 64)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    assert (tr["input_ids"][:, 0] == cls).all()
    lengths = tr["attention_mask"].sum(1)
    # every review is longer than 64 tokens except short ones; long ones end in [SEP] at 63
    long = lengths == 64
    assert long.any() and (tr["input_ids"][long, 63] == sep).all()
    short = np.flatnonzero(~long)
    for i in short:  # padded: [SEP] then pad ids where the mask is 0
        assert tr["input_ids"][i, lengths[i] - 1] == sep
        assert (tr["input_ids"][i, lengths[i] :] == pad).all()
    assert ((tr["attention_mask"] == 0) == (tr["input_ids"] == pad)).all()
    assert (tr["token_type_ids"] == 0).all()
    assert np.array_equal(tr["label"], imdb_fixture.train.labels)
    # matches the tokenizer called directly
    direct = tokenizer(imdb_fixture.train.texts[5], truncation=True, max_length=64)["input_ids"]
    assert tr["input_ids"][5, : len(direct)].tolist() == direct


def test_cache_hit_on_second_call(blog_fixture, tokenizer, tmp_path: Path) -> None:
    kw = dict(task="blog10", split_name="train", cache_dir=tmp_path)
    first = tokenize_split(blog_fixture.train, tokenizer, 32, **kw)
    second = tokenize_split(blog_fixture.train, tokenizer, 32, **kw)
    assert not first.cache_hit and second.cache_hit
    assert first.cache_path == second.cache_path and (second.cache_path / "store.json").is_file()
    for key, value in first.features.items():
        assert np.array_equal(value, second.features[key])
    assert not list(tmp_path.rglob("*.tmp"))  # atomic write left nothing behind
    # any change of max length or data is a different store
    other_len = tokenize_split(blog_fixture.train, tokenizer, 48, **kw)
    subset = tokenize_split(blog_fixture.train.select(range(50)), tokenizer, 32, **kw)
    assert not other_len.cache_hit and not subset.cache_hit
    assert len({first.cache_path, other_len.cache_path, subset.cache_path}) == 3


def test_store_round_trip_equals_in_memory_arrays(imdb_fixture, tokenizer, tmp_path: Path):
    """The memory-mapped store holds exactly what tokenising in memory gives, dtype included."""
    kw = dict(task="imdb", split_name="train", cache_dir=tmp_path)
    memory = tokenize_split(imdb_fixture.train, tokenizer, 40, use_cache=False, **kw)
    built = tokenize_split(imdb_fixture.train, tokenizer, 40, **kw)
    reread = tokenize_split(imdb_fixture.train, tokenizer, 40, **kw)
    assert reread.cache_hit and isinstance(reread.features["input_ids"], np.memmap)
    for out in (built, reread):
        assert set(out.features) == set(memory.features)
        for key, value in memory.features.items():
            assert out.features[key].dtype == value.dtype
            assert np.array_equal(out.features[key], value)


def test_store_of_another_tokenizer_or_task_is_rebuilt_in_one_line(
    blog_fixture, tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import copy

    other = copy.deepcopy(tokenizer)
    other.padding_side = "left"  # another fingerprint
    store = tmp_path / "my_store"
    kw = dict(split_name="train", store_dir=store)
    tokenize_split(blog_fixture.train, tokenizer, 32, task="blog10", **kw)
    with caplog.at_level("WARNING", logger="fedjax_lm.data.tokenization"):
        again = tokenize_split(blog_fixture.train, other, 32, task="blog10", **kw)
        moved = tokenize_split(blog_fixture.train, other, 32, task="blog50", **kw)
    first, second = (r.getMessage() for r in caplog.records)
    assert first.startswith(f"population store {store}: it was built for another tokenizer")
    assert "rebuilding it" in first and "\n" not in first
    assert "task 'blog10' (now 'blog50')" in second
    assert not again.cache_hit and not moved.cache_hit
    fresh = tokenize_split(blog_fixture.train, other, 32, task="blog50", split_name="train",
                           use_cache=False)
    for key, value in fresh.features.items():
        assert np.array_equal(moved.features[key], value)
    assert tokenize_split(blog_fixture.train, other, 32, task="blog50", **kw).cache_hit
    assert not list(tmp_path.glob(".*"))  # no temp or old folder left behind


@pytest.mark.parametrize("damage", ["truncate", "garble_meta", "wrong_shape", "missing"])
def test_damaged_store_is_named_and_rebuilt(
    blog_fixture, tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    kw = dict(task="blog10", split_name="train", cache_dir=tmp_path)
    first = tokenize_split(blog_fixture.train, tokenizer, 32, **kw)
    expected = {k: np.array(v) for k, v in first.features.items()}  # off the map damaged below
    entry = first.cache_path
    del first  # a mapped file cut short under its map faults (SIGBUS) when read
    ids = entry / "input_ids.npy"
    data = ids.read_bytes()
    if damage == "truncate":  # a copy cut short, a full disk
        ids.write_bytes(data[: len(data) // 2])
    elif damage == "garble_meta":
        (entry / "store.json").write_text("{not json")
    elif damage == "wrong_shape":  # a valid file of the wrong shape
        np.save(ids, np.zeros((3, 32), np.int32))
    else:
        ids.unlink()
    with caplog.at_level("WARNING", logger="fedjax_lm.data.tokenization"):
        again = tokenize_split(blog_fixture.train, tokenizer, 32, **kw)
    (record,) = caplog.records
    assert str(entry) in record.getMessage() and "damaged" in record.getMessage()
    assert "\n" not in record.getMessage()
    assert not again.cache_hit and again.cache_path == entry
    for key, value in expected.items():
        assert np.array_equal(value, again.features[key])
    assert tokenize_split(blog_fixture.train, tokenizer, 32, **kw).cache_hit  # rebuilt entry


def test_cache_dir_that_is_a_file_is_one_clear_error(blog_fixture, tokenizer, tmp_path: Path):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"cache directory .*cache/tokenized is unusable .*"
                                        r"FEDJAX_LM_CACHE_DIR"):
        tokenize_split(blog_fixture.test, tokenizer, 16, task="blog10", split_name="test",
                       cache_dir=blocker)


def test_cache_dir_from_env(
    blog_fixture, tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(tmp_path / "env_cache"))
    out = tokenize_split(blog_fixture.test, tokenizer, 16, task="blog10", split_name="test")
    assert out.cache_path.parent == tmp_path / "env_cache" / "tokenized"


def test_tokenizer_fingerprint_tracks_behaviour(tokenizer) -> None:
    import copy

    fp = tokenizer_fingerprint(tokenizer)
    assert fp == tokenizer_fingerprint(copy.deepcopy(tokenizer))
    other = copy.deepcopy(tokenizer)
    other.padding_side = "left"
    assert tokenizer_fingerprint(other) != fp


def test_image_task_is_not_tokenised(tokenizer) -> None:
    from fedjax_lm.data import Split, TaskData

    split = Split(labels=np.zeros(2, np.int32), images=np.zeros((2, 32, 32, 3), np.uint8))
    task = TaskData("img", split, split, 2, ("a", "b"), modality="image")
    with pytest.raises(DataError, match="image, not text"):
        tokenize_task(task, tokenizer, 16)
