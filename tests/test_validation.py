"""Token ids are checked at every entry that takes them: a bad id is a ValueError naming the id
and its position, never a segfault, a C++ exception or silently wrong logits."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx import generate, load, stream_generate
from qwen2_mlx.generate import generate_step
from qwen2_mlx.sampling import SamplingParams
from qwen2_mlx.validation import TokenIdError, check_token_array, check_token_ids

from conftest import TINY_VOCAB


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load(tiny_checkpoint)


@pytest.mark.parametrize(
    "ids,message",
    [
        ([1, 2, 512], "token id 512 at position 2 is outside the model's vocabulary"),
        ([-1], "token id -1 at position 0 is outside"),
        ([3, 999999999], "token id 999999999 at position 1"),
        ([1, 2.0], r"position 1 is 2.0 \(float\), not an int"),
        ([True], r"position 0 is True \(bool\), not an int"),
        ([[1, 2]], r"position 0 is \[1, 2\] \(list\), not an int"),
        (b"hello", "got bytes: decode it to str first"),
        ("hello", "got str: encode it with the tokenizer first"),
        (np.array([1.0, 2.0]), "must be integers, got an array of dtype float64"),
        (np.array([[1, 2]]), "must be 1-D"),
        (mx.array([1, 2], mx.float32), "must be integers"),
    ],
)
def test_check_token_ids_names_the_bad_id(ids, message):
    with pytest.raises(ValueError, match=message):
        check_token_ids(ids, TINY_VOCAB)


def test_check_token_ids_accepts_int_sequences_and_arrays():
    assert check_token_ids([0, np.int64(5), 511], TINY_VOCAB) == [0, 5, 511]
    assert check_token_ids(np.array([3, 4], np.uint32), TINY_VOCAB) == [3, 4]
    assert check_token_ids(mx.array([7, 8]), TINY_VOCAB) == [7, 8]


def test_check_token_array_names_row_and_column():
    check_token_array(mx.array([[0, 511]]), TINY_VOCAB)
    with pytest.raises(ValueError, match="token id 600 at position 1 "):
        check_token_array(mx.array([[3, 600]]), TINY_VOCAB)
    with pytest.raises(ValueError, match=r"token id -4 at position \(1, 0\)"):
        check_token_array(mx.array([[3, 4], [-4, 1]]), TINY_VOCAB)
    with pytest.raises(ValueError, match="must be integers"):
        check_token_array(mx.array([[True]]), TINY_VOCAB)


# Ids far past the table crash an unchecked process: those run in a child process below, so
# that a regression fails a test rather than killing the suite.
BAD_PROMPTS = [([TINY_VOCAB], "token id 512 at position 0"),
               ([5, TINY_VOCAB + 1], "token id 513 at position 1"),
               ([-1], "token id -1 at position 0"),
               (b"hello", "the prompt is bytes"),
               ([1.5, 2.5], "position 0 is 1.5")]


@pytest.mark.parametrize("prompt,message", BAD_PROMPTS)
def test_generate_rejects_bad_ids(loaded, prompt, message):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, prompt, max_tokens=3)
    with pytest.raises(ValueError, match=message):
        next(stream_generate(model, tokenizer, prompt, max_tokens=3))


@pytest.mark.parametrize("prompt", [[TINY_VOCAB], [-1], [1, 2.0]])
def test_generate_step_rejects_bad_ids_and_leaves_the_cache_alone(loaded, prompt):
    model, _ = loaded
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="position"):
        next(generate_step(prompt, model, sampling=SamplingParams(), cache=cache))
    assert cache.offset == 3 and cache.tokens == [1, 2, 3]


@pytest.mark.parametrize(
    "ids,message",
    [(mx.array([[1, TINY_VOCAB]]), "token id 512 at position 1"),
     (mx.array([[-1, 2]]), "token id -1 at position 0"),
     (mx.array([[600]], mx.uint32), "token id 600 at position 0"),
     (mx.array([[1.0, 2.0]]), "must be integers"),
     ([[1, 2]], "must be an mx.array")],
)
def test_model_call_rejects_bad_ids_before_touching_the_cache(loaded, ids, message):
    """`model(ids, cache)` is also how a cache is prefilled by hand."""
    model, _ = loaded
    cache = model.make_cache()
    with pytest.raises(ValueError, match=message):
        model(ids, cache=cache)
    assert cache.offset == 0


def test_huge_id_is_an_error_not_a_segfault(tiny_checkpoint):
    """Before the checks, this id read past the embedding table and killed the process
    (exit 139); run in a child so that a regression fails this test instead of the suite."""
    script = textwrap.dedent(f"""
        from qwen2_mlx import generate, load
        model, tokenizer = load({str(tiny_checkpoint)!r})
        try:
            generate(model, tokenizer, [999999999], max_tokens=3)
        except ValueError as e:
            print("ValueError:", e)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ValueError: token id 999999999 at position 0 is outside" in result.stdout


def test_token_id_error_is_both_value_and_type_error():
    """ValueError as documented; TypeError too, for callers of the old non-int check."""
    with pytest.raises(TokenIdError) as info:
        check_token_ids([1.5], TINY_VOCAB)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    assert not info.value.out_of_range
    with pytest.raises(TokenIdError) as info:
        check_token_ids([TINY_VOCAB], TINY_VOCAB)
    assert info.value.out_of_range
