"""ModelCache: a model's per-layer caches plus the token ids they hold, trimmed and saved
together; a plain list of layer caches still works wherever caches are taken."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx import ModelCache, load, load_cache, save_cache
from qwen2_mlx.cache import UNKNOWN_TOKEN, KVCache


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load(tiny_checkpoint)[0]


def test_make_cache_is_a_list_of_layer_caches_that_records_ids(model):
    cache = model.make_cache()
    assert isinstance(cache, list) and len(cache) == len(model.layers)
    assert all(isinstance(c, KVCache) for c in cache)
    model(mx.array([[4, 5, 6]]), cache=cache)
    model.forward(mx.array([[7]]), cache=cache)  # a lazy id: read when `tokens` is
    assert cache.offset == 4 and cache.tokens == [4, 5, 6, 7]


def test_trim_trims_every_layer_and_the_ids(model):
    cache = model.make_cache()
    model(mx.array([[4, 5, 6, 7, 8]]), cache=cache)
    assert cache.trim(2) == 2
    assert [c.offset for c in cache] == [3, 3] and cache.tokens == [4, 5, 6]
    assert cache.trim(10) == 3 and cache.tokens == [] and cache.offset == 0
    # Trimming a layer directly is tolerated: the ids follow the layers.
    model(mx.array([[1, 2, 3]]), cache=cache)
    for c in cache:
        c.trim(1)
    assert cache.tokens == [1, 2]


def test_wrapped_plain_list_has_unknown_ids(model):
    layers = list(model.make_cache())
    model(mx.array([[4, 5]]), cache=layers)
    cache = ModelCache.wrap(layers)
    assert cache.tokens == [UNKNOWN_TOKEN] * 2 and not cache.tokens_known
    assert ModelCache.wrap(cache) is cache
    with pytest.raises(ValueError, match="3 token ids for a cache holding 2 positions"):
        ModelCache(layers, tokens=[1, 2, 3])


@pytest.mark.parametrize("name", ["prefix.safetensors", "prefix.cache", "prefix"])
def test_save_and_load_round_trip_any_file_name_with_ids(model, tmp_path, name):
    cache = model.make_cache()
    model(mx.array([[9, 8, 7]]), cache=cache)
    save_cache(tmp_path / name, cache, {"who": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left behind
    restored, meta = load_cache(tmp_path / name)
    assert isinstance(restored, ModelCache) and meta == {"who": "test"}
    assert restored.tokens == [9, 8, 7]
    for a, b in zip(cache, restored, strict=True):
        np.testing.assert_array_equal(np.array(a.state[0]), np.array(b.state[0]))


def test_load_cache_of_a_file_without_ids_marks_them_unknown(model, tmp_path):
    cache = model.make_cache()
    model(mx.array([[9, 8]]), cache=cache)
    save_cache(tmp_path / "c.safetensors", cache)
    arrays, meta = mx.load(str(tmp_path / "c.safetensors"), return_metadata=True)
    del arrays["tokens"]  # as written before the ids were saved
    mx.save_safetensors(str(tmp_path / "old.safetensors"), arrays, metadata=meta)
    restored, _ = load_cache(tmp_path / "old.safetensors")
    assert restored.tokens == [UNKNOWN_TOKEN, UNKNOWN_TOKEN] and restored.offset == 2


def test_load_cache_of_a_non_cache_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="cannot read the cache file"):
        load_cache(tmp_path / "x.safetensors")
