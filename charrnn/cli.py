"""The `charrnn` command line: parse options, call one library function per command, report.

Generated text and JSON results go to stdout alone; progress, tables and logs
go to stderr, so `charrnn sample > out.txt` is clean and sweeps can parse stdout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from charrnn import __version__
from charrnn.errors import EXIT_SIGINT, CharrnnError, CorpusError, UsageError
from charrnn.stdout import EndsWhenReaderLeaves, ReaderGone, command_stdout

err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)  # "[" in a path is a path
app = typer.Typer(
    name="charrnn",
    help="Character-level RNN / GRU / LSTM text generator: train, sample, eval.",
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_debug = {"on": False}
_multi_process = {"on": False}  # set once a train command joins a multi-process run

MODEL, TRAINING, SAMPLING, RUN, OUTPUT, SCALE = "Model", "Training", "Sampling", "Run", "Output", "Scaling out"
DEFAULT_CORPUS_NAME = Path("data") / "tinyshakespeare.txt"


class Cell(str, Enum):
    rnn = "rnn"
    gru = "gru"
    lstm = "lstm"


class Platform(str, Enum):
    cpu = "cpu"
    gpu = "gpu"


def default_corpus() -> Path:
    """data/tinyshakespeare.txt here, else the copy beside the installed package."""
    if DEFAULT_CORPUS_NAME.exists():
        return DEFAULT_CORPUS_NAME
    return Path(__file__).resolve().parent.parent / DEFAULT_CORPUS_NAME


def _version(value: bool) -> None:
    if value:
        print(f"charrnn {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(
    context: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
) -> None:
    """Character-level RNN / GRU / LSTM text generator: train, sample, eval."""
    _debug["on"] = debug
    if context.invoked_subcommand is None:
        print(context.get_help())


ThreadsOption = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads: 1 = single-threaded (one run per core in a sweep); N = the first N cores (place parallel runs with taskset).", rich_help_panel=RUN)]
PlatformOption = Annotated[Optional[Platform], typer.Option("--platform", help="Force a JAX platform (default: GPU when JAX sees one).", rich_help_panel=RUN)]


def _setup(platform: Platform | None, threads: int | None, cpu_device_per_core: bool = False,
           compilation_cache: bool = True, multi_process: bool = False) -> None:
    from charrnn import runtime

    runtime.configure(platform.value if platform else None, threads, compilation_cache, cpu_device_per_core,
                      multi_process)


class _ProgressReporter:
    """Draws a rich progress bar on a terminal, plain periodic lines otherwise; nothing with quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar: Progress | None = None
        self.task = None

    def start(self, total_steps: int, first_step: int, budget_s: float) -> None:
        if self.quiet or not err_console.is_terminal:
            return
        self.bar = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[speed]} chars/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
        )
        self.task = self.bar.add_task("train", total=total_steps, completed=first_step, loss="-", val="-", speed="-")
        self.bar.start()

    def progress(self, step: int, info: dict[str, Any]) -> None:
        val = "-" if info.get("val_loss") is None else f"{info['val_loss']:.3f}"
        speed = "-" if info.get("chars_per_s") is None else f"{info['chars_per_s']:,.0f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{info['loss']:.3f}", val=val, speed=speed)
        elif not self.quiet:
            err_console.print(f"step {step}  loss {info['loss']:.4f}  val {val}  lr {info['lr']:.2e}  "
                              f"{speed} chars/s  {info['elapsed_s']:.0f}s")

    def message(self, text: str) -> None:
        if not self.quiet:
            (self.bar.console if self.bar else err_console).print(text)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def train(
    corpus: Annotated[Optional[Path], typer.Argument(help="UTF-8 text to learn from (default: data/tinyshakespeare.txt; with --resume, the run's corpus).", show_default=False)] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", exists=True, dir_okay=False, help="TOML config (see configs/).", rich_help_panel=RUN)] = None,
    assignments: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set model.cell=gru (repeatable).", rich_help_panel=RUN)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default: a new one under ./runs/).", rich_help_panel=RUN)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run directory exactly where it stopped.", rich_help_panel=RUN)] = None,
    cell: Annotated[Optional[Cell], typer.Option("--cell", help="model.cell", rich_help_panel=MODEL)] = None,
    num_layers: Annotated[Optional[int], typer.Option("--layers", help="model.num_layers", rich_help_panel=MODEL)] = None,
    hidden_size: Annotated[Optional[int], typer.Option("--hidden", help="model.hidden_size", rich_help_panel=MODEL)] = None,
    embedding_size: Annotated[Optional[int], typer.Option("--embedding", help="model.embedding_size", rich_help_panel=MODEL)] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="model.dropout", rich_help_panel=MODEL)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="train.steps: the run's total optimizer steps.", rich_help_panel=TRAINING)] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="train.max_minutes: wall-clock budget (0 = none).", rich_help_panel=TRAINING)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="train.batch_size", rich_help_panel=TRAINING)] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="train.seq_len", rich_help_panel=TRAINING)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="train.lr", rich_help_panel=TRAINING)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="train.seed", rich_help_panel=TRAINING)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors and the final JSON line.", rich_help_panel=OUTPUT)] = False,
    threads: ThreadsOption = None,
    platform: PlatformOption = None,
    devices: Annotated[Optional[int], typer.Option("--devices", min=1, help="Devices to split the streams over; train.batch_size must divide. Default: all GPUs, or on a CPU each core when the model is small enough to gain.", rich_help_panel=SCALE)] = None,
    coordinator: Annotated[Optional[str], typer.Option("--coordinator", help="HOST:PORT of process 0, to train with several processes or hosts.", rich_help_panel=SCALE)] = None,
    num_processes: Annotated[Optional[int], typer.Option("--num-processes", min=1, help="Processes in a multi-process run.", rich_help_panel=SCALE)] = None,
    process_id: Annotated[Optional[int], typer.Option("--process-id", min=0, help="This process's index, 0 to --num-processes - 1.", rich_help_panel=SCALE)] = None,
    distributed_auto: Annotated[bool, typer.Option("--distributed", help="Join a multi-process run described by the environment (SLURM, Open MPI, JAX_COORDINATOR_ADDRESS...).", rich_help_panel=SCALE)] = False,
) -> None:
    """Train a model on CORPUS, saving checkpoints; print a JSON summary line at the end."""
    options = {
        "model": {"cell": cell.value if cell else None, "num_layers": num_layers, "hidden_size": hidden_size,
                  "embedding_size": embedding_size, "dropout": dropout},
        "train": {"steps": steps, "max_minutes": minutes, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
                  "seed": seed},
    }
    options = {section: {k: v for k, v in values.items() if v is not None} for section, values in options.items()}
    if resume is not None and out is not None and out != resume:
        raise UsageError("give either --resume RUN or --out DIR, not both")
    run_dir = resume or out
    # One process per host splits its streams over the CPU's cores itself; several take a device each.
    multi_process = bool(coordinator or distributed_auto)
    _setup(platform, threads, cpu_device_per_core=not multi_process, multi_process=multi_process)
    from charrnn import distributed, rundir, runner

    distributed.check_scale_out(coordinator, num_processes, process_id, distributed_auto, run_dir is not None)
    summary_out = sys.stdout
    if multi_process:
        _multi_process["on"] = True
        # The collectives' native code prints on file descriptor 1; keep stdout for the summary alone,
        # and send the rest to stderr (or nowhere, with --quiet).
        summary_out = EndsWhenReaderLeaves(os.fdopen(os.dup(sys.stdout.fileno()), "w"))
        native_out = os.open(os.devnull, os.O_WRONLY) if quiet else sys.stderr.fileno()
        os.dup2(native_out, sys.stdout.fileno())
        if not quiet:
            err_console.print(f"joining the multi-process run (up to {distributed.JOIN_TIMEOUT_S} s for every "
                              f"process to start)", style="dim")
    distributed.initialize(coordinator, num_processes, process_id, distributed_auto)

    made_run_dir = run_dir is None
    if made_run_dir:
        run_dir = rundir.new_run_dir(Path("runs"))
    if corpus is None:
        corpus = _resume_corpus(run_dir) if resume else default_corpus()
    reporter = _ProgressReporter(quiet)
    try:
        summary = runner.run_training(corpus, run_dir, config_file, assignments or [], options, resume is not None,
                                      reporter, devices)
    except CharrnnError:
        if made_run_dir:  # refused before anything was written: leave no empty run behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    finally:
        reporter.stop()
    if not quiet:
        err_console.print(f"done: best val {summary['best_val_loss']:.4f} nats/char "
                          f"({summary['best_val_bpc']:.3f} bits/char) in {summary['wall_s']:.0f}s")
    print(rundir.strict_json(summary), file=summary_out, flush=True)


def _resume_corpus(run_dir: Path) -> Path:
    from charrnn import rundir

    try:
        return Path(rundir.read_json(run_dir / rundir.STATUS_FILE)["corpus"])
    except (OSError, ValueError, KeyError):
        return default_corpus()


def _text_option(text: str | None, text_file: Path | None, option: str) -> str | None:
    """The text of --OPTION or of --OPTION-file (at most one of them), or None."""
    if text is not None and text_file is not None:
        raise UsageError(f"give either --{option} or --{option}-file, not both")
    if text_file is not None:
        from charrnn.data import decode_text

        try:
            return decode_text(text_file.read_bytes(), str(text_file))
        except OSError as error:  # a text that cannot be read, like a corpus that cannot (exit 3)
            raise CorpusError(f"cannot read {text_file}: {error.strerror}") from None
    return text


def _encode_checked(vocab, text: str, what: str, skip_unknown: bool):
    """Encode `text`, refusing (or with skip_unknown dropping) characters the model never saw."""
    unknown = vocab.unknown(text)
    if unknown:
        if not skip_unknown:
            shown = " ".join(repr(char) for char in unknown[:20])
            raise UsageError(f"{what} has characters outside the model's vocabulary: {shown} (--skip-unknown drops them)")
        text = "".join(char for char in text if char in vocab.index)
    return vocab.encode(text), text


@app.command()
def sample(
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Run directory or checkpoint file (default: newest run under ./runs).", rich_help_panel=SAMPLING)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temp", "--temperature", help="Sampling temperature; 0 = always the most likely character (default: the run's sample.temperature, 0.8 unless set).", rich_help_panel=SAMPLING)] = None,
    length: Annotated[Optional[int], typer.Option("--length", "-n", help="Characters to generate per sample (default: the run's sample.length, 1000 unless set).", rich_help_panel=SAMPLING)] = None,
    prime: Annotated[Optional[str], typer.Option("--prime", help="Text to start from (printed first).", rich_help_panel=SAMPLING)] = None,
    prime_file: Annotated[Optional[Path], typer.Option("--prime-file", help="Read the priming text from a file.", rich_help_panel=SAMPLING)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed; the same seed gives the same text (default: random, shown on stderr).", rich_help_panel=SAMPLING)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample only among the k most likely characters (0 = off; default: the run's sample.top_k).", rich_help_panel=SAMPLING)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Sample only from the smallest set holding this probability (1 = off; default: the run's sample.top_p).", rich_help_panel=SAMPLING)] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="Independent samples, generated as one batch.", rich_help_panel=SAMPLING)] = 1,
    stop: Annotated[Optional[str], typer.Option("--stop", help="End a sample once it contains this text (e.g. a blank line).", rich_help_panel=SAMPLING)] = None,
    skip_unknown: Annotated[bool, typer.Option("--skip-unknown", help="Drop prime characters outside the model's vocabulary instead of failing.", rich_help_panel=SAMPLING)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per sample on stdout instead of plain text.", rich_help_panel=OUTPUT)] = False,
    threads: ThreadsOption = None,
    platform: PlatformOption = None,
) -> None:
    """Generate text from a trained model, streamed to stdout as it is written."""
    prime_text = _text_option(prime, prime_file, "prime")
    _setup(platform, threads, cpu_device_per_core=True)  # many samples of a small model split over the cores
    from charrnn import loading
    from charrnn import sample as sampling
    from charrnn.config import check_sampling, check_seed

    trained = loading.load(checkpoint)
    defaults = trained.config.sample
    temperature = defaults.temperature if temperature is None else temperature
    length = defaults.length if length is None else length
    top_k = defaults.top_k if top_k is None else top_k
    top_p = defaults.top_p if top_p is None else top_p
    check_sampling(temperature, top_k, top_p, length)
    vocab = trained.vocab
    if prime_text:
        prime_ids, prime_text = _encode_checked(vocab, prime_text, "--prime", skip_unknown)
        if not prime_text:
            raise UsageError("--prime has no character of the model's vocabulary left")
    else:
        prime_text = ""
        prime_ids = vocab.encode("\n" if "\n" in vocab.index else vocab.chars[0])
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") >> 1
        err_console.print(f"seed {seed}", style="dim")
    check_seed(seed, "--seed")
    blocks = sampling.generate(trained.params, trained.config.model, prime_ids, length, num_samples, seed,
                               temperature, top_k, top_p)
    _write_samples(blocks, vocab, prime_text, num_samples, stop, json_output, seed)


def _write_samples(blocks, vocab, prime_text: str, num_samples: int, stop: str | None, json_output: bool,
                   seed: int) -> None:
    """Stream one sample as it is generated, or print N samples (plain or JSON lines) at the end."""
    texts = [prime_text] * num_samples
    stream = num_samples == 1 and not json_output
    if stream:
        sys.stdout.write(prime_text)
    done = [False] * num_samples
    for ids in blocks:
        for index in range(num_samples):
            if done[index]:
                continue
            piece = vocab.decode(ids[:, index])
            searched_from = max(len(texts[index]) - len(stop) + 1, len(prime_text)) if stop else 0
            texts[index] += piece
            if stop and (found := texts[index].find(stop, searched_from)) >= 0:
                cut = found + len(stop)
                piece = piece[: len(piece) - (len(texts[index]) - cut)]
                texts[index] = texts[index][:cut]
                done[index] = True
            if stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        if all(done):
            break
    if stream:
        sys.stdout.write("\n")
    elif json_output:
        for index, text in enumerate(texts):
            print(json.dumps({"index": index, "seed": seed, "prime": prime_text, "text": text}, ensure_ascii=False))
    else:
        print("\n\n".join(texts))
    sys.stdout.flush()


@app.command("eval")
def evaluate(
    file: Annotated[Path, typer.Argument(help="UTF-8 text to score.")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Run directory or checkpoint file (default: newest run under ./runs).")] = None,
    streams: Annotated[int, typer.Option("--streams", min=1, help="Parallel streams, state carried along each (fewer = fewer cold starts, slower).")] = 16,
    skip_unknown: Annotated[bool, typer.Option("--skip-unknown", help="Drop characters outside the model's vocabulary instead of failing.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.", rich_help_panel=OUTPUT)] = False,
    threads: ThreadsOption = None,
    platform: PlatformOption = None,
) -> None:
    """Score FILE: average loss per character in nats and bits, and perplexity."""
    from charrnn.data import read_text

    text = read_text(file)
    _setup(platform, threads)
    from charrnn import loading, train as training
    from charrnn.rundir import strict_json
    from charrnn.units import bits

    trained = loading.load(checkpoint)
    ids, text = _encode_checked(trained.vocab, text, str(file), skip_unknown)
    nats = training.evaluate(trained.params, trained.config.model, ids, streams)
    result = {"file": str(file), "checkpoint": str(trained.path), "chars": int(len(ids) - 1),
              "nats_per_char": nats, "bits_per_char": bits(nats), "perplexity": math.exp(nats)}
    if json_output:
        print(strict_json(result))
    else:
        print(f"{file}: {nats:.4f} nats/char, {result['bits_per_char']:.4f} bits/char, "
              f"perplexity {result['perplexity']:.3f} over {result['chars']} characters")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every failure ends as one `charrnn: error:` line and a documented exit code."""
    with command_stdout():
        code = _run(argv)
    if code and _multi_process["on"]:
        # JAX's exit would wait at a shutdown barrier for processes that may be gone (minutes,
        # then a native abort): the error line is out, the checkpoint is on disk, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _run(argv: list[str] | None) -> int:
    try:
        result = app(args=argv, prog_name="charrnn", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        sys.stdout.flush()
    except ReaderGone:  # `charrnn ... | head` after head has all it wanted
        code = 0
    except typer.Abort:
        code = EXIT_SIGINT
    except typer.TyperException as error:  # bad options: Typer's usage errors
        code = _fail(error.format_message(), error.exit_code)
    except CharrnnError as error:
        code = _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        code = EXIT_SIGINT
    except Exception as error:  # a bug, not a user error: still one line unless --debug
        code = _fail(f"internal error: {type(error).__name__}: {error}", 1)
    return code


def _fail(message: str, code: int) -> int:
    if _debug["on"]:
        traceback.print_exc()
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"charrnn: error: {first_line}", file=sys.stderr)
    return code


# The other commands register themselves on `app`.
from charrnn import cli_inspect, cli_runs  # noqa: E402, F401
