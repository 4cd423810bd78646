"""TensorBoard writer: the event files it leaves, read back without TensorFlow."""

import importlib.util
import math
import struct
import sys
from pathlib import Path

import pytest
from clihelp import TINY

from charrnn.errors import StorageError, UsageError
from charrnn.events import Evaluated, Logged, Started, Stopped
from charrnn.tensorboard import TensorBoardWriter

# The reading tests need the optional extra; the test without it runs everywhere.
needs_tensorboardx = pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None,
                                        reason="the tensorboard extra is not installed")


def read_events(directory: Path) -> list:
    """Every Event in the directory's TFRecord files: uint64 length, its masked CRC, the data, the data's CRC."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        content = path.read_bytes()
        offset = 0
        while offset < len(content):
            header = content[offset:offset + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", content[offset + 8:offset + 12])
            data = content[offset + 12:offset + 12 + length]
            (data_crc,) = struct.unpack("<I", content[offset + 12 + length:offset + 16 + length])
            assert (header_crc, data_crc) == (masked_crc32c(header), masked_crc32c(data))
            events.append(event_pb2.Event.FromString(data))
            offset += 16 + length
    return events


def read_scalars(directory: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar, in the order written."""
    return [(value.tag, event.step, value.simple_value)
            for event in read_events(directory) for value in event.summary.value]


def logged(step: int, loss: float, chars_per_s: float | None) -> Logged:
    return Logged(step=step, loss=loss, lr=0.002 / step, grad_norm=step / 10, chars_per_s=chars_per_s,
                  chars_seen=step * 100, elapsed_s=step / 5, val_loss=None)


@needs_tensorboardx
def test_writes_train_and_val_scalars_against_the_step(tmp_path):
    writer = TensorBoardWriter(tmp_path)
    for event in [Started(run_dir=tmp_path, first_step=0, total_steps=30, budget_s=0.0),
                  logged(10, 3.0, 5000.0), logged(20, 2.5, 6000.0),
                  Evaluated(step=20, val_loss=2.75, chars_seen=2000, elapsed_s=4.0, final=False,
                            checkpoint=tmp_path / "step-20.safetensors", best=True),
                  logged(21, 2.25, None),
                  Evaluated(step=21, val_loss=2.5, chars_seen=2100, elapsed_s=4.2, final=False,
                            checkpoint=tmp_path / "step-21.safetensors", best=False, fraction=0.25),
                  Stopped(status="finished", step=21)]:
        writer(event)

    expected = []
    for step, loss, chars_per_s in [(10, 3.0, 5000.0), (20, 2.5, 6000.0)]:
        expected += [("train/loss", step, loss), ("train/bits_per_char", step, loss / math.log(2)),
                     ("train/learning_rate", step, 0.002 / step), ("train/grad_norm", step, step / 10),
                     ("train/chars_per_s", step, chars_per_s)]
    expected += [("val/loss", 20, 2.75), ("val/bits_per_char", 20, 2.75 / math.log(2))]
    expected += [("train/loss", 21, 2.25), ("train/bits_per_char", 21, 2.25 / math.log(2)),
                 ("train/learning_rate", 21, 0.002 / 21), ("train/grad_norm", 21, 2.1)]
    expected += [("val_part/loss", 21, 2.5), ("val_part/bits_per_char", 21, 2.5 / math.log(2))]  # a part: not val's curve
    scalars = read_scalars(tmp_path)
    assert [(tag, step) for tag, step, _ in scalars] == [(tag, step) for tag, step, _ in expected]
    # simple_value is a float32.
    assert [value for *_, value in scalars] == pytest.approx([value for *_, value in expected], rel=1e-6)


@needs_tensorboardx
def test_skips_non_finite_values(tmp_path):
    writer = TensorBoardWriter(tmp_path)
    writer(Logged(step=5, loss=math.nan, lr=0.001, grad_norm=math.inf, chars_per_s=None, chars_seen=500,
                  elapsed_s=1.0, val_loss=None))
    writer(Stopped(status="diverged", step=5))
    assert read_scalars(tmp_path) == [("train/learning_rate", 5, pytest.approx(0.001))]


@needs_tensorboardx
def test_an_evaluation_reaches_the_file_before_the_writer_closes(tmp_path):
    """What was written up to an evaluation is on disk once the evaluation is: a run that crashes after it keeps it."""
    writer = TensorBoardWriter(tmp_path)
    writer(logged(10, 3.0, 5000.0))
    writer(Evaluated(step=10, val_loss=2.75, chars_seen=1000, elapsed_s=2.0, final=False,
                     checkpoint=tmp_path / "step-10.safetensors", best=True))
    assert [tag for tag, _, _ in read_scalars(tmp_path)] == ["train/loss", "train/bits_per_char", "train/learning_rate",
                                                             "train/grad_norm", "train/chars_per_s", "val/loss",
                                                             "val/bits_per_char"]
    writer(logged(11, 2.5, None))  # the points after it go on being written
    writer(Stopped(status="finished", step=11))
    assert [step for tag, step, _ in read_scalars(tmp_path) if tag == "train/loss"] == [10, 11]


@needs_tensorboardx
def test_purge_step_marks_a_restart_for_tensorboard(tmp_path):
    from tensorboardX.proto.event_pb2 import SessionLog

    TensorBoardWriter(tmp_path, purge_step=21)(Stopped(status="finished", step=30))
    starts = [event.step for event in read_events(tmp_path)
              if event.session_log.status == SessionLog.START]
    assert starts == [21]


@needs_tensorboardx
def test_a_directory_that_cannot_be_made_is_a_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot write TensorBoard files to"):
        TensorBoardWriter(blocker / "tensorboard")


def test_without_the_extra_says_how_to_install_it(tmp_path, monkeypatch):
    for name in ["tensorboardX", *(name for name in sys.modules if name.startswith("tensorboardX."))]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it, or any part of it, now raises ImportError
    with pytest.raises(UsageError) as raised:
        TensorBoardWriter(tmp_path)
    message = str(raised.value)
    assert "\n" not in message and ".[tensorboard]" in message
    assert raised.value.exit_code == 2


@needs_tensorboardx
def test_a_resume_purges_from_the_step_after_its_checkpoint(cli, small_corpus, tmp_path):
    from tensorboardX.proto.event_pb2 import SessionLog

    args = ["--config", TINY, "--set", "train.eval_every=5", "--set", "train.log_every=5"]
    assert cli("train", small_corpus, *args, "--steps", "10", "--out", "run", "--tensorboard").code == 0
    assert cli("train", "--resume", "run", "--steps", "20", "--tensorboard").code == 0
    starts = [event.step for event in read_events(tmp_path / "run" / "tensorboard")
              if event.session_log.status == SessionLog.START]
    assert starts == [11]
