"""charrnn against PyTorch's nn.LSTM / nn.GRU / nn.RNN on the same model, side by side in one run.

    pip install -e '.[bench]'            # torch==2.13.0, a CPU build
    python benchmarks/vs_pytorch.py                      # configs A, B, C; LSTM; CPU
    python benchmarks/vs_pytorch.py --configs B --cells gru,rnn
    python benchmarks/vs_pytorch.py --device cuda --configs B,C,D,E --embedding 64 --dtypes float32,bfloat16
    python benchmarks/vs_pytorch.py --device cuda --configs D,E --pallas   # also charrnn with model.kernel = pallas

Both sides train embedding -> stacked recurrent layers -> linear -> cross-entropy
with Adam and gradient clipping, the hidden state carried between steps and
detached at chunk edges. Each side runs in a fresh process of its own (two
frameworks in one process disturb each other's memory), one timed window of
about --seconds after a warm-up; the sides alternate --repeats times and the
table shows medians and the ratio charrnn / PyTorch.

PyTorch runs as installed; with --torch-huge-pages it also runs with the
glibc tunable that `charrnn train` sets for itself (charrnn/entry.py), and the
ratio is taken against the faster of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from charrnn import bench, config as config_lib, entry, model, runtime
from charrnn.cells import CELLS

VOCAB = bench.VOCAB_SIZE
CONFIGS = {  # name: (num_layers, hidden_size, batch_size, seq_len)
    "A": (2, 128, 50, 50),  # char-rnn's defaults
    "B": (2, 512, 64, 128),
    "C": (3, 512, 64, 256),
    "D": (2, 1024, 128, 128),
    "E": (3, 1024, 256, 256),
    "R": (2, 512, 32, 100),  # 32 streams of 100 (with --embedding 64)
    "S": (2, 512, 64, 50),  # configs/shakespeare.toml's shape (with --embedding 64)
}
TORCH_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class TorchCharModel(nn.Module):
    def __init__(self, cell: str, embedding: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embedding)
        self.rnn = TORCH_CELLS[cell](embedding, hidden, layers)
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, inputs, state):
        hidden, state = self.rnn(self.embed(inputs), state)
        return self.out(hidden), state


def detach(state):
    return tuple(part.detach() for part in state) if isinstance(state, tuple) else state.detach()


class TorchBench:
    def __init__(self, cell, layers, hidden, batch, seq_len, embedding, device, dtype):
        torch.manual_seed(0)
        self.model = TorchCharModel(cell, embedding, hidden, layers).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=2e-3)
        self.device, self.dtype = device, dtype
        zeros = torch.zeros(layers, batch, hidden, device=device)
        self.state = (zeros, zeros.clone()) if cell == "lstm" else zeros
        ids = torch.randint(0, VOCAB, (seq_len + 1, batch), device=device)
        self.inputs, self.targets = ids[:-1], ids[1:]
        self.chars = batch * seq_len

    def step(self):
        autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")
        with autocast:
            logits, state = self.model(self.inputs, self.state)
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), self.targets.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()
        self.state = detach(state)
        return loss

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def chars_per_second(self, seconds: float) -> float:
        """Timed as charrnn's side is (`bench.calls_per_second`), after one warm-up step."""
        self.step(), self.sync()
        return bench.calls_per_second(self.step, self.sync, seconds) * self.chars


@torch.no_grad()
def torch_sampling(model: TorchCharModel, batch: int, length: int, device: str) -> float:
    """The usual per-character loop: one forward call and one multinomial draw per step."""
    ids = torch.zeros(1, batch, dtype=torch.long, device=device)
    state = None
    began = time.perf_counter()
    for _ in range(length):
        logits, state = model(ids, state)
        ids = torch.multinomial(torch.softmax(logits[0] / 0.8, dim=-1), 1).T
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * length / (time.perf_counter() - began)


def charrnn_config(cell, layers, hidden, batch, seq_len, embedding, dtype, steps_per_call, unroll=1, kernel="xla"):
    return config_lib.apply_overrides(config_lib.Config(), {
        "model": {"cell": cell, "num_layers": layers, "hidden_size": hidden, "embedding_size": embedding,
                  "dtype": dtype, "scan_unroll": unroll, "dropout": 0.0, "kernel": kernel,
                  "norm": "none"},  # nn.LSTM's equations: no layer normalisation
        "train": {"batch_size": batch, "seq_len": seq_len, "lr": 2e-3, "clip_norm": 5.0,
                  "weight_decay": 0.0,  # as the PyTorch side's torch.optim.Adam
                  "steps_per_call": steps_per_call},
    })


def steps_per_call_for(batch: int, seq_len: int, hidden: int) -> int:
    """Several steps per compiled call where one step is too short to hide dispatch (config A)."""
    return 10 if batch * seq_len * hidden * hidden < 2e9 else 1


def row_settings(name: str, cell: str, dtype: str, args) -> dict:
    layers, hidden, batch, seq_len = CONFIGS[name]
    return {"config": name, "cell": cell, "dtype": dtype, "layers": layers, "hidden": hidden, "batch": batch,
            "seq_len": seq_len, "embedding": args.embedding or hidden,
            "steps_per_call": steps_per_call_for(batch, seq_len, hidden)}


def measure_side(side: str, row: dict, args) -> dict:
    """One side's training chars/s (one window after a warm-up), and sampling chars/s with --sample."""
    cell, dtype, layers, hidden = row["cell"], row["dtype"], row["layers"], row["hidden"]
    batch, seq_len, embedding = row["batch"], row["seq_len"], row["embedding"]
    out = {}
    if side.startswith("torch"):
        torch_side = TorchBench(cell, layers, hidden, batch, seq_len, embedding, args.device, dtype)
        out["train"] = torch_side.chars_per_second(args.seconds)
        for sample_batch in (1, 64) if args.sample else ():
            rates = []
            for onednn in ((True, False) if args.device == "cpu" else (True,)):
                with torch.backends.mkldnn.flags(enabled=onednn):
                    rates.append(torch_sampling(torch_side.model, sample_batch, args.sample_length, args.device))
            out[f"sample_b{sample_batch}"] = max(rates)  # the faster of oneDNN on and off
        return out
    runtime.configure(cpu_device_per_core=True)  # the compilation cache and CPU devices, as `charrnn train` has them
    kernel = "pallas" if side == "charrnn_pallas" else "xla"
    ours = bench.TrainingBench(charrnn_config(cell, layers, hidden, batch, seq_len, embedding, dtype,
                                              row["steps_per_call"], args.unroll, kernel))
    ours.compile()
    out["train"] = ours.chars_per_second(args.seconds)
    for sample_batch in (1, 64) if args.sample else ():  # the pallas side generates with charrnn/fused_sampling.py
        config = charrnn_config(cell, layers, hidden, 1, 1, embedding, dtype, 1, args.unroll, kernel)
        out[f"sample_b{sample_batch}"] = bench.measure_sampling(config, sample_batch, args.sample_length * 4, 3)
    return out


def side_environment(side: str) -> dict[str, str]:
    environ = {name: value for name, value in os.environ.items() if name != entry.TUNABLES_ENV}
    if side == "torch":
        return environ
    return entry.environment_with_huge_pages(environ, platform.libc_ver()[0]) or environ


def run_side(side: str, row: dict, argv: list[str]) -> dict:
    """`measure_side` in a fresh process."""
    command = [sys.executable, __file__, *argv, "--child", side, "--configs", row["config"], "--cells", row["cell"],
               "--dtypes", row["dtype"]]
    done = subprocess.run(command, capture_output=True, text=True, env=side_environment(side))
    if done.returncode != 0:
        raise SystemExit(f"{side} side failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_matmul_flops_per_char(side: str, row: dict) -> float:
    """Matmul work per training character of each side's model (forward, and twice that backward).

    PyTorch multiplies each character's embedding by the first layer's input
    weights; charrnn looks up a row of a [V, G*H] table instead.
    """
    config = charrnn_config(row["cell"], row["layers"], row["hidden"], row["batch"], row["seq_len"],
                            row["embedding"], row["dtype"], 1)
    if side.startswith("charrnn"):
        return bench.train_matmul_flops_per_char(config)
    first_input_flops = 2 * row["embedding"] * CELLS[row["cell"]].num_gates * row["hidden"]
    return 3 * (model.generation_matmul_flops_per_char(config.model, VOCAB) + first_input_flops)


def compare(row: dict, sides: list[str], args, argv: list[str]) -> dict:
    measured = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side in sides:
            measured[side].append(run_side(side, row, argv))
    row = dict(row)
    for key in ["train"] + (["sample_b1", "sample_b64"] if args.sample else []):
        measured_sides = [side for side in sides if key in measured[side][0]]
        for side in measured_sides:
            row[f"{side}_{key}"] = statistics.median(result[key] for result in measured[side])
        best_torch = max(row[f"{side}_{key}"] for side in measured_sides if side.startswith("torch"))
        for side in measured_sides:
            if side.startswith("charrnn"):
                row[f"ratio{side.removeprefix('charrnn')}_{key}"] = row[f"{side}_{key}"] / best_torch
    for side in sides:
        row[f"{side}_train_gflops"] = row[f"{side}_train"] * train_matmul_flops_per_char(side, row) / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="A,B,C")
    parser.add_argument("--cells", default="lstm")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--embedding", type=int, default=0, help="0 = equal to the hidden size")
    parser.add_argument("--unroll", type=int, default=1, help="charrnn's model.scan_unroll (GPUs like 8)")
    parser.add_argument("--repeats", type=int, default=5, help="alternations of the sides (fresh processes)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each timed window")
    parser.add_argument("--sample", action="store_true", help="also compare sampling at batch 1 and 64")
    parser.add_argument("--pallas", action="store_true", help="also time charrnn with model.kernel = pallas")
    parser.add_argument("--sample-length", type=int, default=200)
    parser.add_argument("--torch-huge-pages", action="store_true",
                        help="also time PyTorch with the huge-page tunable that `charrnn train` sets")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, argv = parser.parse_args(), sys.argv[1:]
    settings = [row_settings(name, cell, dtype, args) for name in args.configs.split(",")
                for cell in args.cells.split(",") for dtype in args.dtypes.split(",")]
    if args.child:
        print(json.dumps(measure_side(args.child, settings[0], args)))
        return
    sides = (["torch"] + (["torch_huge_pages"] if args.torch_huge_pages else []) + ["charrnn"]
             + (["charrnn_pallas"] if args.pallas else []))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          f"charrnn runs with {entry.TUNABLES_ENV}={entry.HUGE_PAGES}", file=sys.stderr)
    rows = []
    for setting in settings:
        rows.append(compare(setting, sides, args, argv))
        if not args.json:
            print(format_row(rows[-1], sides, args.sample), flush=True)
    if args.json:
        print(json.dumps({"machine": runtime.cpu_model(runtime.read_cpuinfo()), "torch": torch.__version__,
                          "rows": rows}, indent=1))


def format_row(row: dict, sides: list[str], sample: bool) -> str:
    line = (f"{row['config']} {row['cell']:4} {row['dtype']:8} {row['layers']}x{row['hidden']} b{row['batch']} "
            f"t{row['seq_len']} e{row['embedding']}: "
            + "  ".join(f"{side} {row[f'{side}_train']:,.0f}" for side in sides)
            + f" chars/s  ratio {row['ratio_train']:.2f}x"
            + (f", pallas {row['ratio_pallas_train']:.2f}x" if "ratio_pallas_train" in row else "")
            + "  (matmul GFLOP/s: "
            + " ".join(f"{side} {row[f'{side}_train_gflops']:,.0f}" for side in sides) + ")")
    for batch in (1, 64) if sample else ():
        line += f"  | sample b{batch}: " + " ".join(f"{side} {row[f'{side}_sample_b{batch}']:,.0f}"
                                                   for side in sides if f"{side}_sample_b{batch}" in row)
        line += f" ({row[f'ratio_sample_b{batch}']:.1f}x"
        line += f", pallas {row[f'ratio_pallas_sample_b{batch}']:.1f}x)" if f"ratio_pallas_sample_b{batch}" in row else ")"
    return line


if __name__ == "__main__":
    main()
