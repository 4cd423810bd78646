"""Best text for the time spent: charrnn's recipe against PyTorch, the same minutes on the same machine.

    pip install -e '.[bench]'
    python benchmarks/quality.py --minutes 10                # charrnn, PyTorch on the recipe, PyTorch's own
    python benchmarks/quality.py --minutes 10 --threads 1    # one core: a stand-in for a slower machine
    python benchmarks/quality.py --minutes 10 --threads 1 --torch-eager   # PyTorch's arithmetic uncompiled
    python benchmarks/quality.py --sides charrnn --set model.weight_drop=0.2
    python benchmarks/quality.py --minutes 10 --members 2 --sides charrnn,torch-recipe   # two at once, together

Three sides, each in a fresh process of its own, one after another, `--repeats`
times (medians are reported):

- charrnn: `charrnn.train` on `--config` (configs/shakespeare.toml).
- torch-recipe: PyTorch running that config's recipe as charrnn does: `nn.LSTM`
  layers (LSTM configs only) with the same sizes, dropout on every layer's output
  (the top one's too; per character, or one mask per chunk with
  `model.locked_dropout`), embedding dropout and weight drop on W_h when the
  config asks, none of them before `train.dropout_from_epoch` epochs (late
  dropout), layer normalisation with `model.norm = "layer"` (a per-step
  loop of charrnn's equations, `nn.LSTM` has none, each step's arithmetic
  after its products compiled by `torch.compile`: faster than eager on two
  cores, its compilation counted against the budget; `--torch-eager` runs it eagerly), the same stream layout and
  epoch offsets (`charrnn.data`),
  clipping, Adam's betas, decoupled weight decay, `charrnn.steps.learning_rate`'s
  warm-up and schedule on the same clock, `train.ema`'s average evaluated,
  bfloat16 autocast where the recipe's matmuls are bfloat16, and
  `train.larger_model` chosen as `charrnn.sizing` chooses, by timing its own
  steps of the larger model (the timing counts against its budget), and
  `train.members` models, each from its own seed (weights, dropout, epoch offsets),
  taking their steps one after another in one process and scored together, as
  charrnn's members are. Initialisation is
  PyTorch's own, with the input weights rescaled to `model.input_init`'s range.
- torch-own: PyTorch's usual way with the same model size and budget: dropout
  only between layers (`nn.LSTM(dropout=...)`), Adam with its default betas,
  no averaging, everything else as the recipe (the size chosen by its own
  steps' time).

With `--members N`, each side trains N runs at once, one process on a core of
its own each (seeds from `train.seed` on, as many apart as the most members a run
of the config may train), and is scored by the
mean of their distributions at each character, state carried as above
(`charrnn eval -c A -c B`'s score for charrnn's runs); steps are the members'
mean, chars/s their sum.

The reference is the better PyTorch side. Every side counts the same things
against the budget: everything from its first step until the budget is spent,
including the validation passes every `train.eval_every` steps (of the split's
first `train.eval_fraction`; and charrnn's
compilation and checkpoint writes); the final validation pass comes after the
budget on every side. Validation is the config's split of
data/tinyshakespeare.txt, every character scored once, state carried along
`train.eval_batch_size` streams. Every process runs with glibc's huge-page
tunable, as `charrnn train` does. A side ends at the budget or, where the
config sets `train.max_epochs`, after that many passes over the training text
if sooner, its schedule at its end there (`charrnn.steps.last_step`). chars/s is
every side's steps times its characters per step (the text once, however many
`train.members` a run trains) over the time it trained
(charrnn's steady training rate, without compilation and evaluations, is
printed beside it).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from charrnn import runtime

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "tinyshakespeare.txt"
SIDES = ("charrnn", "torch-recipe", "torch-own")


def resolved_config(config_path: Path, sets: list[str], minutes: float):
    """The config a side trains: `--config` with `--set`s, its budget `--minutes` (the one its sizing fits into too)."""
    from charrnn import config as config_lib

    return config_lib.resolve(config_path, [*sets, f"train.max_minutes={minutes}"], {})


def train_charrnn(config, minutes: float, run_dir: Path | None = None) -> dict:
    import charrnn
    from charrnn import events

    trained_s = []  # when the final validation began: the budget's end, or sooner where train.max_epochs ended the run
    sizing = []  # the line saying which `train.larger_model` alternative the run timed and chose, and why

    def keep_time(event) -> None:
        if isinstance(event, events.Evaluated) and event.final:
            trained_s.append(event.elapsed_s)
        if isinstance(event, events.Message) and event.text.startswith("train.larger_model"):
            sizing.append(event.text)

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = run_dir or Path(scratch) / "run"  # a member's run is kept for scoring together
        summary = charrnn.train(CORPUS, run_dir, config, max_minutes=minutes, callbacks=[keep_time])
        chosen = json.loads((run_dir / "config.json").read_text())  # the model train.larger_model chose
    chars = summary.steps * config.train.batch_size * config.train.seq_len
    return {"best_val": summary.best_val_loss, "final_val": summary.final_val_loss, "steps": summary.steps,
            "chars_per_s": chars / trained_s[-1], "steady_chars_per_s": summary.train_chars_per_s,
            "layers": chosen["model"]["num_layers"], "models_per_run": chosen["train"]["members"],
            "sizing": " ".join(sizing)}


def train_torch_chosen(config, minutes: float, own: bool, scores_path: Path | None = None, eager: bool = False) -> dict:
    """A PyTorch side on the model `charrnn.sizing` chooses for it, by timing its own steps of `train.larger_model`."""
    from charrnn import data, sizing, training

    began = time.monotonic()
    corpus = training.load_corpus(CORPUS, config.train.val_fraction,
                                  calibration_fraction=config.train.calibration_fraction)
    steps_per_epoch = data.stream_layout(len(corpus.train_ids), config.train.batch_size,
                                         config.train.seq_len).chunks_per_epoch
    choice = sizing.choose(config, steps_per_epoch,
                           lambda larger: train_torch(larger, corpus, minutes, own, timing=True, eager=eager))
    return {**train_torch(choice.config, corpus, minutes, own, spent_s=time.monotonic() - began,
                          scores_path=scores_path, eager=eager),
            "layers": choice.config.model.num_layers, "models_per_run": choice.config.train.members,
            "sizing": choice.note}


@functools.cache
def normalized_lstm_arithmetic(compiled: bool):
    """charrnn.cells.layer_normalized's LSTM step after its products, in PyTorch: (z, c, the layer's gains and shifts)
    -> (h, c). Compiled, torch.compile fuses it, forward and backward, into a few kernels instead of a dozen eager
    operations a step; one per process, so that every model of a shape compiles once."""
    import torch
    from torch.nn import functional

    def arithmetic(z, c, norm_gain, norm_shift, cell_gain, cell_shift):
        hidden = c.shape[-1]
        z = functional.layer_norm(z.unflatten(-1, (4, hidden)), (hidden,)).flatten(-2)  # each gate's block alone
        i, f, g, o = (z * norm_gain + norm_shift).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(functional.layer_norm(c, (hidden,), cell_gain, cell_shift)), c

    return torch.compile(arithmetic, dynamic=False) if compiled else arithmetic


def train_torch(config, corpus, minutes: float, own: bool, spent_s: float = 0.0, timing: bool = False,
                scores_path: Path | None = None, eager: bool = False):
    """Train a side on `corpus` (split by the config) for the budget, `spent_s` of it already gone; return its result,
    or with `timing` only the seconds a steady step takes (`charrnn.sizing.seconds_per_step`, its window after two
    warm-up steps). With `scores_path`, the final model's log-probability of each validation target is saved there.
    Layer-normalised cells run their arithmetic compiled (`normalized_lstm_arithmetic`), or eagerly with `eager`."""
    import torch
    from torch import nn
    from torch.nn import functional

    from charrnn import calibration, data, dropout, members, model, sizing, steps

    model_config, train_config = config.model, config.train
    if model_config.cell != "lstm" or model_config.kind != "lm":
        raise SystemExit("the PyTorch sides run LSTM language models")
    vocab, hidden, layers = len(corpus.vocab), model_config.hidden_size, model_config.num_layers
    rate = model_config.dropout
    locked = model_config.locked_dropout and not own
    weight_drop = 0.0 if own else model_config.weight_drop
    embedding_drop = 0.0 if own else model_config.embedding_dropout
    ema = 0.0 if own else train_config.ema
    # The recipe's matmul dtype; PyTorch's mixed precision on a CPU is autocast to bfloat16.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.matmul_dtype(model_config) == "bfloat16")
    normalized = model_config.norm == "layer" and not own
    # One multi-layer nn.LSTM where its own between-layer dropout is the recipe's; single layers otherwise.
    fused = own or not (locked or weight_drop or normalized)
    # Only where used: torch.compile's first call imports its compiler, seconds off a side's budget.
    arithmetic = normalized_lstm_arithmetic(compiled=not eager) if normalized else None

    class LayerNormalizedLSTM(nn.Module):
        """One layer of charrnn.cells.layer_normalized's LSTM, step by step: [T, B, I] -> [T, B, H]."""

        def __init__(self, size):
            super().__init__()
            bound = hidden**-0.5
            self.input = nn.Linear(size, 4 * hidden)
            self.weight_hh_l0 = nn.Parameter(torch.empty(4 * hidden, hidden).uniform_(-bound, bound))  # as nn.LSTM's
            self.norm_gain, self.norm_shift = nn.Parameter(torch.ones(4 * hidden)), nn.Parameter(torch.zeros(4 * hidden))
            self.cell_gain, self.cell_shift = nn.Parameter(torch.ones(hidden)), nn.Parameter(torch.zeros(hidden))

        def forward(self, x, state):
            (h,), (c,) = state  # [1, B, H] each, as nn.LSTM's
            outputs = []
            for x_t in self.input(x):
                h, c = arithmetic(x_t + h @ self.weight_hh_l0.t(), c, self.norm_gain, self.norm_shift, self.cell_gain,
                                  self.cell_shift)
                outputs.append(h)
            return torch.stack(outputs), (h[None], c[None])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, model_config.embedding_size)
            sizes = [model_config.embedding_size] + [hidden] * (layers - 1)
            self.rnn = (nn.LSTM(model_config.embedding_size, hidden, layers, dropout=rate) if fused
                        else nn.ModuleList(LayerNormalizedLSTM(size) if normalized else nn.LSTM(size, hidden)
                                           for size in sizes))
            self.out = nn.Linear(hidden, vocab)

        def drop(self, x):  # [T, B, H]: per character, or one mask per stream for the chunk
            if not self.training or rate == 0:
                return x
            if not locked:
                return functional.dropout(x, rate)
            return x * torch.bernoulli(x.new_full(x.shape[1:], 1 - rate)) / (1 - rate)

        def forward(self, ids, state):
            table = self.embed.weight
            if self.training and embedding_drop:
                table = table * torch.bernoulli(table.new_full((vocab, 1), 1 - embedding_drop)) / (1 - embedding_drop)
            x = functional.embedding(ids, table)
            if fused:
                x, state = self.rnn(x, state)
                return self.out(x if own else self.drop(x)), state
            new_state = []
            for lstm, layer_state in zip(self.rnn, state):
                if self.training and weight_drop:
                    weights = dict(lstm.named_parameters())
                    weights["weight_hh_l0"] = functional.dropout(weights["weight_hh_l0"], weight_drop)
                    x, layer_state = torch.func.functional_call(lstm, weights, (x, layer_state))
                else:
                    x, layer_state = lstm(x, layer_state)
                new_state.append(layer_state)
                x = self.drop(x)
            return self.out(x), new_state

    def zero_state(batch):
        zeros = lambda count: torch.zeros(count, batch, hidden)  # noqa: E731
        if fused:
            return (zeros(layers), zeros(layers))
        return [(zeros(1), zeros(1)) for _ in range(layers)]

    def map_state(function, state):
        return (tuple(map(function, state)) if fused else [tuple(map(function, part)) for part in state])

    class Member:
        """One of `train.members` models, from its own seed: weights, dropout masks and epoch offsets."""

        def __init__(self, seed: int):
            self.seed = seed
            torch.manual_seed(seed)
            self.net = Net()
            if not own:  # W_x at the recipe's model.input_init: nn.LSTM draws U(±1/√H), nn.Linear U(±1/√fan_in)
                with torch.no_grad():
                    for name, weight in self.net.rnn.named_parameters():
                        if "weight_ih" in name and model_config.input_init == "fan_in":
                            weight.mul_(math.sqrt(hidden / weight.shape[1]))
                        elif name.endswith("input.weight") and model_config.input_init == "hidden":
                            weight.mul_(math.sqrt(weight.shape[1] / hidden))
            betas = (0.9, 0.999) if own else (train_config.beta1, train_config.beta2)
            self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=train_config.lr, betas=betas, eps=1e-8,
                                               weight_decay=train_config.weight_decay)
            self.average = copy.deepcopy(self.net) if ema else None
            self.scored = self.net if self.average is None else self.average
            self.state = zero_state(train_config.batch_size)
            self.random = torch.get_rng_state()  # its own dropout masks: the generator's state between its steps

    models = [Member(seed) for seed in members.seeds(train_config)]

    @torch.no_grad()
    def member_logits(member: Member, chunks: list):
        """One member's logits [T * B, V] of each chunk in turn, its state carried from chunk to chunk."""
        member.scored.eval()
        state = zero_state(chunks[0].inputs.shape[1])
        for chunk in chunks:
            with autocast:
                logits, state = member.scored(torch.from_numpy(chunk.inputs.astype(np.int64)), state)
            state = map_state(torch.Tensor.float, state)
            yield logits.float().reshape(-1, vocab)

    def temperatures() -> list[float]:
        """Each member's temperature on the text held out for it (`train.calibration_fraction`; 1 without)."""
        if corpus.calibration_ids is None:
            return [1.0] * len(models)
        chunks = data.evaluation_chunks(corpus.calibration_ids, train_config.eval_batch_size, steps.EVAL_SEQ_LEN)
        return [calibration.fit_on_chunks(chunks, (logits.numpy() for logits in member_logits(member, chunks)))
                for member in models]

    def validate(log_probs: list | None = None, fraction: float = 1.0) -> float:
        """The members' score together, each at its temperature: -log of the mean of their probabilities of each
        target (of the first `fraction` of the split)."""
        total, count = 0.0, 0.0
        chunks = data.evaluation_chunks(data.leading_part(corpus.val_ids, fraction), train_config.eval_batch_size,
                                        steps.EVAL_SEQ_LEN)
        member_chunks = zip(*(member_logits(member, chunks) for member in models))
        scales = temperatures()
        for chunk, logits in zip(chunks, member_chunks):
            member_log_probs = [functional.log_softmax(one / scale, dim=-1) for one, scale in zip(logits, scales)]
            together = torch.logsumexp(torch.stack(member_log_probs), dim=0) - math.log(len(models))
            losses = functional.nll_loss(together, torch.from_numpy(chunk.targets.astype(np.int64)).reshape(-1),
                                         reduction="none")
            mask = torch.from_numpy(chunk.mask.reshape(-1).astype(np.float32))
            total, count = total + float((losses * mask).sum()), count + float(mask.sum())
            if log_probs is not None:
                log_probs.append(-losses[mask.bool()].numpy())
        return total / count

    layout = data.stream_layout(len(corpus.train_ids), train_config.batch_size, train_config.seq_len)

    def train_step(member: Member, step: int, lr: float, dropping: bool) -> None:
        net = member.net
        torch.set_rng_state(member.random)
        net.train(dropping)  # eval mode drops nothing: the recipe's late dropout
        batch = data.training_batch(corpus.train_ids, layout, step, member.seed, train_config.random_offset)
        if np.any(batch.reset):
            member.state = zero_state(train_config.batch_size)
        for group in member.optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            logits, state = net(torch.from_numpy(batch.inputs.astype(np.int64)), member.state)
        logits, state = logits.float(), map_state(torch.Tensor.float, state)
        loss = functional.cross_entropy(logits.reshape(-1, vocab), torch.from_numpy(batch.targets.astype(np.int64)).reshape(-1))
        member.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_config.clip_norm > 0:
            nn.utils.clip_grad_norm_(net.parameters(), train_config.clip_norm)
        member.optimizer.step()
        member.state = map_state(torch.Tensor.detach, state)
        member.random = torch.get_rng_state()
        if member.average is not None:  # charrnn.averaging's formula
            done = step + 1
            decay = min(ema, (1 + done) / (10 + done))
            with torch.no_grad():
                for mean, param in zip(member.average.parameters(), net.parameters()):
                    mean.mul_(decay).add_(param, alpha=1 - decay)
    dropout_from_step = 0 if own else dropout.first_step(config, layout.chunks_per_epoch)
    last_step = steps.last_step(train_config, layout.chunks_per_epoch)
    budget, began, step, best = minutes * 60.0, time.monotonic() - spent_s, 0, math.inf
    timed_from = None  # with `timing`: when the timed window began, at step 2
    while (elapsed := time.monotonic() - began) < budget and step < last_step:
        if timing and step == 2:
            timed_from = time.monotonic()
        if timed_from is not None and (window := time.monotonic() - timed_from) >= sizing.PROBE_SECONDS:
            return window / (step - 2)
        lr = steps.learning_rate(train_config, step, max(step / last_step, elapsed / budget))
        for member in models:  # one after another, as charrnn's members take their steps
            train_step(member, step, lr, dropping=timing or step >= dropout_from_step)
        step += 1
        if step % train_config.eval_every == 0:
            during = validate(fraction=train_config.eval_fraction)
            if train_config.eval_fraction == 1.0:  # a part's loss is not the whole's
                best = min(best, during)
    if timing:  # the run ended inside the timed window (a tiny one): its mean step
        return (time.monotonic() - began) / max(step, 1)
    trained_s = min(time.monotonic() - began, budget)  # less than the budget where train.max_epochs ended the run
    log_probs = None if scores_path is None else []
    final = validate(log_probs)
    if scores_path is not None:
        np.save(scores_path, np.concatenate(log_probs))
    return {"best_val": min(best, final), "final_val": final, "steps": step,
            "chars_per_s": step * train_config.batch_size * train_config.seq_len / trained_s}


def run_side(args) -> None:
    """One side in this process: print its result as one JSON line."""
    allowed = sorted(os.sched_getaffinity(0))
    if args.member is not None:  # one core of its own
        os.sched_setaffinity(0, {allowed[args.member % len(allowed)]})
    elif args.threads:
        os.sched_setaffinity(0, set(allowed[:args.threads]))
    threads = 1 if args.member is not None else args.threads or None
    config = resolved_config(args.config, args.set, args.minutes)
    if args.side == "charrnn":
        import charrnn

        charrnn.configure(threads=threads, cpu_device_per_core=True)  # as `charrnn train` does
        result = train_charrnn(config, args.minutes, args.keep)
    else:
        import torch

        torch.set_num_threads(runtime.usable_cores())
        result = train_torch_chosen(config, args.minutes, own=args.side == "torch-own", scores_path=args.keep,
                                    eager=args.torch_eager)
    print(json.dumps({"side": args.side, **result}), flush=True)


def side_result(side: str, returncode: int, stdout: str, stderr: str) -> dict:
    """The result a side's process printed as its last line, or the end of its errors where it failed."""
    if returncode != 0:
        raise SystemExit(f"{side} failed:\n{stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_members(side: str, command: list[str], members: int, seeds: range, environ: dict, scratch: Path) -> dict:
    """`members` processes of one side at once, a core each, one seed of `seeds` each; scored together."""
    keeps = [scratch / f"{side}-{index}" for index in range(members)]
    if side != "charrnn":
        keeps = [keep.with_suffix(".npy") for keep in keeps]
    running = [subprocess.Popen([*command, "--member", str(index), "--keep", str(keep),
                                 f"--set=train.seed={seeds[index]}"],
                                env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index, keep in enumerate(keeps)]
    results = []
    for process in running:
        stdout, stderr = process.communicate()  # before its return code, which it sets
        results.append(side_result(side, process.returncode, stdout, stderr))
    if side == "charrnn":
        import charrnn
        from charrnn import training

        config = json.loads((keeps[0] / "config.json").read_text())
        corpus = training.load_corpus(CORPUS, config["train"]["val_fraction"])
        text = corpus.vocab.decode(corpus.val_ids)
        together = charrnn.load(*keeps).score(text, streams=config["train"]["eval_batch_size"]).nats_per_char
    else:  # -log of the mean of every model's probability of each target (a run's scores are its models' mean)
        weights = np.array([result["models_per_run"] for result in results], np.float64)[:, None]
        log_probs = np.stack([np.load(keep) for keep in keeps]) + np.log(weights)
        together = float(-np.mean(np.logaddexp.reduce(log_probs, axis=0) - math.log(weights.sum())))
    return {"side": side, "best_val": together, "final_val": together,
            "steps": statistics.mean(result["steps"] for result in results),
            "chars_per_s": sum(result["chars_per_s"] for result in results), "members": results}


def machine() -> dict:
    import jax
    import torch

    cpuinfo = runtime.read_cpuinfo()
    return {"cpu": runtime.cpu_model(cpuinfo), "cores": runtime.usable_cores(), "avx512": runtime.cpu_has_avx512(cpuinfo),
            "bfloat16_matmuls": runtime.cpu_multiplies_bfloat16(cpuinfo), "date": datetime.date.today().isoformat(),
            "jax": jax.__version__, "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "shakespeare.toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, every side")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="cores each side may use (0: all)")
    parser.add_argument("--members", type=int, default=1,
                        help="models each side trains at once, one core each, scored together (default 1)")
    parser.add_argument("--torch-eager", action="store_true",
                        help="run torch-recipe's layer-normalised cells eagerly (default: torch.compile'd, faster)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child process's one side
    parser.add_argument("--member", type=int, help=argparse.SUPPRESS)  # its index: the core it runs on
    parser.add_argument("--keep", type=Path, help=argparse.SUPPRESS)  # where a member keeps its run or scores
    args = parser.parse_args()
    if args.side:
        return run_side(args)

    sides = args.sides.split(",")
    for side in sides:
        if side not in SIDES:
            parser.error(f"unknown side {side!r}")
    if not 0 < args.minutes < math.inf:
        parser.error("--minutes must be a positive number")
    from charrnn.errors import UsageError

    try:  # a bad config fails here, in one line, before any side trains
        config = resolved_config(args.config, args.set, args.minutes)
    except UsageError as error:
        parser.error(str(error))
    from charrnn import config as config_lib

    # Each process's run may train several members from its seed on (train.members, or a larger model's).
    stride = max([config.train.members] + [larger.config.train.members for larger in config_lib.larger_models(config)])
    seeds = range(config.train.seed, config.train.seed + stride * args.members, stride)
    if not 1 <= args.members <= runtime.usable_cores():
        parser.error(f"--members must be between 1 and the {runtime.usable_cores()} cores this process may use")
    print(json.dumps({"machine": machine(), "minutes": args.minutes, "config": str(args.config), "set": args.set,
                      "threads": args.threads or "all", "members": args.members, "torch_eager": args.torch_eager}),
          flush=True)
    from charrnn import entry

    environ = entry.environment_with_huge_pages(dict(os.environ), platform.libc_ver()[0]) or dict(os.environ)
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side in sides:
            command = [sys.executable, __file__, "--side", side, "--minutes", str(args.minutes), "--config",
                       str(args.config), "--threads", str(args.threads), *(f"--set={item}" for item in args.set),
                       *(["--torch-eager"] if args.torch_eager else [])]
            if args.members > 1:
                with tempfile.TemporaryDirectory() as scratch:
                    result = run_members(side, command, args.members, seeds, environ, Path(scratch))
                print(json.dumps(result), flush=True)
                results[side].append(result)
                continue
            finished = subprocess.run(command, env=environ, capture_output=True, text=True, check=False)
            result = side_result(side, finished.returncode, finished.stdout, finished.stderr)
            print(json.dumps(result), flush=True)
            results[side].append(result)

    medians = {side: {key: statistics.median(run[key] for run in runs) for key in ("best_val", "final_val", "steps",
                                                                                   "chars_per_s")}
               for side, runs in results.items()}
    for side, median in medians.items():
        print(f"{side:13} best {median['best_val']:.4f}  final {median['final_val']:.4f} nats/char  "
              f"{median['steps']:,.0f} steps  {median['chars_per_s']:,.0f} chars/s")
    references = [side for side in medians if side.startswith("torch")]
    if "charrnn" in medians and references:
        reference = min(references, key=lambda side: medians[side]["best_val"])
        gap = medians[reference]["best_val"] - medians["charrnn"]["best_val"]
        print(f"charrnn is {gap:+.4f} nats/char better than {reference} (best validation); "
              f"speed {medians['charrnn']['chars_per_s'] / medians[reference]['chars_per_s']:.2f}x")


if __name__ == "__main__":
    main()
