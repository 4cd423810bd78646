"""charrnn against PyTorch's nn.LSTM / nn.GRU / nn.RNN on the same model, side by side in one run.

    pip install -e '.[bench]'            # torch==2.13.0, a CPU build
    python benchmarks/vs_pytorch.py                      # configs A, B, C; LSTM; CPU
    python benchmarks/vs_pytorch.py --configs B --cells gru,rnn
    python benchmarks/vs_pytorch.py --device cuda --configs B,C,D,E --embedding 64 --dtypes float32,bfloat16

Both sides train embedding -> stacked recurrent layers -> linear -> cross-entropy
with Adam and gradient clipping, the hidden state carried between steps and
detached at chunk edges. Each repeat times PyTorch then charrnn, alternately,
for about --seconds each; the table shows medians and the ratio charrnn/PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from charrnn import bench, config as config_lib, entry

VOCAB = bench.VOCAB_SIZE
CONFIGS = {  # name: (num_layers, hidden_size, batch_size, seq_len)
    "A": (2, 128, 50, 50),  # char-rnn's defaults
    "B": (2, 512, 64, 128),
    "C": (3, 512, 64, 256),
    "D": (2, 1024, 128, 128),
    "E": (3, 1024, 256, 256),
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
        self.step(), self.sync()
        began = time.perf_counter()
        self.step(), self.sync()
        steps = max(1, int(seconds / (time.perf_counter() - began)))
        began = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return steps * self.chars / (time.perf_counter() - began)


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


def charrnn_config(cell, layers, hidden, batch, seq_len, embedding, dtype, steps_per_call, unroll=1):
    return config_lib.apply_overrides(config_lib.Config(), {
        "model": {"cell": cell, "num_layers": layers, "hidden_size": hidden, "embedding_size": embedding,
                  "dtype": dtype, "scan_unroll": unroll, "dropout": 0.0},
        "train": {"batch_size": batch, "seq_len": seq_len, "lr": 2e-3, "clip_norm": 5.0,
                  "steps_per_call": steps_per_call},
    })


def steps_per_call_for(batch: int, seq_len: int, hidden: int) -> int:
    """Several steps per compiled call where one step is too short to hide dispatch (config A)."""
    return 10 if batch * seq_len * hidden * hidden < 2e9 else 1


def compare(name, cell, dtype, args) -> dict:
    layers, hidden, batch, seq_len = CONFIGS[name]
    embedding = args.embedding or hidden
    torch_side = TorchBench(cell, layers, hidden, batch, seq_len, embedding, args.device, dtype)
    steps_per_call = steps_per_call_for(batch, seq_len, hidden)
    ours = bench.TrainingBench(charrnn_config(cell, layers, hidden, batch, seq_len, embedding, dtype, steps_per_call,
                                              args.unroll))
    ours.compile()
    torch_rates, our_rates = [], []
    for _ in range(args.repeats):
        torch_rates.append(torch_side.chars_per_second(args.seconds))
        time.sleep(0.5)  # let PyTorch's OpenMP threads stop spinning before the other side is timed
        our_rates.append(ours.chars_per_second(args.seconds))
        time.sleep(0.5)
    row = {"config": name, "cell": cell, "dtype": dtype, "layers": layers, "hidden": hidden, "batch": batch,
           "seq_len": seq_len, "embedding": embedding, "steps_per_call": steps_per_call,
           "torch_chars_per_s": statistics.median(torch_rates), "charrnn_chars_per_s": statistics.median(our_rates)}
    row["ratio"] = row["charrnn_chars_per_s"] / row["torch_chars_per_s"]
    if args.sample:
        row.update(sampling_rows(torch_side.model, cell, layers, hidden, embedding, dtype, args))
    return row


def sampling_rows(torch_model, cell, layers, hidden, embedding, dtype, args) -> dict:
    config = charrnn_config(cell, layers, hidden, 1, 1, embedding, dtype, 1, args.unroll)
    out = {}
    for batch in (1, 64):
        torch_rates = []
        for onednn in ((True, False) if args.device == "cpu" else (True,)):
            with torch.backends.mkldnn.flags(enabled=onednn):
                torch_rates.append(torch_sampling(torch_model, batch, args.sample_length, args.device))
        out[f"torch_sample_b{batch}"] = max(torch_rates)  # the faster of oneDNN on and off
        out[f"charrnn_sample_b{batch}"] = bench.measure_sampling(config, batch, args.sample_length * 4, args.repeats)
        out[f"sample_ratio_b{batch}"] = out[f"charrnn_sample_b{batch}"] / out[f"torch_sample_b{batch}"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="A,B,C")
    parser.add_argument("--cells", default="lstm")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--embedding", type=int, default=0, help="0 = equal to the hidden size")
    parser.add_argument("--unroll", type=int, default=1, help="charrnn's model.scan_unroll (GPUs like 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sample", action="store_true", help="also compare sampling at batch 1 and 64")
    parser.add_argument("--sample-length", type=int, default=200)
    parser.add_argument("--huge-pages", action="store_true",
                        help="re-run with glibc's huge-page allocations, as `charrnn train` does, for both sides")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.huge_pages:
        entry.rerun_with_huge_pages()
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [compare(name, cell, dtype, args) for name in args.configs.split(",")
            for cell in args.cells.split(",") for dtype in args.dtypes.split(",")]
    if args.json:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "rows": rows}, indent=1))
        return
    tunables = os.environ.get(entry.TUNABLES_ENV, "")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{entry.TUNABLES_ENV}={tunables!r}", file=sys.stderr)
    for row in rows:
        line = (f"{row['config']} {row['cell']:4} {row['dtype']:8} {row['layers']}x{row['hidden']} b{row['batch']} "
                f"t{row['seq_len']} e{row['embedding']}: torch {row['torch_chars_per_s']:,.0f}  charrnn "
                f"{row['charrnn_chars_per_s']:,.0f} chars/s  ratio {row['ratio']:.2f}x")
        if args.sample:
            line += "".join(f"  | sample b{b}: torch {row[f'torch_sample_b{b}']:,.0f} charrnn "
                            f"{row[f'charrnn_sample_b{b}']:,.0f} ({row[f'sample_ratio_b{b}']:.1f}x)" for b in (1, 64))
        print(line, flush=True)


if __name__ == "__main__":
    main()
