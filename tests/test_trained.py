"""The Model API (`charrnn.load`, then sample, stream, score, activations) gives what the command line gives."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from clihelp import TINY, subprocess_env
from conftest import SAMPLE_TEXT

import charrnn
from charrnn import activations as activations_lib, rundir

TEXT = "First Citizen:\nSpeak, speak.\n\nAll:\nResolved. resolved.\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/first (20 steps) and runs/second (10 steps, another seed), second the newer: a folder of two runs."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 40, encoding="utf-8")
    charrnn.train(corpus, root / "runs" / "first", TINY, steps=20, eval_every=10, log_every=10)
    charrnn.train(corpus, root / "runs" / "second", TINY, steps=10, seed=1, eval_every=10, log_every=10)
    # "Newest" is by status.json's modification time: make the order certain whatever the clock's resolution.
    os.utime(root / "runs" / "first" / rundir.STATUS_FILE, (1_000_000_000, 1_000_000_000))
    return root / "runs"


@pytest.fixture(scope="module")
def run(runs):
    return runs / "first"


@pytest.fixture(scope="module")
def model(run):
    return charrnn.load(run)


OPTIONS = {"prime": "--prime", "length": "--length", "temperature": "--temp", "top_k": "--top-k",
           "top_p": "--top-p", "stop": "--stop", "seed": "--seed"}


def sample_options(settings: dict) -> list[str]:
    return [word for key, value in settings.items() for word in (OPTIONS[key], str(value))]


# Over BLOCK (128) characters, so that generation takes several compiled blocks and streams in pieces.
SETTINGS = [
    {"seed": 1, "length": 300},  # the run's own sample settings, no prime
    {"prime": "First Citizen:", "seed": 2, "length": 150, "temperature": 1.3, "top_k": 5},
    {"prime": "All:", "seed": 3, "length": 400, "top_p": 0.9, "stop": "e "},  # two characters, first met past one block
    {"prime": "A", "seed": 4, "length": 60, "temperature": 0},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "top_k", "top_p_stop", "greedy"])
def test_api_and_cli_give_the_same_text_for_a_seed(cli, run, model, settings):
    text = model.sample(**settings)
    assert text.startswith(settings.get("prime", ""))
    if "stop" in settings:
        assert text.endswith(settings["stop"]) and text.count(settings["stop"]) == 1
    else:
        assert len(text) == len(settings.get("prime", "")) + settings["length"]

    result = cli("sample", "-c", run, *sample_options(settings))
    assert result.code == 0, result.err
    assert result.out == text + "\n"

    pieces = list(model.stream(**settings))
    assert "".join(pieces) == text and all(pieces)  # no empty piece: not the missing prime, nor a stopped block
    if "stop" not in settings and settings["length"] > 128:
        assert len(pieces) > 2  # the prime or first block, then more blocks as they are generated

    texts = model.sample(**settings, num_samples=3)
    assert isinstance(texts, list) and len(texts) == 3
    batch = cli("sample", "-c", run, *sample_options(settings), "--num-samples", "3", "--json")
    assert batch.code == 0, batch.err
    lines = [json.loads(line) for line in batch.out.splitlines()]
    assert [line["text"] for line in lines] == texts
    assert [(line["index"], line["seed"], line["prime"]) for line in lines] == \
        [(index, settings["seed"], settings.get("prime", "")) for index in range(3)]
    plain = cli("sample", "-c", run, *sample_options(settings), "--num-samples", "3")
    assert plain.out == "\n\n".join(texts) + "\n"  # without --json: the samples, a blank line between them
    one = cli("sample", "-c", run, *sample_options(settings), "--json")
    assert [json.loads(line)["text"] for line in one.out.splitlines()] == [text]  # --json with one sample too


def test_a_different_seed_gives_different_text(model):
    assert model.sample("All:", length=100, seed=1) != model.sample("All:", length=100, seed=2)
    assert model.sample("All:", length=100, seed=1) == model.sample("All:", length=100, seed=1)


def test_a_sample_without_a_seed_names_the_seed_it_drew_on_stderr_alone(cli, run):
    drawn = cli("sample", "-c", run, "--prime", "All:", "--length", "30")
    assert drawn.code == 0, drawn.err
    assert len(drawn.out) == len("All:") + 30 + 1  # stdout holds the text alone
    seed = int(drawn.err.split("seed ")[1].split()[0])
    again = cli("sample", "-c", run, "--prime", "All:", "--length", "30", "--seed", str(seed))
    assert again.out == drawn.out and "seed" not in again.err  # the seed named repeats the text; given, not shown


@pytest.mark.parametrize("streams", [None, 3])
def test_score_gives_eval_figures(cli, run, model, tmp_path, streams):
    file = tmp_path / "held_out.txt"
    file.write_text(TEXT * 3, encoding="utf-8")
    options = [] if streams is None else ["--streams", str(streams)]
    result = cli("eval", file, "-c", run, "--json", *options)
    assert result.code == 0, result.err
    figures = json.loads(result.out)

    score = model.score(TEXT * 3) if streams is None else model.score(TEXT * 3, streams=streams)
    assert isinstance(score, charrnn.Score)
    assert (figures["nats_per_char"], figures["bits_per_char"], figures["perplexity"], figures["chars"]) == \
        (score.nats_per_char, score.bits_per_char, score.perplexity, score.chars)
    assert score.chars == len(TEXT * 3) - 1
    assert score.bits_per_char == pytest.approx(score.nats_per_char / math.log(2))
    assert score.perplexity == pytest.approx(math.exp(score.nats_per_char))
    assert figures["checkpoint"] == str(model.path)
    assert list(figures) == ["file", "checkpoint", "checkpoints", "chars", "nats_per_char", "bits_per_char",
                             "perplexity"]  # README's stable keys
    plain = cli("eval", file, "-c", run, *options)
    assert plain.out == (f"{file}: {score.nats_per_char:.4f} nats/char, {score.bits_per_char:.4f} bits/char, "
                         f"perplexity {score.perplexity:.3f} over {score.chars} characters\n")


def test_inspect_json_is_what_the_checkpoint_describes(cli, run, model):
    result = cli("inspect", run, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out) == model.describe()
    table = cli("inspect", run)
    assert table.code == 0 and f"{model.describe()['parameter_count']:,}" in table.out


def next_log_probs(one: charrnn.Model, text: str) -> np.ndarray:
    """[N, V] log-probabilities of the character after each of `text`'s N: one stream, one call, in NumPy."""
    from charrnn import model as model_lib

    ids = one.vocab.encode(text)
    carry = model_lib.initial_carry(one.params, one.config.model, 1)
    _, logits = model_lib.forward(one.params, one.config.model, carry, ids[:, None])
    logits = np.asarray(logits, np.float64)[:, 0]
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def log_probs_in_one_pass(one: charrnn.Model, text: str) -> np.ndarray:
    """Log-probability of each character of `text` after the first."""
    ids = one.vocab.encode(text)
    return next_log_probs(one, text)[np.arange(len(ids) - 1), ids[1:]]


def test_language_models_score_together_under_their_mean_distribution(cli, runs, tmp_path):
    text = TEXT * 8  # over one evaluation chunk (256): each model's state is carried from chunk to chunk
    first, second = charrnn.load(runs / "first"), charrnn.load(runs / "second")
    together = charrnn.load(runs / "first", runs / "second")
    assert together.paths == [first.path, second.path] and "and 1 more" in repr(together)
    probs = np.exp([log_probs_in_one_pass(first, text), log_probs_in_one_pass(second, text)])
    expected = -np.mean(np.log(probs.mean(axis=0)))
    score = together.score(text, streams=1)
    assert score.nats_per_char == pytest.approx(expected, rel=1e-5)
    assert score.chars == len(text) - 1
    # Below the mean of the members' losses (-log is convex): the mean distribution is scored, not the mean loss.
    members = [one.score(text, streams=1).nats_per_char for one in (first, second)]
    assert score.nats_per_char < np.mean(members) - 1e-3
    # A model with itself is the model.
    assert charrnn.load(runs / "first", runs / "first").score(text).nats_per_char == pytest.approx(
        first.score(text).nats_per_char, rel=1e-6)
    # Members of other cells and sizes: each runs with its own config.
    charrnn.train(runs.parent / "corpus.txt", tmp_path / "small", TINY, steps=10, seed=2, eval_every=10, log_every=10,
                  sets=["model.cell=gru", "model.hidden_size=24", "model.num_layers=1"])
    small = charrnn.load(tmp_path / "small")
    probs = np.exp([log_probs_in_one_pass(small, text), log_probs_in_one_pass(first, text)])
    assert charrnn.load(tmp_path / "small", runs / "first").score(text, streams=1).nats_per_char == pytest.approx(
        -np.mean(np.log(probs.mean(axis=0))), rel=1e-5)

    file = tmp_path / "held_out.txt"
    file.write_text(text, encoding="utf-8")
    result = cli("eval", file, "-c", runs / "first", "-c", runs / "second", "--streams", "1", "--json")
    assert result.code == 0, result.err
    figures = json.loads(result.out)
    assert figures["nats_per_char"] == score.nats_per_char
    assert figures["checkpoints"] == [str(first.path), str(second.path)]


def gumbel_draws(log_probs: np.ndarray, temperature: float, seed: int, start: int, stream: int,
                 streams: int) -> list[int]:
    """What `charrnn.sample.choose` draws from `log_probs` [N, V] for characters start, start + 1, ... of a stream:
    argmax(log_probs / T + noise), the noise of character t drawn from fold_in(key(seed), t) for all streams."""
    import jax

    draws = []
    for position, row in enumerate(log_probs[start:]):
        noise = jax.random.gumbel(jax.random.fold_in(jax.random.key(seed), position), (streams, row.shape[0]))
        draws.append(int(np.argmax(row / temperature + np.asarray(noise)[stream])))
    return draws


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_language_models_sample_together_from_their_mean_distribution(cli, runs, temperature):
    """Each character is drawn from the mean of the models' distributions after the text before it, each model
    reading the whole text in one pass (its own state carried, over two compiled blocks)."""
    first, second = charrnn.load(runs / "first"), charrnn.load(runs / "second")
    together = charrnn.load(runs / "first", runs / "second")
    prime, seed, length = "All:", 7, 150
    settings = {"length": length, "temperature": temperature, "top_k": 0, "top_p": 1.0, "seed": seed}
    texts = together.sample(prime, num_samples=2, **settings)
    geometric_differs = []
    for stream, text in enumerate(texts):
        assert text.startswith(prime) and len(text) == len(prime) + length
        log_probs = [next_log_probs(one, text)[:-1] for one in (first, second)]
        mean = np.log(np.mean(np.exp(log_probs), axis=0))
        written = [together.vocab.index[char] for char in text[len(prime):]]
        assert written == gumbel_draws(mean, temperature, seed, len(prime) - 1, stream, 2), stream
        geometric = np.mean(log_probs, axis=0)  # the normalised geometric mean: the mean of the logits
        geometric_differs.append(written != gumbel_draws(geometric, temperature, seed, len(prime) - 1, stream, 2))
    assert any(geometric_differs)  # the reference tells the two mixtures apart

    one_stream = together.sample(prime, **settings)
    assert one_stream not in {one.sample(prime, **settings) for one in (first, second)}  # neither alone writes it
    result = cli("sample", "-c", runs / "first", "-c", runs / "second", "--prime", prime, "--length", str(length),
                 "--temp", str(temperature), "--top-k", "0", "--top-p", "1", "--seed", str(seed))
    assert result.code == 0, result.err
    assert result.out == one_stream + "\n"


def test_language_models_together_record_no_activations_and_share_a_vocabulary(runs, tmp_path):
    together = charrnn.load(runs / "first", runs / "second")
    with pytest.raises(charrnn.UsageError, match="activations take one language model, not several runs"):
        together.activations(TEXT)

    corpus = tmp_path / "other.txt"
    corpus.write_text("abc abd\n" * 200, encoding="utf-8")
    charrnn.train(corpus, tmp_path / "other", TINY, steps=2, eval_every=2, log_every=2)
    with pytest.raises(charrnn.UsageError, match="different vocabularies"):
        charrnn.load(runs / "first", tmp_path / "other")


def test_activations_are_the_cores_and_vizs_dump(cli, run, model, tmp_path):
    acts = model.activations(TEXT, layer=1)
    assert isinstance(acts, charrnn.Activations)
    assert acts.text == TEXT and acts.layer == 1
    np.testing.assert_array_equal(acts.ids, model.vocab.encode(TEXT))
    hidden = model.config.model.hidden_size
    assert acts.states.keys() == {"h", "c"} and acts.states["h"].shape == (len(TEXT), hidden)

    core = activations_lib.record(model.params, model.config.model, model.vocab.encode(TEXT), 0)  # 0-based layer
    assert core.keys() == {"h", "c", "top_ids", "top_probs"}
    for name in ("h", "c"):
        np.testing.assert_array_equal(acts.states[name], core[name])
    np.testing.assert_array_equal(acts.top_ids, core["top_ids"])
    np.testing.assert_array_equal(acts.top_probs, core["top_probs"])

    top = model.activations(TEXT)  # default: the top layer
    assert top.layer == model.config.model.num_layers == 2
    assert not np.array_equal(top.states["h"], acts.states["h"])

    dump = tmp_path / "acts.npz"
    result = cli("viz", "-c", run, "--text", TEXT, "--layer", "1", "--dump", dump)
    assert result.code == 0, result.err
    with np.load(dump) as saved:
        assert str(saved["text"]) == acts.text and int(saved["layer"]) == 1
        np.testing.assert_array_equal(saved["ids"], acts.ids)
        for name in ("h", "c"):
            np.testing.assert_array_equal(saved[name], acts.states[name])
        np.testing.assert_array_equal(saved["top_ids"], acts.top_ids)
        np.testing.assert_array_equal(saved["top_probs"], acts.top_probs)


def test_unknown_characters_are_usage_errors_unless_skipped(cli, run, model):
    with pytest.raises(charrnn.UsageError, match="vocabulary"):
        model.sample("All:\u20ac", length=10, seed=1)
    kept = model.sample("All:\u20ac", length=10, seed=1, skip_unknown=True)
    assert kept == model.sample("All:", length=10, seed=1)
    with pytest.raises(charrnn.UsageError):
        model.score("All\u20ac")
    assert model.score("All:\u20ac\n", skip_unknown=True) == model.score("All:\n")
    assert model.activations("A\u20acll", skip_unknown=True).text == "All"
    # Nothing left once the unknown characters are dropped: an error, not a sample without a prime.
    with pytest.raises(charrnn.UsageError, match="no character of the model's vocabulary left"):
        model.sample("\u20ac\u20ac", length=10, seed=1, skip_unknown=True)
    with pytest.raises(charrnn.UsageError, match="no character of the model's vocabulary left"):
        model.activations("\u20ac", skip_unknown=True)

    refused = cli("sample", "-c", run, "--prime", "All:\u20ac", "--length", "10", "--seed", "1")
    assert refused.code == charrnn.UsageError.exit_code == 2
    assert refused.out == "" and refused.err.startswith("charrnn: error:")
    skipped = cli("sample", "-c", run, "--prime", "All:\u20ac", "--length", "10", "--seed", "1", "--skip-unknown")
    assert skipped.code == 0 and skipped.out == kept + "\n"


@pytest.mark.parametrize("settings", [{"temperature": -1.0}, {"temperature": float("nan")}, {"top_p": 0.0},
                                      {"top_k": -1}, {"length": -5}, {"seed": -1}, {"num_samples": 0}])
def test_bad_settings_are_usage_errors(model, settings):
    with pytest.raises(charrnn.UsageError):
        model.sample("All:", **{"length": 10, "seed": 1, **settings})
    if "num_samples" not in settings:
        with pytest.raises(charrnn.UsageError):
            model.stream("All:", **{"length": 10, "seed": 1, **settings})  # at the call, before any piece


@pytest.mark.parametrize("call, argument, message", [
    ("score", {"streams": 0}, "streams must be at least 1"),
    ("activations", {"layer": 0}, "--layer 0: the model has 2 layer"),  # layers count from 1
    ("activations", {"layer": 3}, "--layer 3: the model has 2 layer"),
])
def test_bad_score_and_activations_arguments_are_usage_errors(model, call, argument, message):
    with pytest.raises(charrnn.UsageError, match=message):
        getattr(model, call)(TEXT, **argument)


def test_a_sample_asked_for_without_a_seed_draws_a_31_bit_one(monkeypatch):
    from charrnn import trained

    monkeypatch.setattr(os, "urandom", lambda count: b"\xff" * count)
    assert trained.random_seed() == 2**31 - 1


def test_loading_what_is_not_a_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(charrnn.CheckpointError):
        charrnn.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(charrnn.CheckpointError):
        charrnn.load(tmp_path / "empty")
    assert issubclass(charrnn.CheckpointError, charrnn.CharrnnError) and charrnn.CheckpointError.exit_code == 4


def test_a_folder_of_runs_loads_its_newest_run(cli, runs):
    newest = charrnn.load(runs)
    assert newest.path.parent.parent == runs / "second"
    assert charrnn.load(runs / "second").path == newest.path
    assert charrnn.load(newest.path).path == newest.path  # a checkpoint file
    older = charrnn.load(runs / "first")
    settings = {"prime": "All:", "length": 80, "seed": 9}
    assert older.sample(**settings) != newest.sample(**settings)  # the two runs can be told apart

    result = cli("sample", "-c", runs, *sample_options(settings))
    assert result.code == 0, result.err
    assert result.out == newest.sample(**settings) + "\n"


def test_the_library_imports_and_samples_without_typer_or_rich(run, model, tmp_path):
    script = (
        "import sys\n"
        "sys.modules['typer'] = None\n"  # `import typer` now raises ImportError
        "sys.modules['rich'] = None\n"
        "import charrnn\n"
        "model = charrnn.load(sys.argv[1])\n"
        "text = model.sample('All:', length=150, temperature=0.9, top_k=8, seed=5)\n"
        "assert not any(name.startswith('charrnn.cli') for name in sys.modules)\n"
        "sys.stdout.write(text)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(run)], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    # Another process, the same seed: the same text.
    assert done.stdout == model.sample("All:", length=150, temperature=0.9, top_k=8, seed=5)
