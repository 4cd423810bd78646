"""Recorded activations against the model's own forward pass; text features; finding planted units."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn import activations, checkpoint, config as config_lib, model
from charrnn.config import Config, ModelConfig

VOCAB, LENGTH, CHUNK = 9, 37, 16  # 37 characters in chunks of 16: two boundaries and a padded last chunk


def noisy_params(config: ModelConfig, seed: int) -> dict:
    """Initialised params plus noise, so that biases and learned initial states are not zero."""
    rng = np.random.default_rng(seed)
    params = model.init_params(jax.random.key(seed), config, VOCAB)
    return jax.tree.map(lambda leaf: leaf + jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), jnp.float32), params)


CASES = [
    ("lstm", 0, {}),
    ("lstm", 1, {}),
    ("gru", 1, {}),
    ("rnn", 1, {}),
    ("lstm", 1, {"learn_initial_state": True, "residual": True}),
]


@pytest.mark.parametrize("cell, layer, options", CASES, ids=[f"{c}-layer{l}-{'-'.join(o) or 'plain'}" for c, l, o in CASES])
def test_record_equals_one_pass_over_the_whole_text(cell, layer, options):
    config = ModelConfig(cell=cell, num_layers=2, hidden_size=8, embedding_size=5, **options)
    params = noisy_params(config, seed=1)
    ids = np.random.default_rng(2).integers(0, VOCAB, LENGTH)
    recorded = activations.record(params, config, ids, layer, chunk=CHUNK)

    start = model.initial_carry(params, config, 1)
    inputs = jnp.asarray(ids[:, None], jnp.int32)  # [N, 1]
    _, outputs, _ = model.run_layers(model.prepare(params, config), config, start, inputs)
    expected_h = np.asarray(outputs[layer][:, 0])  # [N, H]
    if config.residual and layer > 0:
        expected_h = expected_h - np.asarray(outputs[layer - 1][:, 0])  # the cell's own h, before the residual
    np.testing.assert_allclose(recorded["h"], expected_h, rtol=0, atol=1e-5)

    expected_fields = {"h", "c"} if cell == "lstm" else {"h"}
    assert set(recorded) == expected_fields | {"top_ids", "top_probs"}
    if cell == "lstm":
        # c after character k is the layer's carry after a forward pass over ids[:k+1];
        # positions on both sides of each chunk boundary, and the last.
        for position in (CHUNK - 1, CHUNK, 2 * CHUNK, LENGTH - 1):
            carry, _ = model.forward(params, config, start, inputs[: position + 1])
            np.testing.assert_allclose(recorded["c"][position], carry[layer].c[0], rtol=0, atol=1e-5)

    _, logits = model.forward(params, config, start, inputs)
    probs = np.asarray(jax.nn.softmax(logits[:, 0], axis=-1))  # [N, V]
    assert recorded["top_ids"].shape == (LENGTH, 5)
    np.testing.assert_array_equal(recorded["top_ids"], np.argsort(-probs, axis=-1)[:, :5])
    np.testing.assert_allclose(recorded["top_probs"], -np.sort(-probs, axis=-1)[:, :5], rtol=0, atol=1e-6)


def test_record_does_not_depend_on_the_chunk_size():
    config = ModelConfig(cell="gru", num_layers=1, hidden_size=8, embedding_size=5)
    params = noisy_params(config, seed=3)
    ids = np.random.default_rng(4).integers(0, VOCAB, 50)
    whole = activations.record(params, config, ids, 0, chunk=1000)
    for chunk in (7, 25):
        pieces = activations.record(params, config, ids, 0, chunk=chunk)
        np.testing.assert_allclose(pieces["h"], whole["h"], rtol=0, atol=1e-5)


def test_record_refuses_a_layer_the_model_lacks_and_an_empty_text():
    config = ModelConfig(cell="rnn", num_layers=2, hidden_size=8, embedding_size=5)
    with pytest.raises(ValueError, match="layer 2"):
        activations.record(noisy_params(config, 0), config, np.array([1, 2]), 2)
    with pytest.raises(ValueError, match="no characters"):
        activations.record(noisy_params(config, 0), config, np.array([], np.int32), 0)


def test_features_on_hand_made_text():
    np.testing.assert_array_equal(activations.inside_quotes('a"bc"d'), [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(activations.bracket_depth("(a[b])}({"), [1, 1, 2, 2, 1, 0, 0, 1, 2])
    np.testing.assert_array_equal(activations.bracket_depth("))("), [0, 0, 1])
    text = "ab\ncd\n\ne"
    np.testing.assert_array_equal(activations.position_in_line(text), [1, 2, 0, 1, 2, 0, 0, 1])
    np.testing.assert_array_equal(activations.line_start(text), [1, 0, 0, 1, 0, 0, 0, 1])
    assert set(activations.FEATURES) == {"quotes", "brackets", "line_position", "line_start"}
    assert all(len(feature("")) == 0 for feature in activations.FEATURES.values())


def quoted_text(length: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list('abc "'), size=length, p=[0.3, 0.3, 0.2, 0.1, 0.1]))


def test_top_units_finds_a_planted_unit():
    text = quoted_text(600, seed=5)
    feature = activations.inside_quotes(text)
    rng = np.random.default_rng(6)
    units = rng.normal(0.0, 1.0, (len(text), 12))  # [N, H]
    units[:, 7] = feature + rng.normal(0.0, 0.1, len(text))
    units[:, 3] = -feature + rng.normal(0.0, 0.5, len(text))
    found = activations.top_units(units, text, 2, "quotes")
    assert [unit for unit, _ in found] == [7, 3]
    assert found[0][1] > 0.9 and found[1][1] < -0.5
    np.testing.assert_allclose(found[0][1], np.corrcoef(units[:, 7], feature)[0, 1])

    units[:, 10] *= 5.0
    unit, variance = activations.top_units(units, text, 1)[0]
    assert unit == 10
    np.testing.assert_allclose(variance, np.var(units[:, 10]))


def test_constant_feature_and_constant_unit_give_zero_correlation_not_nan():
    text = "abc ab c" * 20  # no quotes: the feature is constant
    units = np.random.default_rng(7).normal(size=(len(text), 4))
    units[:, 2] = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert activations.top_units(units, text, 4, "quotes") == [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0)]
        correlations = activations.correlations(units, activations.bracket_depth("(" + text[1:]))
    assert np.all(np.isfinite(correlations)) and correlations[2] == 0.0


def test_top_units_refuses_mismatched_text_and_unknown_feature():
    units = np.zeros((5, 3))
    with pytest.raises(ValueError, match="characters"):
        activations.top_units(units, "abc", 1, "quotes")
    with pytest.raises(ValueError, match="unknown feature"):
        activations.top_units(units, "abcde", 1, "vowels")


VIZ_VOCAB, VIZ_TEXT = "\n abcdefg", "a bad cafe\nfed a bag"  # VOCAB characters, and a text of them


def write_checkpoint(directory, cell: str):
    """A checkpoint of a two-layer model of width 8 with noisy params, as `viz` reads one: (config, params, path)."""
    config = Config(model=ModelConfig(cell=cell, num_layers=2, hidden_size=8, embedding_size=5))
    params = noisy_params(config.model, seed=3)
    metadata = {"config": config_lib.to_dict(config), "vocab": VIZ_VOCAB, "corpus_sha": "0" * 16, "step": 1,
                "elapsed_s": 0.0, "val_loss": 2.0, "best_val_loss": 2.0, "chars_seen": 1, "saved_at": 0.0}
    path = checkpoint.step_path(directory, 1)
    checkpoint.write(path, checkpoint.flatten(params, "params"), metadata)
    return config, params, path


def test_viz_writes_the_dump_and_the_page_at_the_names_given(tmp_path, capsys):
    """--dump FILE is FILE whatever its suffix (NumPy alone would add .npz), holding what `record` gives."""
    from clihelp import run_in_process

    config, params, path = write_checkpoint(tmp_path, "lstm")
    text = VIZ_TEXT
    dump, page = tmp_path / "acts.bin", tmp_path / "page.html"

    result = run_in_process(capsys, "viz", "-c", path, "--text", text, "--layer", "2", "--units", "0,3",
                            "--dump", dump, "-o", page)

    assert result.code == 0, result.err
    assert sorted(file.name for file in tmp_path.iterdir()) == ["acts.bin", "page.html", path.name]
    saved = np.load(dump)
    ids = np.array([VIZ_VOCAB.index(char) for char in text])
    expected = activations.record(params, config.model, ids, 1)
    assert str(saved["text"]) == text and int(saved["layer"]) == 2
    np.testing.assert_array_equal(saved["ids"], ids)
    for name in ("h", "c", "top_ids", "top_probs"):
        np.testing.assert_allclose(saved[name], expected[name], rtol=0, atol=1e-6)
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")  # its content: tests/test_render.py


@pytest.mark.parametrize("cell, args, error", [
    ("lstm", ["--units", "8"], "--units must name units 0..7"),  # one past the last unit
    ("gru", ["--state", "c"], "--state c needs an LSTM"),
])
def test_viz_refuses_units_and_states_the_model_lacks(tmp_path, capsys, cell, args, error):
    from clihelp import run_in_process

    _, _, path = write_checkpoint(tmp_path, cell)
    result = run_in_process(capsys, "viz", "-c", path, "--text", VIZ_TEXT, *args)
    assert result.code == 2 and result.err.startswith(f"charrnn: error: {error}"), result.err


def test_viz_top_shows_that_many_units_on_stdout_and_ranks_them_on_stderr(tmp_path, capsys):
    from clihelp import run_in_process

    _, _, path = write_checkpoint(tmp_path, "lstm")
    result = run_in_process(capsys, "viz", "-c", path, "--text", VIZ_TEXT, "--top", "3", "--state", "c")
    assert result.code == 0, result.err
    assert result.err.count("unit ") == 3 and result.out.count("layer 2 c, unit ") == 3
