"""What every command shares: the Typer app, the stderr console, common options and process set-up."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from charrnn import __version__
from charrnn.errors import CorpusError, UsageError

err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)  # "[" in a path is a path
app = typer.Typer(
    name="charrnn",
    help="Character-level RNN / GRU / LSTM text generator: train, sample, eval.",
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Set by the root options and by `train` joining a multi-process run; read by `cli.main` when it exits.
flags = {"debug": False, "multi_process": False}

MODEL, TRAINING, SAMPLING, RUN, OUTPUT, SCALE = "Model", "Training", "Sampling", "Run", "Output", "Scaling out"


class Platform(str, Enum):
    cpu = "cpu"
    gpu = "gpu"


ThreadsOption = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU cores this run uses: N that no other charrnn run of yours holds (the first N where too few are free), so runs started side by side share the machine; default: all.", rich_help_panel=RUN)]
PlatformOption = Annotated[Optional[Platform], typer.Option("--platform", help="Force a JAX platform (default: GPU when JAX sees one).", rich_help_panel=RUN)]
CHECKPOINT_HELP = "Run directory, checkpoint file, or a folder of runs (its newest); default: the newest run under ./runs."
CheckpointOption = Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help=CHECKPOINT_HELP)]
ENSEMBLE_HELP = CHECKPOINT_HELP + (" Repeat it for runs with the same symbols to predict together (an ensemble, from the"
                                    " mean of their distributions): encoder–decoders write and score together, language"
                                    " models sample and score together.")
RunPaths = Annotated[list[Path] | None, typer.Argument(exists=True, help="Run directories, or directories holding them (one level down); runs/ if none is named.", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.", rich_help_panel=OUTPUT)]


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
    flags["debug"] = debug
    if context.invoked_subcommand is None:
        print(context.get_help())


def setup(platform: Platform | None, threads: int | None, cpu_device_per_core: bool = False,
          compilation_cache: bool = True, multi_process: bool = False) -> None:
    """Configure JAX for this process before the first computation (`charrnn.configure`)."""
    from charrnn import runtime

    runtime.configure(platform.value if platform else None, threads, compilation_cache, cpu_device_per_core,
                      multi_process)


def scored_part(fraction: float) -> str:
    """How a validation loss says that it scored only the split's first part (`train.eval_fraction`): "" for all of it."""
    return "" if fraction == 1.0 else f" on the first {fraction:.0%} of validation"


def text_option(text: str | None, text_file: Path | None, option: str) -> str | None:
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
