"""Best text for the time spent: charrnn's recipe against PyTorch's, same wall-clock budget, same split.

    pip install -e '.[bench]'
    python benchmarks/quality.py --minutes 10            # charrnn configs/shakespeare.toml, then PyTorch
    python benchmarks/quality.py --minutes 10 --only charrnn

Both train on the first 90% of data/tinyshakespeare.txt and are scored on the
whole last 10% (111,540 characters) with the state carried along 16 streams, in
nats per character. The PyTorch side is the tuned plain recipe: 2x384 LSTM,
embedding 64, batch 32, seq 100, Adam(0.9, 0.99) 4e-3 with 50 warm-up steps and
cosine decay to 0 at the end of the budget, clip 1, a random offset and a reset
state each epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

import charrnn
from charrnn import data, training
from charrnn.units import bits

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "tinyshakespeare.txt"
EVAL_STREAMS = 16


def train_charrnn(minutes: float, config: Path) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        summary = charrnn.train(CORPUS, Path(scratch) / "run", config, max_minutes=minutes)
    return {"val_nats": summary.final_val_loss, "steps": summary.steps, "chars_per_s": summary.train_chars_per_s}


def train_torch(minutes: float, corpus: data.Corpus) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    vocab, hidden, batch, seq_len = len(corpus.vocab), 384, 32, 100

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.rnn, self.out = nn.Embedding(vocab, 64), nn.LSTM(64, hidden, 2), nn.Linear(hidden, vocab)

        def forward(self, ids, state):
            output, state = self.rnn(self.embed(ids), state)
            return self.out(output), state

    net = Model()
    optimizer = torch.optim.Adam(net.parameters(), lr=4e-3, betas=(0.9, 0.99))
    ids = torch.from_numpy(corpus.train_ids.astype(np.int64))
    layout = data.stream_layout(len(ids), batch, seq_len)
    budget, began, step = minutes * 60, time.monotonic(), 0
    state = None
    while (elapsed := time.monotonic() - began) < budget:
        chunk = step % layout.chunks_per_epoch
        if chunk == 0:
            state = None  # reset state, new random offset: as charrnn does
        batch_ids = data.training_batch(corpus.train_ids, layout, step, 0, True)
        inputs = torch.from_numpy(batch_ids.inputs.astype(np.int64))
        targets = torch.from_numpy(batch_ids.targets.astype(np.int64))
        warmup = min(1.0, (step + 1) / 50)
        for group in optimizer.param_groups:
            group["lr"] = 4e-3 * warmup * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))
        logits, state = net(inputs, state)
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        state = tuple(part.detach() for part in state)
        step += 1
    total, count = 0.0, 0.0
    with torch.no_grad():
        carry = None
        for chunk in data.evaluation_chunks(corpus.val_ids, EVAL_STREAMS, 256):
            logits, carry = net(torch.from_numpy(chunk.inputs.astype(np.int64)), carry)
            losses = nn.functional.cross_entropy(logits.reshape(-1, vocab),
                                                 torch.from_numpy(chunk.targets.astype(np.int64)).reshape(-1),
                                                 reduction="none")
            mask = torch.from_numpy(chunk.mask.reshape(-1).astype(np.float32))
            total, count = total + float((losses * mask).sum()), count + float(mask.sum())
    return {"val_nats": total / count, "steps": step, "chars_per_s": step * batch * seq_len / budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "shakespeare.toml")
    parser.add_argument("--only", choices=["charrnn", "torch"])
    args = parser.parse_args()
    results = {}
    if args.only != "torch":
        results["charrnn"] = train_charrnn(args.minutes, args.config)
        print(json.dumps({"charrnn": results["charrnn"]}), flush=True)
    if args.only != "charrnn":
        corpus = training.load_corpus(CORPUS, 0.1)
        results["torch"] = train_torch(args.minutes, corpus)
        print(json.dumps({"torch": results["torch"]}), flush=True)
    for name, result in results.items():
        print(f"{name:8} {result['val_nats']:.4f} nats/char ({bits(result['val_nats']):.4f} bits/char), "
              f"{result['steps']} steps, {result['chars_per_s']:,.0f} chars/s, {args.minutes:g} minutes")


if __name__ == "__main__":
    main()
