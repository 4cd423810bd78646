"""Encoder–decoder runs end to end: training learns, resumes exactly, and sample / eval / viz / runs work on them."""

import dataclasses
import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest
from clihelp import assert_identical_arrays, final_arrays, run_in_process, snapshot

import charrnn
from charrnn.checkpoint import Loaded
from charrnn.config import Config, SampleConfig, TrainConfig
from charrnn.data import Vocab
from charrnn.seq2seq import generate, pairs as pairs_lib
from charrnn.seq2seq.pairs import Pairs
from charrnn.seq2seq.task import mean_loss


CONFIG = """
[model]
kind = "seq2seq"
cell = "lstm"
hidden_size = 64
embedding_size = 16
num_layers = 1
encoder_layers = 1
dropout = 0.0
input_init = "hidden"  # the initialisation these steps and this rate were sized with

[train]
batch_size = 32
lr = 0.01
warmup_steps = 20
steps = 600
max_minutes = 0
eval_every = 300
log_every = 50
max_length = 12
pad_multiple = 8  # words of up to 6 characters: one batch shape to compile, not three

[sample]
temperature = 0
"""


def words(seed: int, count: int, shortest: int = 2, longest: int = 6) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdef") for _ in range(rng.randint(shortest, longest))) for _ in range(count)]


def reversal_pairs(seed: int, count: int, shortest: int = 2, longest: int = 6) -> str:
    return "".join(f"{word}\t{word[::-1]}\n" for word in words(seed, count, shortest, longest))


def trained(folder, make_pairs, config: str):
    """A model trained on 6000 pairs (a few seconds) in `folder`, with 300 held-out pairs beside it."""
    (folder / "train.tsv").write_text(make_pairs(0, 6000), encoding="utf-8")
    (folder / "held_out.tsv").write_text(make_pairs(1, 300), encoding="utf-8")
    (folder / "config.toml").write_text(config, encoding="utf-8")
    return folder, charrnn.train(folder / "train.tsv", folder / "run", folder / "config.toml")


@pytest.fixture(scope="module")
def reversal(tmp_path_factory):
    """A model trained to reverse words, and held-out words it never saw."""
    return trained(tmp_path_factory.mktemp("reversal"), reversal_pairs, CONFIG)


def test_learns_to_reverse_words(reversal):
    folder, summary = reversal
    assert summary.steps == 600 and summary.best_val_loss < 0.05
    model = charrnn.load(folder / "run")
    assert isinstance(model, charrnn.Seq2SeqModel)
    score = model.score(folder / "held_out.tsv")
    assert score.exact_match >= 0.99, score
    assert model.convert(["abc", "fedcba"]) == ["cba", "abcdef"]
    assert score.token_error_rate is None and score.pairs == 300


def test_sample_writes_one_line_per_source(reversal, capsys, monkeypatch):
    folder, _ = reversal
    monkeypatch.chdir(folder)
    result = run_in_process(capsys, "sample", "-c", "run", "--source", "abc", "--source", "ddef")
    assert result.code == 0, result.err
    assert result.out.splitlines() == ["cba", "fedd"]
    (folder / "sources.txt").write_text("ab\ncab\nfed\n", encoding="utf-8")
    result = run_in_process(capsys, "sample", "-c", "run", "--source-file", "sources.txt", "--beam", "3", "--json")
    assert [json.loads(line) for line in result.out.splitlines()] == [
        {"source": "ab", "output": "ba"}, {"source": "cab", "output": "bac"}, {"source": "fed", "output": "def"}]


def test_eval_reports_loss_and_error_rates(reversal, capsys, monkeypatch):
    folder, _ = reversal
    monkeypatch.chdir(folder)
    result = run_in_process(capsys, "eval", "held_out.tsv", "-c", "run", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["exact_match"] >= 0.99 and report["char_error_rate"] <= 0.01 and report["pairs"] == 300
    assert report["nats_per_char"] < 0.2 and report["token_error_rate"] is None
    plain = run_in_process(capsys, "eval", "held_out.tsv", "-c", "run", "--beam", "2")
    assert "exact match" in plain.out and "character error rate" in plain.out


def test_runs_given_together_write_from_the_mean_of_their_distributions(reversal, capsys, monkeypatch):
    """A run with itself is an ensemble whose mean is the run's own distribution: the same outputs and loss."""
    folder, _ = reversal
    monkeypatch.chdir(folder)
    reports = [json.loads(run_in_process(capsys, "eval", "held_out.tsv", *runs, "--json", "--beam", "2").out)
               for runs in (["-c", "run"], ["-c", "run", "-c", "run"])]
    assert reports[1]["checkpoints"] == 2 * reports[0]["checkpoints"] and len(reports[0]["checkpoints"]) == 1
    for key in ("nats_per_char", "exact_match", "char_error_rate", "pairs"):
        assert reports[1][key] == pytest.approx(reports[0][key], rel=1e-6), key
    result = run_in_process(capsys, "sample", "-c", "run", "-c", "run", "--source", "abc", "--source", "ddef")
    assert result.code == 0 and result.out.splitlines() == ["cba", "fedd"], result.err
    together = charrnn.load(folder / "run", folder / "run")
    assert together.paths == 2 * [together.path] and "and 1 more" in repr(together)


@pytest.fixture(scope="module")
def backwards(tmp_path_factory):
    """The reversal model with a decoder that writes each target last character first, on the same words."""
    return trained(tmp_path_factory.mktemp("backwards"), reversal_pairs,
                   CONFIG.replace("[model]\n", "[model]\nreverse_target = true\n"))


def test_a_decoder_writing_right_to_left_learns_and_gives_its_output_forwards(backwards):
    folder, summary = backwards
    model = charrnn.load(folder / "run")
    assert model.config.model.reverse_target and summary.best_val_loss < 0.05
    score = model.score(folder / "held_out.tsv", beam=2)
    assert score.exact_match >= 0.99 and score.nats_per_char < 0.2, score
    assert model.convert(["abc", "fedcba"]) == ["cba", "abcdef"]
    # Each output symbol's row holds the weights of the step that wrote it: the first symbol's, the last step
    # before the end symbol's; the end symbol's row stays last.
    seen = model.attention("abcdef")
    assert seen.symbols == list("fedcba") and seen.weights.shape == (7, 6)
    encoded = pairs_lib.encode_side(model.source_vocab, ["abcdef"], "source")
    source = pairs_lib.padded_sources(encoded)  # as `convert` pads it
    _, steps = generate.sample((model.params,), (model.config.model,), source, jax.random.key(0), np.float32(0.0),
                               None, model.config.train.max_length + 1)
    np.testing.assert_array_equal(seen.weights, np.asarray(steps)[[5, 4, 3, 2, 1, 0, 6], 0, :6])


def test_runs_writing_both_ways_choose_together_and_score_their_mean_over_whole_targets(reversal, backwards, capsys,
                                                                                      monkeypatch):
    runs = [reversal[0] / "run", backwards[0] / "run"]
    held_out = reversal[0] / "held_out.tsv"
    together = charrnn.load(*runs)
    assert together.score(held_out).exact_match >= 0.99
    pairs = [line.split("\t") for line in held_out.read_text(encoding="utf-8").splitlines()[:12]]
    alone = [charrnn.load(run) for run in runs]

    def log_prob(model, source: str, target: str) -> float:  # teacher-forced, one pair, in the model's own order
        ids = model.vocab.encode(target[::-1] if model.config.model.reverse_target else target).astype(np.int32) + 1
        source_ids = model.source_vocab.encode(source).astype(np.int32) + 1
        nats = mean_loss((model.params,), (model.config.model,), [source_ids], [ids])
        return -nats * (len(target) + 1)

    log_probs = [[log_prob(model, source, target) for model in alone] for source, target in pairs]
    expected = -np.sum(np.logaddexp.reduce(log_probs, axis=1) - np.log(2)) / sum(len(t) + 1 for _, t in pairs)
    got = together.score(Pairs(*map(list, zip(*pairs)))).nats_per_char
    assert got == pytest.approx(expected, rel=1e-4)
    monkeypatch.chdir(reversal[0])
    both = ["-c", str(runs[0]), "-c", str(runs[1])]
    result = run_in_process(capsys, "sample", *both, "--source", "abc", "--source", "ddef", "--beam", "2")
    assert result.code == 0 and result.out.splitlines() == ["cba", "fedd"], result.err
    result = run_in_process(capsys, "sample", *both, "--source", "abc", "--temp", "0.5")
    assert result.code == 2 and result.out == "" and len(result.err.strip().splitlines()) == 1
    assert "opposite directions" in result.err


def test_runs_on_other_vocabularies_or_language_models_do_not_write_together(reversal, spelling, cli, small_corpus):
    from clihelp import TINY

    runs = [str(reversal[0] / "run"), str(spelling[0] / "run")]
    result = cli("eval", str(reversal[0] / "held_out.tsv"), "-c", runs[0], "-c", runs[1])
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "different vocabularies" in result.err and result.out == ""
    assert cli("train", small_corpus, "--config", TINY, "--out", "lm", "--steps", "4", "--quiet").code == 0
    result = cli("sample", "-c", runs[0], "-c", "lm", "--source", "abc")
    assert result.code == 2 and "do not predict together" in result.err, result.err
    with pytest.raises(charrnn.UsageError, match="attention is drawn for one model"):
        charrnn.load(runs[0], runs[0]).attention("abc")


def test_viz_draws_the_attention_as_a_heat_map(reversal, capsys, monkeypatch):
    folder, _ = reversal
    monkeypatch.chdir(folder)
    result = run_in_process(capsys, "viz", "-c", "run", "--source", "abcd", "--output", "attention.html")
    assert result.code == 0, result.err
    page = (folder / "attention.html").read_text(encoding="utf-8")
    assert page.count("<tr>") == 1 + 5  # the header, "dcba" and the end symbol
    attention = charrnn.load(folder / "run").attention("abcd")
    assert attention.output == "dcba"
    np.testing.assert_allclose(attention.weights.sum(axis=1), 1.0, rtol=1e-5)
    # Reversing: writing the first character, the decoder looks mostly at the last one.
    assert int(np.argmax(attention.weights[0])) == 3


NAMES = dict(zip("abcdef", ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]))


def spelling_pairs(seed: int, count: int) -> str:
    """Each word's letters, last first, as space-separated tokens: "abc" -> "charlie bravo alpha"."""
    return "".join(f"{word}\t{' '.join(NAMES[letter] for letter in reversed(word))}\n" for word in words(seed, count))


@pytest.fixture(scope="module")
def spelling(tmp_path_factory):
    """A model with model.target = tokens, trained to spell words backwards, one token per step."""
    config = CONFIG.replace("max_length = 12", "max_length = 50").replace("[train]", "target = \"tokens\"\n\n[train]")
    return trained(tmp_path_factory.mktemp("spelling"), spelling_pairs, config)


def test_token_targets_are_written_one_token_per_step(spelling, capsys, monkeypatch):
    folder, summary = spelling
    model = charrnn.load(folder / "run")
    assert model.vocab.tokens == sorted(NAMES.values())  # 6 symbols, not the 20 characters of their spelling
    assert model.params["decoder"]["output"]["b"].shape == (7,)
    assert model.convert(["abc", "fed"]) == ["charlie bravo alpha", "delta echo foxtrot"]
    score = model.score(folder / "held_out.tsv", beam=2)
    assert score.exact_match >= 0.99 and score.token_error_rate <= 0.01, score
    attention = model.attention("cafe")
    assert attention.symbols == ["echo", "foxtrot", "alpha", "charlie"] and attention.weights.shape == (5, 4)
    monkeypatch.chdir(folder)
    result = run_in_process(capsys, "viz", "-c", "run", "--source", "cafe", "--output", "attention.html")
    assert result.code == 0, result.err
    page = (folder / "attention.html").read_text(encoding="utf-8")
    assert page.count("<tr>") == 1 + 5 and "<th>foxtrot</th>" in page
    result = run_in_process(capsys, "inspect", "run")
    assert result.code == 0 and "6 tokens" in result.out, result.out
    (folder / "unknown.tsv").write_text("ab\tbravo alpha\nabc\tcharlie zulu alpha\n", encoding="utf-8")
    result = run_in_process(capsys, "eval", "unknown.tsv", "-c", "run")
    assert result.code == 3 and "tokens the model never saw: 'zulu'" in result.err, result.err
    result = run_in_process(capsys, "train", "--resume", "run", "--steps", "608", "--quiet")
    assert result.code == 0, result.err
    assert charrnn.load(folder / "run").vocab.tokens == model.vocab.tokens


def test_runs_lists_the_run(reversal, capsys, monkeypatch):
    folder, _ = reversal
    monkeypatch.chdir(folder)
    result = run_in_process(capsys, "runs", "run", "--json")
    assert result.code == 0, result.err
    [row] = json.loads(result.out)
    assert row["status"] == "finished" and row["steps"] == 600 and row["model.kind"] == "seq2seq"
    assert row["best_val_loss"] == reversal[1].best_val_loss


def test_resume_continues_exactly(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Words whose pairs all pad to one shape, one compilation: resuming is under test here, not bucketing.
    (tmp_path / "pairs.tsv").write_text(reversal_pairs(2, 600, shortest=5, longest=7), encoding="utf-8")
    (tmp_path / "reverse.toml").write_text(CONFIG, encoding="utf-8")
    common = ["train", "pairs.tsv", "--config", "reverse.toml", "--set", "train.eval_every=6",
              "--set", "train.steps_per_call=2", "--set", "model.dropout=0.3", "--quiet",
              "--set", "train.schedule=constant"]  # the same learning rates whichever steps the first session ends at
    assert run_in_process(capsys, *common, "--out", "whole", "--steps", "30").code == 0
    assert run_in_process(capsys, *common, "--out", "split", "--steps", "14").code == 0
    result = run_in_process(capsys, "train", "--resume", "split", "--steps", "30", "--quiet")
    assert result.code == 0, result.err
    assert_identical_arrays(final_arrays(tmp_path / "whole"), final_arrays(tmp_path / "split"))


def untrained(sample: SampleConfig = SampleConfig(temperature=0.0), **model) -> charrnn.Seq2SeqModel:
    """A model with random weights over sources "abcdef" and targets "abcd", as `charrnn.load` gives a run's: for
    the settings of `convert` and `score`, which need no trained model."""
    from test_seq2seq_model import SMALL, params_for

    config = dataclasses.replace(SMALL, **{"attention": "additive", **model})
    params = jax.tree.map(np.float32, params_for(config))
    loaded = Loaded(Config(config, TrainConfig(max_length=8), sample), Vocab("abcd"), params, {}, Path("untrained"),
                    0, Vocab("abcdef"))
    return charrnn.Seq2SeqModel(loaded)


SOURCES = ["abc", "fed", "a", "bbbbb", "cafe", "dead", "ace"]


def test_convert_draws_by_its_seed_and_top_k_and_top_p_narrow_the_draw():
    """The same seed draws the same targets, other seeds others; top-k 1, or a top-p under any symbol's
    probability, leaves only the most likely symbol: the greedy targets at any temperature."""
    model = untrained()
    greedy = model.convert(SOURCES)
    drawn = [model.convert(SOURCES, temperature=1.0, seed=seed) for seed in range(3)]
    assert drawn[0] == model.convert(SOURCES, temperature=1.0, seed=0)
    assert len({tuple(one) for one in drawn}) == 3 and greedy not in drawn
    assert model.convert(SOURCES, temperature=1.0, top_k=1, seed=1) == greedy
    assert model.convert(SOURCES, temperature=1.0, top_p=1e-3, seed=1) == greedy


def test_convert_cuts_targets_at_length_and_searches_with_beam():
    """Targets stop at `length` symbols (the run's train.max_length, 8, by default); `beam` > 1 writes each source's
    best hypothesis of a beam search over all the sources together."""
    model = untrained()
    greedy = model.convert(SOURCES)
    assert max(map(len, greedy)) == 8  # random weights: some targets run on to the cap
    assert model.convert(SOURCES, length=3) == [output[:3] for output in greedy]
    source = pairs_lib.padded_sources(pairs_lib.encode_side(model.source_vocab, SOURCES, "sources"))
    tokens, _ = generate.beam_search((model.params,), (model.config.model,), source, 8 + 1, 3)
    searched = [model.vocab.decode(pairs_lib.written(ids[:8])) for ids in np.asarray(tokens)[:, 0]]
    assert model.convert(SOURCES, beam=3) == searched != greedy


def test_score_writes_greedily_and_a_source_is_right_with_any_of_its_targets():
    """Whatever the run's sample temperature, and wherever a source's matching target is listed among its others."""
    model = untrained(SampleConfig(temperature=1.0))
    sources, greedy = zip(*[(source, output) for source, output in zip(SOURCES, model.convert(SOURCES, temperature=0.0))
                            if output])  # a target is never empty
    others = ["dd" if output != "dd" else "cc" for output in greedy]
    score = model.score(Pairs(list(sources) * 2, [*greedy, *others]))
    assert score.exact_match == 1.0 and score.char_error_rate == 0.0
    assert score.pairs == 2 * len(sources) and score.sources == len(sources)


def test_convert_refuses_an_empty_source_a_beam_under_one_and_attention_without_any():
    model = untrained()
    with pytest.raises(charrnn.UsageError, match="source 2 is empty"):
        model.convert(["abc", ""])
    with pytest.raises(charrnn.UsageError, match="beam must be at least 1"):
        model.convert(["abc"], beam=0)
    with pytest.raises(charrnn.UsageError, match="no attention"):
        untrained(attention="none").attention("abc")


BAD_PAIRS = [
    ("no tab", "abc\tcba\nabc cba\n", "pairs.tsv:2: no tab"),
    ("empty target", "abc\tcba\nabc\t\n", "pairs.tsv:2: empty target"),
    ("too long", "abc\tcba\n" + "a" * 13 + "\tx\n", "pairs.tsv:2: the source has 13 characters"),
]


@pytest.mark.parametrize("text, words", [case[1:] for case in BAD_PAIRS], ids=[case[0] for case in BAD_PAIRS])
def test_a_bad_pairs_file_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, text, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.tsv").write_text(text, encoding="utf-8")
    (tmp_path / "reverse.toml").write_text(CONFIG, encoding="utf-8")
    before = snapshot(tmp_path)
    result = run_in_process(capsys, "train", "pairs.tsv", "--config", "reverse.toml")
    lines = result.err.strip().splitlines()
    assert result.code == 3 and len(lines) == 1 and words in lines[0], result.err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, words", [
    (["sample", "-c", "run", "--source", "abz"], "'z'"),
    (["sample", "-c", "run", "--source", "abc", "--prime", "x"], "not --prime"),
    (["sample", "-c", "run"], "--source TEXT or --source-file"),
    (["viz", "-c", "run", "--source", "abc"], "--output"),
])
def test_bad_conversion_requests_are_usage_errors(reversal, capsys, monkeypatch, argv, words):
    folder, _ = reversal
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    result = run_in_process(capsys, *argv)
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and words in lines[0], result.err
    assert result.out == "" and snapshot(folder) == before


def test_a_language_model_refuses_sources(cli, small_corpus):
    from clihelp import TINY

    assert cli("train", small_corpus, "--config", TINY, "--out", "lm", "--steps", "4", "--quiet").code == 0
    result = cli("sample", "-c", "lm", "--source", "abc")
    assert result.code == 2 and "language model" in result.err
