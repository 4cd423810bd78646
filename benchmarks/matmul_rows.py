"""GFLOP/s of one time step's matmul, [B, H] x [H, G*H], against the number of streams B.

    python benchmarks/matmul_rows.py                          # a 2x512 LSTM's [B, 512] x [512, 2048]
    python benchmarks/matmul_rows.py --rows 16,32,64 --threads 1
    python benchmarks/matmul_rows.py --rows 32,64 --dtype bfloat16 --inputs 384 --outputs 1536

A recurrent step multiplies B rows (one per stream) by the weights, and the next
step waits for the product, so the speed of that one product at B rows bounds a
training step. Two forms are timed (`bench.measure_matmul`): `x @ w`, as the
training loop multiplies, and `x · rows` with the weights held transposed
(`cells.TransposedWeight`), as generation multiplies. Each is also given as a
share of the device's matmul peak in that dtype (`bench.measure_matmul_peak`).
"""

from __future__ import annotations

import argparse

import charrnn
from charrnn import bench


def positive(text: str) -> int:
    """An integer of at least 1; argparse reports the ValueError otherwise as a one-line usage error."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def stream_counts(text: str) -> list[int]:
    """"8,16,32" -> [8, 16, 32], each `positive`."""
    return [positive(item) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=stream_counts, default="8,16,32,48,64,96,128",
                        help="comma-separated stream counts B, each at least 1")
    parser.add_argument("--inputs", type=positive, default=512, help="H")
    parser.add_argument("--outputs", type=positive, default=2048, help="G*H")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the products' inputs (their sums are float32 either way)")
    parser.add_argument("--threads", type=int, default=0, help="cores (0: all)")
    parser.add_argument("--repeats", type=positive, default=5, help="timed windows; the best counts")
    args = parser.parse_args()
    charrnn.configure(threads=args.threads or None)
    peak = bench.measure_matmul_peak(args.dtype, args.repeats)
    print(f"[B, {args.inputs}] x [{args.inputs}, {args.outputs}], {args.dtype}, {args.threads or 'all'} core(s): "
          f"GFLOP/s (share of the peak, {peak:.1f} GFLOP/s)")
    print("   B   x @ w          x · rows")
    for rows in args.rows:
        forms = [bench.measure_matmul(rows, args.inputs, args.outputs, args.dtype, args.repeats, transposed=transposed)
                 for transposed in (False, True)]
        print(f"{rows:4d}  " + "  ".join(f"{rate:6.1f} ({rate / peak:.2f})" for rate in forms), flush=True)


if __name__ == "__main__":
    main()
