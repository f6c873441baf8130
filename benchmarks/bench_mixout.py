"""Forward+backward time of one LSTM batch: plain `nn.LSTM`, weightdrop's `WeightDropout` and `Mixout` at the same `p`.

Mixout computes `torch.lerp(target, raw, mask)` where weight dropout computes `raw * mask`: the same mask, one kernel
each, but lerp reads one more tensor (the target). The contenders run in one process, interleaved rep by rep and in
alternating order, on 1 thread; the table gives median times and ratios, over `--repeat` measurements with fresh
models (median ratio, lowest-highest). This is a measurement, not a test.

    PYTHONPATH=. python benchmarks/bench_mixout.py [--reps-large 20] [--reps-small 300] [--p 0.5] [--repeat 5]
"""
import argparse, statistics
import torch
from torch import nn
from weightdrop.dropout import WeightDropout
from weightdrop.mixout import Mixout
from bench_weightdrop import interleaved_medians   # the same timing as the weight-dropout table

SIZES = [dict(bs=64, seq=70, n_in=400, n_hid=1152), dict(bs=8, seq=20, n_in=64, n_hid=64)]

def bench(bs, seq, n_in, n_hid, reps, p, warmup=3):
    torch.manual_seed(0)
    lstm = lambda: nn.LSTM(n_in, n_hid, batch_first=True)
    models = {'plain nn.LSTM': lstm(), 'WeightDropout': WeightDropout(lstm(), p), 'Mixout': Mixout(lstm(), p)}
    with torch.no_grad():   # weights away from the target, as after some fine-tuning
        models['Mixout'].weight_hh_l0_raw.add_(0.01)
    return interleaved_medians(models, torch.randn(bs, seq, n_in), reps, warmup)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--reps-large', type=int, default=20, help='reps at (64, 70, 400->1152)')
    ap.add_argument('--reps-small', type=int, default=300, help='reps at (8, 20, 64->64)')
    ap.add_argument('--p', type=float, default=0.5, help='drop / mix probability')
    ap.add_argument('--repeat', type=int, default=5, help='measurements per size, each with fresh models')
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f'p = {args.p}, 1 thread, torch {torch.__version__}')
    print('| batch, seq, in->hidden | plain ms | WeightDropout ms | Mixout ms | WeightDropout / plain | Mixout / plain | Mixout / WeightDropout |')
    print('|---|---|---|---|---|---|---|')
    for size, reps in zip(SIZES, (args.reps_large, args.reps_small)):
        runs = [bench(**size, reps=reps, p=args.p) for _ in range(args.repeat)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        def ratio(a, b):
            rs = sorted(r[a] / r[b] for r in runs)
            return f'{statistics.median(rs):.2f} ({rs[0]:.2f}-{rs[-1]:.2f})'
        print(f"| {size['bs']}, {size['seq']}, {size['n_in']}->{size['n_hid']} | {med['plain nn.LSTM'] * 1e3:.2f} | "
              f"{med['WeightDropout'] * 1e3:.2f} | {med['Mixout'] * 1e3:.2f} | {ratio('WeightDropout', 'plain nn.LSTM')} | "
              f"{ratio('Mixout', 'plain nn.LSTM')} | {ratio('Mixout', 'WeightDropout')} |", flush=True)

if __name__ == '__main__': main()
