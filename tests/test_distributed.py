"""Data parallelism: streams split over devices and processes give the parameters of one device."""

import dataclasses
import json
import re
import socket
import subprocess
import sys
import time

from typing import NamedTuple

import jax
import numpy as np
import pytest
from clihelp import TINY, assert_identical_arrays, checkpoint_arrays, final_arrays, logged_train_steps, run_subprocess, \
    start_subprocess, subprocess_env
from conftest import SAMPLE_TEXT
from jax.sharding import PartitionSpec

from charrnn import checkpoint, config, data, distributed, runtime, steps, training
from charrnn.errors import PeerError, UsageError

TWO_CPU_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
CPU_DEVICE_PER_CORE = {"XLA_FLAGS": ""}  # no forced count: charrnn train gives JAX one CPU device per core
COMMON = ["--config", TINY, "--set", "train.eval_every=6", "--set", "model.dropout=0.1", "--quiet"]
ARGS = [*COMMON, "--steps", "12"]


def assert_close(left, right):
    assert left.keys() == right.keys()
    for name in left:
        assert np.allclose(left[name], right[name], rtol=1e-4, atol=1e-5), name


def test_two_devices_train_like_one_and_resume_on_one(small_corpus, tmp_path):
    # A constant schedule makes step 12 of a 14-step run the end of a 12-step run; keep=2 keeps its checkpoint.
    constant = [*COMMON, "--set", "train.schedule=constant"]
    for devices, steps in (("1", "14"), ("2", "12")):
        result = run_subprocess("train", small_corpus, *constant, "--steps", steps, "--set", "train.keep=2",
                                "--devices", devices, "--out", f"d{devices}", cwd=tmp_path, **TWO_CPU_DEVICES)
        assert result.code == 0, result.err
        assert json.loads(result.out)["devices"] == int(devices)
    one_device = tmp_path / "d1" / "checkpoints"
    assert_close(checkpoint_arrays(checkpoint.step_path(one_device, 12)), final_arrays(tmp_path / "d2"))
    resumed = run_subprocess("train", "--resume", "d2", "--devices", "1", "--steps", "14", "--quiet", cwd=tmp_path,
                             **TWO_CPU_DEVICES)
    assert resumed.code == 0, resumed.err
    # The 2-device checkpoint continues on one device as if never interrupted: parameters,
    # optimizer state and carry all restored, the step counted on from 12.
    assert_close(checkpoint_arrays(checkpoint.step_path(one_device, 14)), final_arrays(tmp_path / "d2"))
    assert checkpoint.read_latest(tmp_path / "d2" / "checkpoints")[2]["step"] == 14
    assert logged_train_steps(tmp_path / "d2") == [10, 12, 14]


# A multi-process run simulated in one process: what each of 4 processes supplies of 12 streams.
NUM_PROCESSES = 4
NUM_STREAMS = 12


def as_process(monkeypatch, index: int) -> None:
    """Make charrnn.distributed see this process as process `index` of NUM_PROCESSES."""
    monkeypatch.setattr(distributed.jax, "process_index", lambda *args, **kwargs: index)
    monkeypatch.setattr(distributed.jax, "process_count", lambda *args, **kwargs: NUM_PROCESSES)


def test_processes_supply_disjoint_contiguous_blocks_of_streams_in_order(monkeypatch):
    placement = distributed.make_placement(1, NUM_STREAMS, 0)  # the slice follows the process, not the devices
    blocks, mains = [], []
    for index in range(NUM_PROCESSES):
        as_process(monkeypatch, index)
        blocks.append(list(range(NUM_STREAMS))[placement.local_streams(NUM_STREAMS)])
        mains.append(placement.is_main)
    assert blocks == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert mains == [True, False, False, False]  # process 0 alone writes


def test_each_process_reads_its_own_streams_of_the_minibatch(monkeypatch):
    placement = distributed.make_placement(1, NUM_STREAMS, 0)
    ids = np.arange(4000)  # every position its own id: a wrong stream cannot go unseen
    layout = data.stream_layout(len(ids), NUM_STREAMS, 16)
    step = layout.chunks_per_epoch + 3  # the second epoch, with its own random offset
    whole = data.training_batch(ids, layout, step, seed=7, random_offset=True)
    parts = []
    for index in range(NUM_PROCESSES):
        as_process(monkeypatch, index)
        streams = placement.local_streams(NUM_STREAMS)
        part = data.training_batch(ids, layout, step, seed=7, random_offset=True, streams=streams)
        np.testing.assert_array_equal(part.inputs, whole.inputs[:, streams])  # [T, B / processes]
        np.testing.assert_array_equal(part.targets, whole.targets[:, streams])
        parts.append(part)
    np.testing.assert_array_equal(np.concatenate([part.inputs for part in parts], axis=1), whole.inputs)
    np.testing.assert_array_equal(np.concatenate([part.targets for part in parts], axis=1), whole.targets)


def test_put_streams_hands_jax_only_this_process_rows_or_columns(monkeypatch):
    placement = distributed.make_placement(1, NUM_STREAMS, 0)
    carry = np.arange(NUM_STREAMS * 5).reshape(NUM_STREAMS, 5)  # [B, H]
    chunk = np.arange(7 * NUM_STREAMS).reshape(7, NUM_STREAMS)  # [T, B]
    handed = []  # (sharding, local data) of each call, as a multi-process run gives them to JAX
    monkeypatch.setattr(distributed.jax, "make_array_from_process_local_data",
                        lambda sharding, local: handed.append((sharding, local)))
    for index in range(NUM_PROCESSES):
        as_process(monkeypatch, index)
        own = slice(3 * index, 3 * index + 3)
        handed.clear()
        distributed.put_streams((carry, -carry), placement, NUM_STREAMS)
        distributed.put_streams(chunk, placement, NUM_STREAMS, axis=1)
        (h_sharding, h), (c_sharding, c), (chunk_sharding, chunk_part) = handed
        assert h_sharding == c_sharding == placement.batch and chunk_sharding == placement.time_major
        np.testing.assert_array_equal(h, carry[own])  # [B / processes, H]
        np.testing.assert_array_equal(c, -carry[own])
        np.testing.assert_array_equal(chunk_part, chunk[:, own])  # [T, B / processes]


def test_each_layout_splits_its_stream_axis_and_stacked_minibatches_go_whole(monkeypatch):
    placement = distributed.make_placement(1, NUM_STREAMS, 0, one_device="a kernel")  # one device is what pallas allows
    assert placement.num_devices == 1
    streams = distributed.AXIS
    assert [sharding.spec for sharding in placement[1:]] == [  # replicated; [B, H]; [T, B]; [K, T, B]
        PartitionSpec(), PartitionSpec(streams), PartitionSpec(None, streams), PartitionSpec(None, None, streams)]
    handed = []
    monkeypatch.setattr(distributed.jax, "make_array_from_process_local_data",
                        lambda sharding, local: handed.append((sharding, local)))
    as_process(monkeypatch, 1)
    stacked = data.Batch(np.ones((2, 7, 3)), np.zeros((2, 7, 3)), np.array([True, False]))  # [K, T, B / processes]
    distributed.put_batches(stacked, placement)
    # The task already read this process's streams: each part goes to JAX as it is.
    assert [sharding for sharding, _ in handed] == [placement.stacked, placement.stacked, placement.replicated]
    for (_, local), part in zip(handed, stacked):
        np.testing.assert_array_equal(local, part)


def test_every_process_takes_process_0s_decisions(monkeypatch):
    process_0 = np.array([12.5, 1.0])  # elapsed seconds, stopping
    monkeypatch.setattr(distributed.multihost_utils, "broadcast_one_to_all", lambda values: process_0)
    own = np.array([13.0, 0.0])
    assert distributed.agree(own) is own  # alone, its own
    as_process(monkeypatch, 2)
    np.testing.assert_array_equal(distributed.agree(own), process_0)


class FakeDevice(NamedTuple):
    platform: str


def test_default_device_count_splits_small_models_over_cpu_cores():
    cpus = [FakeDevice("cpu")] * 4
    small, large = 1_000_000, distributed.CPU_SPLIT_MAX_STEP_MACS + 1
    assert distributed.default_device_count(cpus, 64, small) == 4
    assert distributed.default_device_count(cpus, 64, distributed.CPU_SPLIT_MAX_STEP_MACS) == 4  # the bound splits
    assert distributed.default_device_count(cpus, 48, small) == 3  # the most that divide the streams
    assert distributed.default_device_count(cpus, 50, small) == 2
    assert distributed.default_device_count(cpus, 47, small) == 1
    assert distributed.default_device_count(cpus, 24, small) == 1  # 12 streams a core are too few
    assert distributed.default_device_count(cpus, 8, small) == 1  # too few even for one: still one
    assert distributed.default_device_count(cpus, 64, large) == 1  # XLA spreads a large matmul itself
    assert distributed.default_device_count([FakeDevice("gpu")] * 2, 8, large) == 2
    assert distributed.default_device_count(cpus, 64, small, cpu_split=False) == 1
    assert distributed.default_device_count([FakeDevice("gpu")] * 2, 8, small, cpu_split=False) == 2


def test_encoder_decoders_train_on_one_cpu_device_where_a_language_model_of_their_size_splits(monkeypatch):
    def devices_chosen(num_devices, batch_size, step_macs, one_device="", cpu_split=True):
        return num_devices or distributed.default_device_count([FakeDevice("cpu")] * 2, batch_size, step_macs,
                                                               cpu_split)

    monkeypatch.setattr(distributed, "make_placement", devices_chosen)
    language_model = config.Config(model=config.ModelConfig(hidden_size=64), train=config.TrainConfig(batch_size=32))
    encoder_decoder = dataclasses.replace(language_model,
                                          model=dataclasses.replace(language_model.model, kind="seq2seq"))
    assert steps.placement(language_model, None) == 2
    assert steps.placement(encoder_decoder, None) == 1
    assert steps.placement(encoder_decoder, 2) == 2  # --devices still splits it


def test_generation_splits_over_cpu_cores_by_the_training_rule(monkeypatch):
    monkeypatch.setattr(distributed, "make_placement", lambda count, streams, step_macs: ("mesh", count, streams))
    monkeypatch.setattr(distributed.jax, "local_devices", lambda: [FakeDevice("cpu")] * 4)
    assert distributed.local_split(64, 0) == ("mesh", 4, 64)
    assert distributed.local_split(24, 0) is None  # one device: the default one, no mesh
    monkeypatch.setattr(distributed.jax, "local_devices", lambda: [FakeDevice("gpu")] * 4)
    assert distributed.local_split(64, 0) is None


@pytest.mark.parametrize("devices, processes, batch_size, one_device, words", [
    (3, 1, 12, "", "--devices 3: JAX sees 2 device(s)"),
    (0, 1, 12, "", "--devices 0: JAX sees 2 device(s)"),
    (1, 4, 12, "", "must be all devices in a multi-process run"),
    (2, 1, 7, "", "train.batch_size 7 must be divisible by the 2 devices"),
    (2, 1, 12, "a kernel runs on one device", "a kernel runs on one device: use --devices 1 in one process"),
    (None, 4, 12, "a kernel runs on one device", "a kernel runs on one device: use --devices 1"),
])
def test_device_choices_that_cannot_work_are_usage_errors(monkeypatch, devices, processes, batch_size, one_device,
                                                          words):
    monkeypatch.setattr(distributed.jax, "devices", lambda: [FakeDevice("cpu")] * 2)
    monkeypatch.setattr(distributed.jax, "process_count", lambda: processes)
    with pytest.raises(UsageError, match=re.escape(words)):
        distributed.make_placement(devices, batch_size, 0, one_device=one_device)


def test_default_split_over_cores_resumes_bit_identically(small_corpus, tmp_path):
    cores = runtime.usable_cores()
    expected = distributed.default_device_count([FakeDevice("cpu")] * cores, 32, 0)
    common = ["--config", TINY, "--batch-size", "32", "--set", "train.eval_batch_size=16",
              "--set", "train.eval_every=6", "--set", "model.dropout=0.1", "--set", "train.schedule=constant", "--quiet"]
    whole = run_subprocess("train", small_corpus, *common, "--steps", "12", "--out", "whole", cwd=tmp_path,
                           **CPU_DEVICE_PER_CORE)
    assert whole.code == 0, whole.err
    assert json.loads(whole.out)["devices"] == expected
    first = run_subprocess("train", small_corpus, *common, "--steps", "6", "--out", "split", cwd=tmp_path,
                           **CPU_DEVICE_PER_CORE)
    assert first.code == 0, first.err
    rest = run_subprocess("train", "--resume", "split", "--steps", "12", "--quiet", cwd=tmp_path, **CPU_DEVICE_PER_CORE)
    assert rest.code == 0, rest.err
    split_steps = logged_train_steps(tmp_path / "split")  # the first session logs its last step, 6, as well
    assert split_steps == sorted(set(split_steps)) and set(logged_train_steps(tmp_path / "whole")) <= set(split_steps)
    assert_identical_arrays(final_arrays(tmp_path / "whole"), final_arrays(tmp_path / "split"))


def on_two_cpu_devices(probe: str, cwd) -> str:
    """What Python code `probe` prints in a process that sees two CPU devices."""
    done = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(**TWO_CPU_DEVICES), capture_output=True,
                          text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def with_text_task(corpus, probe: str) -> str:
    """`probe` after code that sets `cfg` (TINY's config), `task` (a TextTask on `corpus`) and `placement` (two
    devices)."""
    return f"""
import jax, numpy as np
from pathlib import Path
from charrnn import config, distributed, loop, steps, training
from charrnn.task import TextTask
cfg = config.resolve(Path({str(TINY)!r}), [], {{}})
task = TextTask(cfg, training.load_corpus(Path({str(corpus)!r}), 0.1))
placement = distributed.make_placement(2, cfg.train.batch_size, 0)
""" + probe


def test_streams_really_are_split(small_corpus, tmp_path):
    out = on_two_cpu_devices(with_text_task(small_corpus, """
optimizer = steps.make_optimizer(cfg.train)
state, carry = steps.place(*steps.fresh_state(cfg, optimizer, task.init_params, task.initial_carry), placement, cfg.train.batch_size)
run = loop.Loop(cfg, task, Path("unused"), placement, optimizer, loop.LoopState(state, carry), lambda: None,
                lambda event: None)
state, carry, _ = run.train_call(state, carry, run.batches(0, 1),
                                 distributed.put(np.ones(1, np.float32), placement.replicated))
h = carry[0].h
print(len(jax.devices()), [tuple(shard.data.shape) for shard in h.addressable_shards],
      [shard.data.shape for shard in state.params["embedding"].addressable_shards])
"""), tmp_path)
    assert out.split()[0] == "2"
    assert "[(4, 32), (4, 32)]" in out  # 8 streams: 4 per device
    assert out.count("(34, 16)") == 2  # parameters replicated


def test_evaluation_over_two_devices_scores_as_one_whether_or_not_its_streams_divide_between_them(small_corpus,
                                                                                               tmp_path):
    """Streams that divide are split over the devices; 3 streams on 2 devices are evaluated whole on each."""
    out = on_two_cpu_devices(with_text_task(small_corpus, """
params = task.init_params(jax.random.key(0))
for streams in (4, 3):
    print(streams, steps.evaluate(params, cfg.model, task.corpus.val_ids, streams, 16),
          steps.evaluate(params, cfg.model, task.corpus.val_ids, streams, 16, placement=placement))
"""), tmp_path)
    rows = [line.split() for line in out.splitlines()]
    assert [row[0] for row in rows] == ["4", "3"]
    for _, one_device, two_devices in rows:
        assert float(two_devices) == pytest.approx(float(one_device), rel=1e-5)


def test_a_kernel_the_compiler_cannot_split_keeps_a_run_on_one_device(tmp_path):
    probe = f"""
from charrnn import config, model, steps
from charrnn.errors import UsageError
model.fuses_layers = lambda model_config: model_config.kernel == "pallas"  # as on a GPU
xla = config.resolve({str(TINY)!r}, ["train.batch_size=64"], {{}})
pallas = config.resolve({str(TINY)!r}, ["train.batch_size=64", "model.kernel=pallas", "model.norm=none"], {{}})
print(steps.placement(xla, None).num_devices, steps.placement(pallas, None).num_devices)
try:
    steps.placement(pallas, 2)
except UsageError as error:
    print(error)
"""
    lines = on_two_cpu_devices(probe, tmp_path).splitlines()
    assert lines[0] == "2 1"
    assert "model.kernel = pallas runs on one device" in lines[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_like_one(small_corpus, tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    processes = [start_subprocess("train", small_corpus, *ARGS, "--out", "multi", "--coordinator", coordinator,
                                  "--num-processes", "2", "--process-id", str(index), cwd=tmp_path)
                 for index in range(2)]
    outputs = [process.communicate(timeout=240) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    assert json.loads(outputs[0][0])["devices"] == 2
    single = run_subprocess("train", small_corpus, *ARGS, "--out", "single", cwd=tmp_path)
    assert single.code == 0, single.err
    assert_close(final_arrays(tmp_path / "single"), final_arrays(tmp_path / "multi"))


def test_a_process_that_dies_ends_the_others_with_one_line_and_a_resumable_run(small_corpus, tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    args = ["--config", TINY, "--steps", "100000", "--set", "train.eval_every=20", "--quiet", "--out", "multi",
            "--coordinator", coordinator, "--num-processes", "2"]
    survivor, victim = [start_subprocess("train", small_corpus, *args, "--process-id", str(index), cwd=tmp_path)
                        for index in range(2)]
    deadline = time.monotonic() + 180
    while not list((tmp_path / "multi" / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    victim.kill()
    victim.communicate(timeout=60)
    began = time.monotonic()
    out, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 8, err
    assert time.monotonic() - began < 60  # not JAX's minutes-long shutdown barrier
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charrnn: error: another process of the run failed"), err
    assert "--resume multi" in lines[0] and out == ""
    resumed = run_subprocess("train", "--resume", "multi", "--steps", "60", "--quiet", cwd=tmp_path)
    assert resumed.code == 0, resumed.err


def test_scale_out_options_that_cannot_work_are_usage_errors(small_corpus, tmp_path):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("", port))
        busy.listen()
        cases = [(["--num-processes", "2", "--process-id", "1", "--out", "a"], "need --coordinator"),
                 (["--coordinator", "nonsense", "--num-processes", "2", "--process-id", "0", "--out", "a"], "HOST:PORT"),
                 (["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "0"], "--out"),
                 (["--distributed", "--out", "a"], "cannot join"),  # no launcher describes a run here
                 (["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0", "--out", "a"],
                  f"cannot listen on port {port}")]
        for extra, words in cases:
            done = run_subprocess("train", small_corpus, "--config", TINY, "--steps", "2", "--quiet", *extra,
                                  cwd=tmp_path)
            assert done.code == 2 and words in done.err and len(done.err.strip().splitlines()) == 1, done.err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("coordinator, num_processes, process_id, auto, has_out, words", [
    (None, None, None, False, False, None),  # one process
    (None, None, 1, False, True, "need --coordinator"),
    (None, 2, None, False, True, "need --coordinator"),
    (None, None, None, True, False, "needs --out or --resume"),
    (None, None, None, True, True, None),  # the launcher describes the run
    ("127.0.0.1:9", 2, 1, False, True, None),
    ("127.0.0.1:0", 2, 1, False, True, "port in 1-65535"),
    ("127.0.0.1:65536", 2, 1, False, True, "port in 1-65535"),
    ("[::1]:9", 2, 1, False, True, None),  # the port follows the last colon
    (":9", 2, 1, False, True, "HOST:PORT"),
    ("127.0.0.1:9", None, 1, False, True, "needs --num-processes and --process-id"),
    ("127.0.0.1:9", 2, None, False, True, "needs --num-processes and --process-id"),
    ("127.0.0.1:9", 2, 2, False, True, "--process-id 2 must be below --num-processes 2"),
])
def test_scale_out_options_are_checked_before_anything_starts(coordinator, num_processes, process_id, auto, has_out,
                                                              words):
    """In process, every rule; process 1 leaves the port alone (process 0's probe is the command-line test's)."""
    if words is None:
        distributed.check_scale_out(coordinator, num_processes, process_id, auto, has_out)
    else:
        with pytest.raises(UsageError, match=re.escape(words)):
            distributed.check_scale_out(coordinator, num_processes, process_id, auto, has_out)


@pytest.mark.parametrize("error, expected", [(ValueError, UsageError), (RuntimeError, PeerError)],
                         ids=["a run JAX cannot make out", "peers that never came"])
def test_failing_to_join_is_a_usage_or_a_peer_error(monkeypatch, error, expected):
    def fail(*args, **kwargs):
        raise error("DEADLINE_EXCEEDED: barrier timed out")

    monkeypatch.setattr(distributed.jax.config, "update", lambda *args: None)  # keep this process's collectives
    monkeypatch.setattr(distributed.jax.distributed, "initialize", fail)
    with pytest.raises(expected, match="cannot join the distributed run: DEADLINE_EXCEEDED"):
        distributed.initialize("127.0.0.1:9", 2, 1, False)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A folder with two runs trained on one device, "run" and "run2" (seeds 0 and 1)."""
    folder = tmp_path_factory.mktemp("two_runs")
    (folder / "corpus.txt").write_text(SAMPLE_TEXT * 40, encoding="utf-8")
    for seed, run in enumerate(["run", "run2"]):
        trained = run_subprocess("train", "corpus.txt", *ARGS, "--devices", "1", "--seed", str(seed), "--out", run,
                                 cwd=folder)
        assert trained.code == 0, trained.err
    return folder


@pytest.mark.parametrize("runs", [["run"], ["run", "run2"]], ids=["one model", "two together"])
def test_samples_split_over_cpu_devices_are_the_same_text(two_runs, runs):
    checkpoints = [word for run in runs for word in ("-c", run)]
    texts = {}
    for name, environment in (("one", {}), ("two", TWO_CPU_DEVICES)):
        done = run_subprocess("sample", *checkpoints, "--num-samples", "32", "--length", "300", "--prime",
                              SAMPLE_TEXT[:5], "--seed", "5", "--json", cwd=two_runs, **environment)
        assert done.code == 0, done.err
        texts[name] = [json.loads(line)["text"] for line in done.out.splitlines()]
    assert len(texts["one"]) == 32 and len(set(texts["one"])) == 32
    assert texts["one"] == texts["two"]


@pytest.mark.parametrize("error", [ValueError, jax.errors.JaxRuntimeError])
def test_a_collective_failing_on_a_lost_peer_is_a_peer_error_naming_the_resume(tmp_path, monkeypatch, error):
    """gloo reports a lost peer as either exception, by where it surfaces; alone, the same error is this process's own."""
    def lost_peer(*args, **kwargs):
        raise error("UNKNOWN: Gloo all-reduce failed: Read error [127.0.0.1]:2458: Connection reset by peer")

    monkeypatch.setattr(training, "_train", lost_peer)
    with pytest.raises(error):
        training.train("corpus.txt", tmp_path / "run")
    monkeypatch.setattr(training.jax, "process_count", lambda: 2)
    with pytest.raises(PeerError, match=f"--resume {tmp_path / 'run'}"):
        training.train("corpus.txt", tmp_path / "run")
