"""Bad input gets one clear line: `charrnn: error: ...`, a documented exit code, no traceback, nothing changed."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import pytest
from clihelp import TINY, run_in_process, snapshot, subprocess_env

from charrnn import checkpoint
from charrnn.errors import Interrupted
from charrnn.stdout import ReaderGone, command_stdout

USAGE, CORPUS, CHECKPOINT, STORAGE = 2, 3, 4, 6
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n" * 60


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A directory with a trained run at runs/good and bad inputs of every kind beside it."""
    root = tmp_path_factory.mktemp("errors")
    corpus = write(root / "corpus.txt", TEXT + "café — naïve\n")
    done = subprocess.run([sys.executable, "-m", "charrnn", "train", str(corpus), "--config", str(TINY),
                           "--steps", "10", "--out", "runs/good", "--quiet"], cwd=root, env=subprocess_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    good = checkpoint.step_files(root / "runs" / "good" / "checkpoints")[-1]
    payload = good.read_bytes()
    flipped = bytearray(payload)
    flipped[-10] ^= 0x01
    write(root / "ckpt" / "empty.safetensors", b"")
    write(root / "ckpt" / "truncated.safetensors", payload[: len(payload) // 2])
    write(root / "ckpt" / "flipped.safetensors", bytes(flipped))
    write(root / "ckpt" / "random.safetensors", os.urandom(4096))
    arrays, metadata = checkpoint.read(good)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "FORMAT_VERSION", 99)
        write(root / "ckpt" / "future.safetensors", checkpoint.encode(arrays, metadata))
    for name, temperatures in (("words", ["hot"]), ("two", [1.1, 1.2]), ("zero", [0.0])):  # a run of one model
        write(root / "ckpt" / f"temperatures-{name}.safetensors",
              checkpoint.encode(arrays, {**metadata, "temperatures": temperatures}))
    write(root / "bad" / "empty.txt", b"")
    write(root / "bad" / "short.txt", "tiny text\n" * 10)
    write(root / "bad" / "binary.bin", bytes(range(256)) * 4)
    write(root / "bad" / "latin1.txt", "caf\xe9 au lait\n".encode("latin-1") * 100)
    write(root / "bad" / "utf16.txt", TEXT.encode("utf-16"))
    write(root / "bad" / "nul.txt", (TEXT[:50] + "\x00" + TEXT[50:]).encode())
    write(root / "bad" / "one_char.txt", "a" * 5000)
    write(root / "bad" / "not_a_dir", "a regular file")
    (root / "bad" / "folder").mkdir()
    os.mkfifo(root / "bad" / "pipe")  # read once it would be empty the second time, or block with no writer
    write(root / "unknown.txt", "Zebra quiz 42 €\n")
    return root


TRAIN = ["train", "--config", str(TINY), "--steps", "5"]
CASES = [
    # (id, argv, exit code, words the error line must contain)
    ("missing corpus", [*TRAIN, "nowhere.txt"], CORPUS, "no such file"),
    ("directory corpus", [*TRAIN, "bad/folder"], CORPUS, "directory"),
    ("empty corpus", [*TRAIN, "bad/empty.txt"], CORPUS, "empty"),
    ("shorter than one batch", [*TRAIN, "bad/short.txt"], CORPUS, "batch_size"),
    ("empty validation split", [*TRAIN, "corpus.txt", "--set", "train.val_fraction=0.0001"], CORPUS, "validation"),
    ("binary file", [*TRAIN, "bad/binary.bin"], CORPUS, "offset 0"),
    ("not UTF-8", [*TRAIN, "bad/latin1.txt"], CORPUS, "offset 3"),
    ("UTF-16", [*TRAIN, "bad/utf16.txt"], CORPUS, "UTF-16"),
    ("NUL byte", [*TRAIN, "bad/nul.txt"], CORPUS, "offset 50"),
    ("one-character vocabulary", [*TRAIN, "bad/one_char.txt"], CORPUS, "single distinct character"),
    ("corpus from a pipe", [*TRAIN, "bad/pipe"], CORPUS, "not a regular file"),
    ("negative seed", [*TRAIN, "corpus.txt", "--seed", "-1"], USAGE, "train.seed"),
    ("seed past 32 bits", [*TRAIN, "corpus.txt", "--seed", str(2**64)], USAGE, "train.seed"),
    ("unknown --set key", [*TRAIN, "corpus.txt", "--set", "model.colour=red"], USAGE, "model.colour"),
    ("unknown --set section", [*TRAIN, "corpus.txt", "--set", "optim.lr=1"], USAGE, "optim"),
    ("wrong --set type", [*TRAIN, "corpus.txt", "--set", "model.hidden_size=big"], USAGE, "model.hidden_size"),
    ("bad option value", [*TRAIN, "corpus.txt", "--steps", "many"], USAGE, "--steps"),
    ("bad choice", [*TRAIN, "corpus.txt", "--cell", "cnn"], USAGE, "--cell"),
    ("invalid config value", [*TRAIN, "corpus.txt", "--set", "model.dropout=1.5"], USAGE, "model.dropout"),
    ("unwritable output", [*TRAIN, "corpus.txt", "--out", "bad/not_a_dir/run"], STORAGE, "cannot write"),
    ("unwritable --tensorboard-dir", [*TRAIN, "corpus.txt", "--tensorboard-dir", "bad/not_a_dir/tb"], STORAGE,
     "cannot write"),
    ("unknown --set key with --tensorboard", [*TRAIN, "corpus.txt", "--tensorboard", "--set", "train.x=1"], USAGE,
     "train.x"),
    ("existing run without --resume", [*TRAIN, "corpus.txt", "--out", "runs/good"], USAGE, "--resume"),
    ("resume of nothing", ["train", "--resume", "bad/folder"], CHECKPOINT, "not a charrnn run"),
    ("prime outside vocabulary", ["sample", "--prime", "Zebra €"], USAGE, "'€'"),
    ("negative temperature", ["sample", "--temp", "-1"], USAGE, "temperature"),
    ("NaN temperature", ["sample", "--temp", "nan"], USAGE, "temperature"),
    ("infinite temperature", ["sample", "--temp", "inf"], USAGE, "temperature"),
    ("top-p zero", ["sample", "--top-p", "0"], USAGE, "top-p"),
    ("top-p above one", ["sample", "--top-p", "1.5"], USAGE, "top-p"),
    ("negative top-k", ["sample", "--top-k", "-2"], USAGE, "top-k"),
    ("negative length", ["sample", "--length", "-5"], USAGE, "length"),
    ("sampling seed past 32 bits", ["sample", "--seed", str(2**32)], USAGE, "--seed"),
    ("unwritable --dump", ["viz", "-c", "runs/good", "--text", "ab", "--units", "1", "--dump", "bad/not_a_dir/a.npz"],
     STORAGE, "cannot write"),
    ("unwritable viz -o", ["viz", "-c", "runs/good", "--text", "ab", "--units", "1", "-o", "bad/not_a_dir/a.html"],
     STORAGE, "cannot write"),
    ("plot under a file", ["plot", "runs/good", "-o", "bad/not_a_dir/curves.png"], STORAGE, "cannot write"),
    ("missing --prime-file", ["sample", "--prime-file", "nowhere.txt"], CORPUS, "cannot read"),
    ("--prime and --prime-file", ["sample", "--prime", "A", "--prime-file", "corpus.txt"], USAGE, "not both"),
    ("sample --beam of a language model", ["sample", "--beam", "2"], USAGE, "--beam"),
    ("eval --beam of a language model", ["eval", "corpus.txt", "--beam", "2"], USAGE, "--beam"),
    ("novelty n-grams of length 0", ["novelty", "corpus.txt", "corpus.txt", "--ngrams", "5,0"], USAGE, "--ngrams"),
    ("runs --json and --csv", ["runs", "runs", "--json", "--csv"], USAGE, "not both"),
    ("missing viz --text-file", ["viz", "-c", "runs/good", "--text-file", "nowhere.txt"], CORPUS, "cannot read"),
    ("resume past --steps", ["train", "--resume", "runs/good", "--steps", "2"], USAGE, "at step 10"),
    ("config not UTF-8", [*TRAIN, "corpus.txt", "--config", "bad/latin1.txt"], USAGE, "not UTF-8"),
    ("endless bench window", ["bench", "--config", str(TINY), "--seconds", "inf"], USAGE, "--seconds"),
    ("bench corpus below the baseline", ["bench", "--config", str(TINY), "--corpus-mb", "0.5"], USAGE, "--corpus-mb"),
    ("bench corpus of inf MB", ["bench", "--config", str(TINY), "--corpus-mb", "inf"], USAGE, "--corpus-mb"),
    ("missing checkpoint", ["sample", "-c", "ckpt/none.safetensors"], CHECKPOINT, "no such checkpoint"),
    ("empty checkpoint", ["sample", "-c", "ckpt/empty.safetensors"], CHECKPOINT, "empty"),
    ("truncated checkpoint", ["sample", "-c", "ckpt/truncated.safetensors"], CHECKPOINT, "truncated"),
    ("bit-flipped checkpoint", ["sample", "-c", "ckpt/flipped.safetensors"], CHECKPOINT, "corrupted"),
    ("random-bytes checkpoint", ["sample", "-c", "ckpt/random.safetensors"], CHECKPOINT, "not a charrnn checkpoint"),
    ("other format version", ["eval", "corpus.txt", "-c", "ckpt/future.safetensors"], CHECKPOINT, "format version 99"),
    ("temperatures not numbers", ["sample", "-c", "ckpt/temperatures-words.safetensors"], CHECKPOINT, "temperatures"),
    ("a temperature per member, not per model", ["eval", "corpus.txt", "-c", "ckpt/temperatures-two.safetensors"],
     CHECKPOINT, "temperatures"),
    ("a temperature of zero", ["sample", "-c", "ckpt/temperatures-zero.safetensors"], CHECKPOINT, "temperatures"),
    ("eval of missing file", ["eval", "nowhere.txt"], CORPUS, "no such file"),
    ("eval outside vocabulary", ["eval", "unknown.txt"], USAGE, "--skip-unknown"),
]


@pytest.mark.parametrize("argv, code, words", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_gets_one_clear_line(workspace, capsys, monkeypatch, argv, code, words):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    result = run_in_process(capsys, *argv)
    lines = result.err.strip().splitlines()
    assert result.code == code, result.err
    assert len(lines) == 1 and lines[0].startswith("charrnn: error: "), result.err
    assert words in lines[0]
    assert "Traceback" not in result.err and result.out == ""
    assert snapshot(workspace) == before


def test_a_refused_first_run_leaves_no_runs_folder_behind(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "corpus.txt", TEXT)
    result = run_in_process(capsys, *TRAIN, "corpus.txt", "--epochs", "-1")
    assert result.code == USAGE and "max_epochs" in result.err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.txt"]


def test_novelty_of_an_empty_stdin_is_a_corpus_error_as_of_an_empty_file(workspace):
    for argv, stdin in ((["bad/empty.txt"], b""), (["-"], b"")):
        done = subprocess.run([sys.executable, "-m", "charrnn", "novelty", "corpus.txt", *argv], input=stdin,
                              cwd=workspace, env=subprocess_env(), capture_output=True)
        assert done.returncode == CORPUS and b"is empty" in done.stderr, done.stderr


@pytest.mark.skipif(any(device.platform == "gpu" for device in jax.devices()), reason="a GPU is there")
def test_asking_for_a_gpu_where_there_is_none_is_a_usage_error(workspace):
    done = subprocess.run([sys.executable, "-m", "charrnn", *TRAIN, "corpus.txt", "--platform", "gpu", "--out", "g"],
                          cwd=workspace, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == USAGE and done.stderr.startswith("charrnn: error: --platform gpu"), done.stderr
    assert "Traceback" not in done.stderr and not (workspace / "g").exists()


def test_no_trained_run_is_a_checkpoint_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_in_process(capsys, "sample")
    assert result.code == CHECKPOINT and "no trained run" in result.err


def test_debug_shows_the_traceback(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    result = run_in_process(capsys, "--debug", "sample", "-c", "ckpt/truncated.safetensors")
    assert result.code == CHECKPOINT and "Traceback" in result.err


def test_skipping_unknown_characters_is_offered(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    result = run_in_process(capsys, "sample", "--prime", "Zebra €", "--skip-unknown", "--length", "20", "--seed", "1")
    assert result.code == 0 and result.out.startswith("ebra ")
    scored = run_in_process(capsys, "eval", "unknown.txt", "--skip-unknown", "--json")
    assert scored.code == 0 and json.loads(scored.out)["chars"] > 0


def test_length_zero_prints_only_the_prime(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    result = run_in_process(capsys, "sample", "--length", "0", "--prime", "ROMEO", "--seed", "1")
    assert result.code == 0 and result.out == "ROMEO\n"
    from_file = run_in_process(capsys, "sample", "--length", "0", "--prime-file", "corpus.txt", "--seed", "1")
    assert from_file.code == 0 and from_file.out == (workspace / "corpus.txt").read_text(encoding="utf-8") + "\n"


@pytest.mark.parametrize("raised, code, line", [
    (RuntimeError("boom\nsecond line"), 1, "charrnn: error: internal error: RuntimeError: boom\n"),  # a bug: line 1
    (KeyboardInterrupt(), 130, ""),  # Ctrl-C: the shell's code for SIGINT, no traceback
], ids=["bug", "ctrl-c"])
def test_a_bug_or_ctrl_c_ends_with_its_exit_code_and_no_traceback(workspace, capsys, monkeypatch, raised, code, line):
    import charrnn.novelty

    def measure(*args, **kwargs):
        raise raised

    monkeypatch.chdir(workspace)
    monkeypatch.setattr(charrnn.novelty, "novelty", measure)
    result = run_in_process(capsys, "novelty", "corpus.txt", "corpus.txt")
    assert (result.code, result.err, result.out) == (code, line, "")


@pytest.mark.parametrize("argv, read", [
    (["sample", "--length", "100000", "--seed", "1"], 20),  # closed mid-stream, as `head -c 20` does
    (["eval", "corpus.txt"], 0),  # closed before the one result line is written
    (["inspect", "runs/good", "--json"], 0),
    (["runs", "runs"], 0),
    (["--help"], 0),
], ids=["sample", "eval", "inspect", "runs", "help"])
def test_output_piped_into_head_exits_quietly(workspace, argv, read):
    process = subprocess.Popen([sys.executable, "-m", "charrnn", *argv], cwd=workspace, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(process.stdout.read(read)) == read
    process.stdout.close()  # the reader has all it wanted
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert b"Traceback" not in err and b"error" not in err and b"Exception" not in err


def test_a_closed_pipe_ends_the_command_and_leaves_stdout_writable(monkeypatch):
    """In-process: the write that meets the closed pipe raises ReaderGone, the descriptor then leads to
    /dev/null (so the interpreter's last flush succeeds), and sys.stdout is the stream it was."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first write
    with open(write_end, "w", encoding="ascii") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        with pytest.raises(ReaderGone), command_stdout():
            print("naïve " * 10, flush=True)  # UTF-8 whatever the stream had; the flush meets the closed pipe
        assert sys.stdout is stream
        with pytest.raises(KeyError), command_stdout():
            raise KeyError("any error")
        assert sys.stdout is stream
        stream.write("more")
    # Closing flushed "more" into /dev/null: no BrokenPipeError.


@pytest.mark.parametrize("argv, expected", [
    (["sample", "--prime", "café — naïve", "--length", "30", "--seed", "1"], "café — naïve"),
    (["eval", "naïve.txt"], "naïve.txt: "),
    (["runs", "rün"], "rün"),
], ids=["sample", "eval", "runs"])
def test_an_ascii_locale_with_redirected_stdout_writes_utf8(workspace, argv, expected):
    if not (workspace / "naïve.txt").exists():
        write(workspace / "naïve.txt", TEXT[:400])
        shutil.copytree(workspace / "runs" / "good", workspace / "rün" / "good")
    for env in ({"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": ""}, {"PYTHONIOENCODING": "ascii"}):
        done = subprocess.run([sys.executable, "-m", "charrnn", *argv], cwd=workspace, env=subprocess_env(**env),
                              capture_output=True)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout.decode("utf-8")


def test_a_signal_ends_with_the_shells_code_for_it():
    """README's exit codes: 128 + the signal's number, as a shell reports a process the signal ended."""
    assert Interrupted("stopped", signal.SIGINT).exit_code == 130
    assert Interrupted("stopped", signal.SIGTERM).exit_code == 143
