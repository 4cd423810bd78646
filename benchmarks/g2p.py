"""Grapheme-to-phoneme conversion on CMUdict: train encoder–decoder variants, score them on the test words.

    pip install -e '.[g2p]'
    python examples/cmudict_pairs.py data/g2p
    python benchmarks/g2p.py data/g2p --minutes 30                         # the recipe, configs/g2p.toml
    python benchmarks/g2p.py data/g2p --minutes 5 --variants recipe,dot,none,unidirectional   # README's 5-minute table
    python benchmarks/g2p.py data/g2p --minutes 30 --ensemble 2           # two models, one core each, then together
    python benchmarks/g2p.py data/g2p --minutes 30 --ensemble 2 --both-ways   # the second writes right to left
    python benchmarks/g2p.py data/g2p --minutes 10 --config configs/g2p-gpu.toml   # the GPU recipe

Each variant trains on train.tsv for the same minutes of wall-clock time
(compilation and validation passes included), one after the other, then its final
checkpoint converts every test word greedily and with a beam of 5. With
`--ensemble N`, N models of a variant (seeds 0 to N-1, or from `--seed` on) train at once, each in a
process of its own pinned to one core, and are scored alone and together. Word error
rate: a word is wrong unless the output equals one of its listed
pronunciations; phoneme error rate: edit distance over phonemes to the closest
pronunciation, over that pronunciation's length. Prints a Markdown table and
one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import charrnn
from charrnn import runtime

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "g2p.toml"
VARIANTS = {
    "recipe": [],  # bidirectional encoder, additive attention, one phoneme per decoder step
    "chars": ["model.target=chars"],  # the decoder writes the phonemes' characters and spaces
    "dot": ["model.attention=dot"],
    "none": ["model.attention=none"],
    "unidirectional": ["model.bidirectional=false"],
    "feeding": ["model.input_feeding=true"],  # the decoder reads its last attentional output
    "norm": ["model.norm=layer"],  # layer normalisation inside every cell
}


def run_variant(name: str, recipe: Path, sets: list[str], data_dir: Path, out: Path, minutes: float) -> dict:
    run_dir = out / name.replace(", ", "-")
    summary = charrnn.train(data_dir / "train.tsv", run_dir, recipe, sets=sets, max_minutes=minutes)
    model = charrnn.load(run_dir)
    return {"variant": name, "minutes": minutes, "steps": summary.steps, "best_val_loss": summary.best_val_loss,
            "config": charrnn.config.to_dict(model.config)["model"], **scores(model, data_dir)}


def run_ensemble(name: str, recipe: Path, sets: list[str], data_dir: Path, out: Path, minutes: float,
                 count: int, first_seed: int = 0, both_ways: bool = False) -> list[dict]:
    """Train `count` models at once (seeds from `first_seed` on), one core and one thread each; score each alone,
    then all of them together. `both_ways`: every other model writes its targets last symbol first."""
    seeds = range(first_seed, first_seed + count)
    backwards = [both_ways and index % 2 == 1 for index in range(count)]
    run_dirs = [out / f"{name.replace(', ', '-')}-seed{seed}{'-reversed' if reverse else ''}"
                for seed, reverse in zip(seeds, backwards)]
    overrides = [[part for item in [*sets, f"train.max_minutes={minutes}", *(["model.reverse_target=true"] * reverse)]
                  for part in ("--set", item)] for reverse in backwards]
    cores = sorted(os.sched_getaffinity(0))
    processes = [subprocess.Popen([sys.executable, "-m", "charrnn", "train", str(data_dir / "train.tsv"), "--config",
                                   str(recipe), *overrides[index], "--threads", "1", "--seed", str(seed), "--out",
                                   str(run_dir), "--quiet"],
                                  stdout=subprocess.PIPE, preexec_fn=lambda core=cores[index]: os.sched_setaffinity(0, {core}))
                 for index, (seed, run_dir) in enumerate(zip(seeds, run_dirs))]
    outputs = [process.communicate()[0].decode() for process in processes]
    if any(process.returncode for process in processes):
        sys.exit(f"g2p: a training process failed: exit codes {[process.returncode for process in processes]}")
    summaries = [json.loads(output.splitlines()[-1]) for output in outputs]  # --quiet: the summary line
    results = [{"variant": f"{name}, seed {seed}{', reversed' if reverse else ''}", "minutes": minutes,
                "steps": summary["steps"], "best_val_loss": summary["best_val_loss"],
                **scores(charrnn.load(run_dir), data_dir)}
               for seed, reverse, summary, run_dir in zip(seeds, backwards, summaries, run_dirs)]
    together = charrnn.load(*run_dirs)
    return results + [{"variant": f"{name}, {count} together{', both ways' if both_ways else ''}", "minutes": minutes,
                       "steps": sum(result["steps"] for result in results),
                       "best_val_loss": None, **scores(together, data_dir)}]  # no validation pass of their own


def scores(model, data_dir: Path) -> dict:
    """Test-set figures of a trained model, converting greedily and with a beam of 5."""
    result = {}
    for beam in (1, 5):
        began = time.monotonic()
        score = model.score(data_dir / "test.tsv", beam=beam)
        result[f"beam{beam}"] = {"wer": 1.0 - score.exact_match, "per": score.token_error_rate,
                                 "nats_per_char": score.nats_per_char, "words": score.sources,
                                 "seconds": time.monotonic() - began}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="folder with train.tsv and test.tsv (examples/cmudict_pairs.py)")
    parser.add_argument("--config", type=Path, default=RECIPE, help="the recipe every variant starts from")
    parser.add_argument("--minutes", type=float, default=30.0, help="training minutes per variant")
    parser.add_argument("--variants", default="recipe", help=f"comma-separated, or all: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/g2p-bench"), help="folder for the runs")
    parser.add_argument("--ensemble", type=int, default=1, metavar="N",
                        help="train N models of each variant at once, one core each, and score them together")
    parser.add_argument("--seed", type=int, default=None,
                        help="the first model's seed (default: the recipe's; 0 with --ensemble), the others' after it")
    parser.add_argument("--both-ways", action="store_true",
                        help="with --ensemble, every other model writes targets last symbol first (model.reverse_target)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every variant, before the variant's own (repeatable)")
    args = parser.parse_args()
    names = list(VARIANTS) if args.variants == "all" else [name.strip() for name in args.variants.split(",")]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    cores = len(os.sched_getaffinity(0))
    if not 1 <= args.ensemble <= cores:
        parser.error(f"--ensemble must be between 1 and the {cores} cores this process may use")
    if args.both_ways and args.ensemble < 2:
        parser.error("--both-ways needs --ensemble 2 or more: it reverses every other model")
    cpu = runtime.cpu_model(runtime.read_cpuinfo())
    print(f"{date.today()}, {cpu}, {os.cpu_count()} cores, charrnn {charrnn.__version__}, {args.minutes:g} minutes per variant")
    print(f"recipe: {args.config}; overrides: {' '.join(args.set) or 'none'}")
    print("| variant | steps | best val nats/symbol | WER greedy | PER greedy | WER beam 5 | PER beam 5 |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for name in names:
        sets = args.set + VARIANTS[name]
        seeded = sets if args.seed is None else [*sets, f"train.seed={args.seed}"]
        rows = ([run_variant(name, args.config, seeded, args.data_dir, args.out, args.minutes)] if args.ensemble == 1
                else run_ensemble(name, args.config, sets, args.data_dir, args.out, args.minutes, args.ensemble,
                                  args.seed or 0, args.both_ways))
        results += rows
        for result in rows:
            greedy, beam = result["beam1"], result["beam5"]
            val = "–" if result["best_val_loss"] is None else f"{result['best_val_loss']:.4f}"
            print(f"| {result['variant']} | {result['steps']:,} | {val} | {greedy['wer']:.1%} | "
                  f"{greedy['per']:.2%} | {beam['wer']:.1%} | {beam['per']:.2%} |", flush=True)
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
