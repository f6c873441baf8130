"""Benchmark: weight mutation of ~50M parameters (12 x Linear(2048, 2048)) at p = 0.3 and p = 0.01.

Compares, in one run:
1. the dense formula of the usual answer: `param.data += strength * torch.randn_like(param) * (torch.rand(param.size()) < p).int()`;
2. `weightdrop.mutate.mutate_`;
3. a streaming floor: one in-place `add_` of a scalar over every parameter (`torch._foreach_add_`), the least any
   in-place update that reads and writes each weight can cost.

Prints a markdown table of median times (interleaved rounds, after warmup) and paired ratios. On a shared machine
prefer --threads 1: with more threads than free cores, every op waits for its slowest thread.
Run: PYTHONPATH=. python benchmarks/bench_mutate.py [--reps 7] [--threads N]
"""
import argparse, statistics, time
import torch
from torch import nn
from weightdrop.mutate import mutate_

def dense_formula(params, p, strength):
    for param in params: param.data += strength * torch.randn_like(param) * (torch.rand(param.size()) < p).int()

def floor(params, p, strength):
    with torch.no_grad(): torch._foreach_add_(params, 1e-8)

def bench(fns, reps, warmup=2):
    "Time the functions in turn, `reps` rounds, so each round sees the same machine load; medians and paired ratios."
    for _ in range(warmup):
        for f in fns: f()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter(); f(); ts[i].append(time.perf_counter() - t0)
    med = [statistics.median(t) * 1e3 for t in ts]
    ratio = lambda i, j: statistics.median(a / b for a, b in zip(ts[i], ts[j]))
    return med, ratio

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--reps', type=int, default=7)
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--layers', type=int, default=12)
    ap.add_argument('--width', type=int, default=2048)
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(a.width, a.width) for _ in range(a.layers)])
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(0)
    print(f"{n/1e6:.1f}M parameters ({a.layers} x Linear({a.width}, {a.width})), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU, median of {a.reps} interleaved rounds after 2 warmup rounds\n")
    print("| p | dense formula (ms) | mutate_ (ms) | floor: one add_ (ms) | dense / mutate_ | mutate_ / floor |")
    print("|---|---|---|---|---|---|")
    for p in (0.3, 0.01):
        (td, tm, tf), ratio = bench([lambda: dense_formula(params, p, 0.01), lambda: mutate_(model, p, 0.01, generator=g),
                                     lambda: floor(params, p, 0.01)], a.reps)
        print(f"| {p} | {td:.1f} | {tm:.1f} | {tf:.1f} | {ratio(0, 1):.1f}x | {ratio(1, 2):.1f}x |")
    print("\nRatios are medians of per-round ratios (each round runs the three in turn, under the same load).")

if __name__ == '__main__': main()
