"""Sampling: temperature, top-k and top-p keep exactly the characters they promise; generation is reproducible."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn import model, sample
from charrnn.cells import TransposedWeight
from charrnn.config import ModelConfig
from charrnn.data import Vocab

LOGITS = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.25, 0.2], [0.5, 0.2, 0.15, 0.1, 0.05]]))


def draws(logits, temperature, top_k, top_p, count=2000):
    keys = jax.random.split(jax.random.key(0), count)
    def choose(key):
        noise = jax.random.gumbel(key, logits.shape)
        nucleus = jnp.float32(top_p) if top_p < 1.0 else None  # as `generate` passes it
        return sample.choose(logits, noise, jnp.float32(temperature), top_k, nucleus)

    choose = jax.jit(jax.vmap(choose))
    return np.asarray(choose(keys))  # [count, B]


@pytest.mark.parametrize("top_k, top_p, kept", [
    (2, 1.0, [{1, 3}, {0, 1}]),
    (0, 0.6, [{1, 3}, {0, 1}]),  # smallest sets reaching 0.6: 0.4 + 0.25, and 0.5 + 0.2
    (0, 0.5, [{1, 3}, {0}]),  # 0.4 alone is short of 0.5; 0.5 alone reaches it
    (3, 0.3, [{1}, {0}]),
    (0, 1.0, [{0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}]),
])
def test_never_samples_outside_the_kept_set(top_k, top_p, kept):
    chosen = draws(LOGITS, 1.0, top_k, top_p)
    for stream, allowed in enumerate(kept):
        assert set(np.unique(chosen[:, stream]).tolist()) == allowed  # all kept ones appear, nothing else


def test_kept_characters_keep_their_relative_probabilities():
    chosen = draws(LOGITS, 1.0, 2, 1.0, count=20000)[:, 0]
    share = np.mean(chosen == 1)
    assert abs(share - 0.4 / 0.65) < 0.02  # renormalised over the two kept characters


# Nucleus sets worked by hand from LOGITS = log p, tempered first: at T = 2 the probabilities are
# proportional to sqrt(p), at T = 0.5 to p**2, renormalised over the top k when k is set.
# In every case the nucleus of the untempered p would be another set (given after "not").
TEMPERED_NUCLEUS_CASES = [
    # row 0: .298 + .236 = .534 < .6 keeps a third, not {1, 3}; row 1: .340 + .215 < .6, not {0, 1}
    (2.0, 0, 0.6, [{1, 3, 4}, {0, 1, 2}]),
    # row 0: .582 < .75, .809 reaches it, not {1, 3, 4}; row 1: .769 alone, not {0, 1, 2}
    (0.5, 0, 0.75, [{1, 3}, {0}]),
    # over the top 3: row 0 .400 < .55, .717 reaches it (without top-k .534 < .55 would keep 4 too);
    # row 1 .459 < .55, not {0}: untempered .588 alone reaches it
    (2.0, 3, 0.55, [{1, 3}, {0, 1}]),
    # over the top 4: row 0 .587 < .8, .817 reaches it, not {1, 3, 4}; row 1 .775 < .8, .899, not {0, 1, 2}
    (0.5, 4, 0.8, [{1, 3}, {0, 1}]),
]


def kept_mask(kept) -> np.ndarray:
    """Sets of kept character ids, one per row, as a boolean mask [B, V] shaped like LOGITS."""
    return np.array([[character in row for character in range(LOGITS.shape[1])] for row in kept])


def renormalised_tempered(temperature: float, kept: np.ndarray) -> np.ndarray:
    """softmax(LOGITS / T) in float64, zero outside `kept` [B, V] and rescaled to sum to 1 per row."""
    tempered = np.exp(np.asarray(LOGITS, np.float64) / temperature)
    weights = np.where(kept, tempered, 0.0)
    return weights / weights.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature, top_k, top_p, kept", TEMPERED_NUCLEUS_CASES)
def test_top_p_keeps_the_nucleus_of_the_tempered_distribution_with_its_shares(temperature, top_k, top_p, kept):
    filtered = np.asarray(sample.filter_logits(LOGITS, jnp.float32(temperature), top_k, jnp.float32(top_p)))  # [B, V]
    kept = kept_mask(kept)
    np.testing.assert_array_equal(np.isneginf(filtered), ~kept)  # exactly the nucleus is left, nothing else is -inf
    assert np.isfinite(filtered[kept]).all()
    # The kept characters share in proportion to their tempered probabilities, not equally.
    shares = np.exp(filtered - filtered.max(axis=-1, keepdims=True))
    shares /= shares.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(shares, renormalised_tempered(temperature, kept), rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature, top_k, top_p, kept", TEMPERED_NUCLEUS_CASES[::2])  # one per top-k setting
def test_draws_follow_the_renormalised_tempered_nucleus(temperature, top_k, top_p, kept):
    chosen = draws(LOGITS, temperature, top_k, top_p, count=20000)  # [count, B]
    expected = renormalised_tempered(temperature, kept_mask(kept))
    for stream in range(2):
        share = np.bincount(chosen[:, stream], minlength=5) / len(chosen)
        np.testing.assert_allclose(share, expected[stream], atol=0.015)


def test_temperature_zero_and_tiny_temperatures_are_argmax():
    for temperature in (0.0, 1e-30, 1e-6):
        chosen = draws(LOGITS, temperature, 0, 1.0, count=50)
        assert (chosen == np.array([1, 0])).all()
    for top_k, top_p in ((3, 1.0), (0, 0.9), (5, 1.0)):  # through the filtering path too
        assert (draws(LOGITS, 0.0, top_k, top_p, count=200) == np.array([1, 0])).all()
    filtered = sample.filter_logits(LOGITS, jnp.float32(1e-30), 0, jnp.float32(1.0))
    assert not np.isnan(np.asarray(filtered)).any()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_k", [0, 5])  # with nothing to filter, and through the filtering path
def test_draws_follow_the_tempered_softmax(temperature, top_k):
    chosen = draws(LOGITS, temperature, top_k, 1.0, count=20000)
    expected = np.asarray(jax.nn.softmax(LOGITS / temperature, axis=-1))
    for stream in range(2):
        share = np.bincount(chosen[:, stream], minlength=5) / len(chosen)
        np.testing.assert_allclose(share, expected[stream], atol=0.015)


@pytest.mark.parametrize("temperature", [100.0, 3e38])  # the largest float32 temperatures too
def test_high_temperature_flattens(temperature):
    chosen = draws(LOGITS, temperature, 0, 1.0, count=20000)[:, 0]
    assert np.allclose(np.bincount(chosen, minlength=5) / len(chosen), 0.2, atol=0.02)


@pytest.mark.parametrize("temperature", [1e36, 3e38])  # tempered logits all round to 0 here
def test_top_k_holds_at_any_temperature(temperature):
    assert (draws(LOGITS, temperature, 1, 1.0, count=200) == np.array([1, 0])).all()
    chosen = draws(LOGITS, temperature, 2, 1.0, count=4000)
    for stream, allowed in enumerate([{1, 3}, {0, 1}]):
        assert set(np.unique(chosen[:, stream]).tolist()) == allowed


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_character():
    assert np.float32(1e-50) == 0
    assert (draws(LOGITS, 1.0, 0, 1e-50, count=200) == np.array([1, 0])).all()


def test_temperatures_past_float32_sample_without_overflow_warnings(recwarn):
    config = ModelConfig(cell="rnn", num_layers=1, hidden_size=8, embedding_size=4)
    params = model.init_params(jax.random.key(0), config, 5)
    texts = [np.concatenate(list(sample.generate((params,), (config,), np.array([0]), 40, 2, seed=1, temperature=t,
                                                 top_k=2))) for t in (1e40, sample.MAX_TEMPERATURE)]
    np.testing.assert_array_equal(texts[0], texts[1])
    assert not [warning for warning in recwarn if "overflow" in str(warning.message)]


def test_generation_does_not_depend_on_how_it_is_cut_into_blocks(monkeypatch):
    config = ModelConfig(cell="gru", num_layers=2, hidden_size=16, embedding_size=8)
    params = model.init_params(jax.random.key(1), config, 11)
    prime = np.array([3, 1, 4, 1, 5])

    def text(block):
        monkeypatch.setattr(sample, "BLOCK", block)
        return np.concatenate(list(sample.generate((params,), (config,), prime, 50, 3, 7, 0.9, 4, 0.95)))

    whole, pieces = text(64), text(7)
    assert whole.shape == (50, 3) and np.array_equal(whole, pieces)
    assert not np.array_equal(whole[:, 0], whole[:, 1])  # streams are independent draws


@pytest.mark.parametrize("length", [1, 5, 127, 128, 129, 200, 800, 1000, 1024, 5000])
def test_blocks_cover_the_length_in_the_fewest_calls_of_one_length(length):
    block = sample.block_length(length)
    blocks = -(-length // block)
    assert block <= sample.BLOCK and blocks == -(-length // sample.BLOCK)
    assert length <= blocks * block < length + blocks


def test_generate_runs_equal_blocks_and_yields_exactly_the_length(monkeypatch):
    config = ModelConfig(cell="rnn", num_layers=1, hidden_size=8, embedding_size=4)
    params = model.init_params(jax.random.key(2), config, 7)
    lengths, run_block = [], sample.generate_block

    def recording_block(*args, **kwargs):
        lengths.append(args[-2])
        return run_block(*args, **kwargs)

    monkeypatch.setattr(sample, "generate_block", recording_block)
    monkeypatch.setattr(sample, "BLOCK", 16)
    out = np.concatenate(list(sample.generate((params,), (config,), np.array([1]), 50, 2, 0, 1.0)))
    assert out.shape == (50, 2) and lengths == [13, 13, 13, 13]  # not 16, 16, 16, 16 with 14 thrown away


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_one_stream_steps_with_transposed_weights_as_with_the_weights(cell):
    config = ModelConfig(cell=cell, num_layers=2, hidden_size=16, embedding_size=8)
    params = model.init_params(jax.random.key(3), config, 11)
    plain, transposed = sample.generation_params(params, config, False), sample.generation_params(params, config, True)
    assert isinstance(transposed["layers"][1]["w_h"], TransposedWeight) and isinstance(transposed["output"]["w"], TransposedWeight)
    carries = [model.initial_carry(params, config, 1)] * 2
    for character in [3, 1, 4, 1, 5, 9, 2, 6]:  # the state carried over several steps
        outputs = [model.step(prepared, config, carry, jnp.array([character]))
                   for prepared, carry in zip((plain, transposed), carries)]
        carries = [carry for carry, _ in outputs]
        np.testing.assert_allclose(outputs[1][1], outputs[0][1], rtol=1e-5, atol=1e-6)  # logits
        for leaf_transposed, leaf_plain in zip(jax.tree.leaves(carries[1]), jax.tree.leaves(carries[0]), strict=True):
            np.testing.assert_allclose(leaf_transposed, leaf_plain, rtol=1e-5, atol=1e-6)


def test_priming_equals_running_the_model_over_the_prime():
    config = ModelConfig(cell="lstm", num_layers=2, hidden_size=16, embedding_size=8)
    params = model.init_params(jax.random.key(2), config, 11)
    prime = np.array([3, 1, 4, 1, 5, 9])
    greedy = np.concatenate(list(sample.generate((params,), (config,), prime, 1, 1, 0, 0.0)))[0, 0]
    carry = model.initial_carry(params, config, 1)
    _, logits = model.forward(params, config, carry, jnp.asarray(prime)[:, None])
    assert greedy == int(jnp.argmax(logits[-1, 0]))


def test_first_argmax_equals_jnp_argmax_with_ties_and_infinities():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (200, 9)).astype(np.float32)  # many ties
    x[::7, 3] = -np.inf
    x[::11] = -np.inf  # whole rows of -inf: index 0, as jnp.argmax
    x[5, 2] = np.inf
    got = np.asarray(sample.first_argmax(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def test_a_model_with_itself_writes_what_it_writes_alone_and_other_cells_write_their_mean():
    """An ensemble of one model twice is that model (a product of experts would sharpen it); a GRU and an LSTM
    together write, greedily, the most likely character of the mean of their one-pass distributions."""
    lstm = ModelConfig(cell="lstm", num_layers=2, hidden_size=16, embedding_size=8)
    gru = ModelConfig(cell="gru", num_layers=1, hidden_size=12, embedding_size=8)
    lstm_params, gru_params = model.init_params(jax.random.key(4), lstm, 11), model.init_params(jax.random.key(5), gru, 11)
    lstm_params["output"]["w"] = 8.0 * lstm_params["output"]["w"]  # distributions far from uniform
    prime = np.array([3, 1, 4])

    def written(params, configs, temperature):
        return np.concatenate(list(sample.generate(params, configs, prime, 40, 2, 9, temperature)))

    alone = written((lstm_params,), (lstm,), 1.0)
    np.testing.assert_array_equal(written((lstm_params, lstm_params), (lstm, lstm), 1.0), alone)

    ids = written((lstm_params, gru_params), (lstm, gru), 0.0)[:, 0]
    text = np.concatenate([prime, ids])
    probs = []
    for params, config in ((lstm_params, lstm), (gru_params, gru)):
        _, logits = model.forward(params, config, model.initial_carry(params, config, 1), jnp.asarray(text)[:, None])
        logits = np.asarray(logits[:, 0], np.float64)
        probs.append(np.exp(logits - logits.max(axis=-1, keepdims=True)))
        probs[-1] /= probs[-1].sum(axis=-1, keepdims=True)
    expected = np.argmax(np.mean(probs, axis=0), axis=-1)[len(prime) - 1 : -1]
    np.testing.assert_array_equal(ids, expected)
    assert not np.array_equal(ids, written((lstm_params,), (lstm,), 0.0)[:, 0])


def test_a_stop_string_split_between_blocks_ends_the_sample(monkeypatch):
    """`stop` is found across the join of two blocks, not only inside one."""
    blocks = [np.array([[0], [1]]), np.array([[2], [3]]), np.array([[0], [0]])]  # "ab", "cd", "aa"
    monkeypatch.setattr(sample, "generate", lambda *args: iter(blocks))
    pieces = list(sample.generate_text((), (), Vocab("abcd"), "", 6, 1, 0, 0.0, stop="bc"))
    assert "".join(piece[0] for piece in pieces) == "abc"


@pytest.mark.parametrize("prime", [[3], [3, 1], [3, 1, 4, 1, 5]])  # a one-id prime is not primed; two ids are
@pytest.mark.parametrize("num_samples", [1, 2])
def test_greedy_text_continues_the_prime_as_the_model_reads_it(prime, num_samples, monkeypatch):
    """At temperature 0 each character is the argmax of the model run (`model.forward`) over the prime and
    everything written so far: the whole prime conditions the state, and the state is carried across blocks."""
    monkeypatch.setattr(sample, "BLOCK", 5)  # 12 characters in three blocks of 4
    config = ModelConfig(cell="lstm", num_layers=1, hidden_size=16, embedding_size=8)
    params = model.init_params(jax.random.key(6), config, 11)
    params["output"]["w"] = 8.0 * params["output"]["w"]  # distributions far from uniform: no near ties
    written = np.concatenate(list(sample.generate((params,), (config,), np.array(prime), 12, num_samples, 0, 0.0)))
    assert written.shape == (12, num_samples) and (written == written[:, :1]).all()  # greedy streams agree
    text = np.concatenate([prime, written[:, 0]])
    _, logits = model.forward(params, config, model.initial_carry(params, config, 1), jnp.asarray(text)[:, None])
    expected = np.argmax(np.asarray(logits[:, 0]), axis=-1)[len(prime) - 1 : -1]  # the prediction after each id
    np.testing.assert_array_equal(written[:, 0], expected)


def test_a_seed_gives_its_own_text_again_and_another_seed_other_text():
    config = ModelConfig(cell="gru", num_layers=1, hidden_size=8, embedding_size=4)
    params = model.init_params(jax.random.key(7), config, 9)

    def written(seed):
        return np.concatenate(list(sample.generate((params,), (config,), np.array([2, 5]), 40, 2, seed, 1.0)))

    np.testing.assert_array_equal(written(11), written(11))
    assert not np.array_equal(written(11), written(12))


def test_default_prime_is_a_newline_else_the_first_character():
    assert sample.prime_ids(Vocab("\t\nab"), "").tolist() == [1]  # "\n" even where a tab sorts first
    assert sample.prime_ids(Vocab("ab"), "").tolist() == [0]
    assert sample.prime_ids(Vocab("\t\nab"), "ba\n").tolist() == [3, 2, 1]


def test_a_sample_that_meets_its_stop_ends_and_the_others_write_on(monkeypatch):
    """Each sample ends alone: an ended one yields "" while the rest write their whole length."""
    blocks = [np.array([[0, 2], [1, 2]]), np.array([[2, 3], [0, 3]]), np.array([[3, 0], [3, 1]])]  # [2, B] each
    monkeypatch.setattr(sample, "generate", lambda *args: iter(blocks))
    pieces = list(sample.generate_text((), (), Vocab("abcd"), "d", 6, 2, 0, 0.0, stop="bc"))
    assert pieces == [["d", "d"], ["ab", "cc"], ["c", "dd"], ["", "ab"]]


def test_a_stop_inside_the_prime_does_not_end_the_sample(monkeypatch):
    """A stop the prime holds whole is not one the generated text completes: the sample is written on from."""
    blocks = [np.array([[2], [3]]), np.array([[0], [1]]), np.array([[2], [2]])]  # "cd", "ab", "cc"
    monkeypatch.setattr(sample, "generate", lambda *args: iter(blocks))
    pieces = list(sample.generate_text((), (), Vocab("abcd"), "dabd", 6, 1, 0, 0.0, stop="ab"))
    assert "".join(piece[0] for piece in pieces) == "dabdcdab"


def test_a_stop_that_the_prime_begins_and_the_generated_text_completes_ends_the_sample(monkeypatch):
    blocks = [np.array([[1], [2]]), np.array([[3], [3]])]  # "bc", "dd"
    monkeypatch.setattr(sample, "generate", lambda *args: iter(blocks))
    pieces = list(sample.generate_text((), (), Vocab("abcd"), "da", 4, 1, 0, 0.0, stop="ab"))
    assert "".join(piece[0] for piece in pieces) == "dab"
