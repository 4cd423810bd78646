"""Several models in one run (`train.members`): each trains as its seed alone would; they predict together."""

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clihelp import TINY, final_arrays
from conftest import SAMPLE_TEXT

import charrnn
from charrnn import bench, config as config_lib, members, steps
from charrnn.errors import UsageError
from charrnn.training import load_corpus

# Dropout of every kind and random epoch offsets: each member's masks and data positions follow its own seed.
# A constant schedule makes a run stopped at step 6 and resumed to 12 a 12-step run.
SETTINGS = dict(max_minutes=0, batch_size=8, seq_len=16, eval_every=6, steps_per_call=2, dropout=0.1,
                sets=["model.weight_drop=0.2", "train.ema=0.9", "train.random_offset=true", "train.log_every=3",
                      "train.schedule=constant"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run of two members from seed 5, the same stopped at step 6 and resumed, and the runs of seeds 5 and 6
    alone."""
    root = tmp_path_factory.mktemp("members")
    small = root / "corpus.txt"
    small.write_text(SAMPLE_TEXT * 40, encoding="utf-8")  # the `small_corpus` text, for the whole module
    charrnn.train(small, root / "pair", TINY, seed=5, members=2, steps=12, **SETTINGS)
    charrnn.train(small, root / "stopped", TINY, seed=5, members=2, steps=6, **SETTINGS)
    charrnn.train(resume=root / "stopped", steps=12)
    for seed in (5, 6):
        charrnn.train(small, root / f"seed-{seed}", TINY, seed=seed, steps=12, **SETTINGS)
    return root


def test_each_member_trains_as_its_seed_would_alone(runs):
    pair = final_arrays(runs / "pair")
    alone = [final_arrays(runs / f"seed-{seed}") for seed in (5, 6)]
    assert pair.keys() == alone[0].keys()
    for name, stacked in pair.items():  # weights, their average, Adam's moments and step count, carried state
        assert stacked.shape == (2, *alone[0][name].shape), name
        for index in range(2):
            np.testing.assert_array_equal(stacked[index], alone[index][name], err_msg=name)
    assert not np.allclose(pair["params/output/w"][0], pair["params/output/w"][1])  # two models, not one twice


def test_a_run_of_members_resumes_exactly(runs):
    stopped, pair = final_arrays(runs / "stopped"), final_arrays(runs / "pair")
    assert stopped.keys() == pair.keys()
    for name in pair:
        np.testing.assert_array_equal(stopped[name], pair[name], err_msg=name)


def test_members_are_scored_and_sample_as_the_ensemble_of_their_runs(runs):
    text = (runs / "corpus.txt").read_text(encoding="utf-8")[-2000:]
    pair, together = charrnn.load(runs / "pair"), charrnn.load(runs / "seed-5", runs / "seed-6")
    assert len(pair.paths) == 1  # one run's file, its two models
    score = pair.score(text, streams=4).nats_per_char
    assert score == pytest.approx(together.score(text, streams=4).nats_per_char, rel=1e-5)
    single = [charrnn.load(runs / f"seed-{seed}").score(text, streams=4).nats_per_char for seed in (5, 6)]
    assert all(abs(score - one) > 1e-4 for one in single)  # the mean of two distributions, not either one
    assert pair.sample("All:", length=80, seed=3) == together.sample("All:", length=80, seed=3)


def test_the_run_validates_its_members_together(runs):
    model = charrnn.load(runs / "pair")
    train = model.config.train
    val_text = model.vocab.decode(load_corpus(runs / "corpus.txt", train.val_fraction).val_ids)
    saved = model.describe()["val_loss"]
    assert saved == pytest.approx(model.score(val_text, streams=train.eval_batch_size).nats_per_char, rel=1e-5)


def test_combine_and_split_are_inverse_and_leave_one_member_as_it_is():
    trees = [{"w": np.full((2, 3), float(index)), "b": np.arange(3) + index} for index in range(3)]
    stacked = members.combine(trees)
    assert stacked["w"].shape == (3, 2, 3)
    for original, back in zip(trees, members.split(stacked, 3), strict=True):
        np.testing.assert_array_equal(original["w"], back["w"])
        np.testing.assert_array_equal(original["b"], back["b"])
    assert members.combine(trees[:1]) is trees[0] and members.split(trees[0], 1) == (trees[0],)


def test_combine_keeps_host_arrays_on_the_host_and_stacks_device_and_traced_ones_where_they_are():
    host = members.combine([np.zeros(2, np.int32), np.ones(2, np.int32)])  # minibatches
    assert isinstance(host, np.ndarray) and host.shape == (2, 2)
    device = members.combine([jnp.zeros(2), jnp.ones(2)])
    assert isinstance(device, jax.Array) and device.shape == (2, 2)
    traced = jax.jit(lambda first, second: members.combine([{"w": first}, {"w": second}]))(jnp.zeros(2), jnp.ones(2))
    np.testing.assert_array_equal(traced["w"], [[0.0, 0.0], [1.0, 1.0]])


def test_the_timing_probe_trains_members_as_a_run_does():
    config = config_lib.resolve(TINY, ["train.members=3"], {})
    probe = bench.TrainingBench(config)
    metrics = probe.run_call()
    assert np.shape(metrics.loss) == (config.train.steps_per_call,)  # the members' mean, step by step
    assert probe.state.params["output"]["w"].shape[0] == 3


@pytest.mark.parametrize("sets, words", [
    (["train.members=0"], "train.members must be at least 1"),
    (["model.kind=seq2seq", "train.members=2"], "train.members > 1 is for language models"),
    (["train.seed=4294967295", "train.members=2"], "train.seed + train.members - 1 must be in"),
])
def test_member_settings_that_cannot_work_are_usage_errors(sets, words):
    with pytest.raises(UsageError, match=re.escape(words)):
        config_lib.resolve(TINY, sets, {})


def test_members_train_on_one_device():
    config = config_lib.resolve(TINY, ["train.members=2"], {})
    with pytest.raises(UsageError, match="train.members > 1 trains its models on one device"):
        steps.placement(config, 2)


@pytest.mark.parametrize("run, count", [("pair", 1), ("seed-5", 2)])
def test_a_resume_cannot_change_the_number_of_members(runs, tmp_path, run, count):
    """The checkpoint holds each member's arrays: a resume with another count is refused, naming the key."""
    copy = tmp_path / run
    shutil.copytree(runs / run, copy)
    with pytest.raises(UsageError, match=re.escape("train.members")):
        charrnn.train(runs / "corpus.txt", resume=copy, members=count, steps=18)
    assert (copy / "metrics.jsonl").read_text() == (runs / run / "metrics.jsonl").read_text()  # nothing written
