"""Forward+backward time of one LSTM batch: plain `nn.LSTM`, fastai's `WeightDropout`, weightdrop's `WeightDropout`.

A fourth contender shows the floor: a plain `nn.LSTM` that also draws one `torch.rand` per hidden-to-hidden weight
element at each call and throws it away. Any implementation that draws a fresh mask with PyTorch's CPU generator pays
at least that; the `vs floor` column is how far above it the wrappers are.

All four run in one process, interleaved rep by rep (so machine noise hits them alike), on 1 thread; we report medians
and ratios to plain. The small size costs well under a millisecond, so its ratio moves by a few percent from one
measurement to the next with the load on a shared machine: it is measured `--repeat` times (fresh models each time),
and the table gives the median ratio with the lowest and highest. Targets: <= 1.03x plain at (bs 64, seq 70, 400->1152), <= 1.20x at (bs 8, seq 20, 64->64).
Missing a target is reported, never an error: this is a measurement, not a test.

    PYTHONPATH=. python benchmarks/bench_weightdrop.py [--reps-large 40] [--reps-small 600] [--p 0.5] [--only small|large] [--repeat 7]
"""
import argparse, statistics, time, warnings
import torch
from torch import nn
from fastai.text.models.awdlstm import WeightDropout as FastaiWeightDropout
from weightdrop.dropout import WeightDropout

SIZES = [dict(bs=64, seq=70, n_in=400, n_hid=1152, target=1.03, reps=40), dict(bs=8, seq=20, n_in=64, n_hid=64, target=1.20, reps=600)]

def step(model, x):
    "One forward+backward, timed."
    t0 = time.perf_counter()
    out = model(x)[0]
    out.sum().backward()
    return time.perf_counter() - t0

class DrawOnlyLSTM(nn.LSTM):
    "A plain LSTM that draws, and discards, one uniform per element of its hidden-to-hidden weight at each call."
    def forward(self, *args):
        torch.rand(self.weight_hh_l0.shape)
        return super().forward(*args)

def bench(bs, seq, n_in, n_hid, reps, p, warmup=3):
    torch.manual_seed(0)
    lstm = lambda: nn.LSTM(n_in, n_hid, batch_first=True)
    models = {'plain nn.LSTM': lstm(),
              'floor': DrawOnlyLSTM(n_in, n_hid, batch_first=True),
              'fastai WeightDropout': FastaiWeightDropout(lstm(), p),
              'weightdrop WeightDropout': WeightDropout(lstm(), p)}
    for m in models.values(): m.train()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # fastai's wrapper warns about non-contiguous weights on some builds
        return interleaved_medians(models, torch.randn(bs, seq, n_in), reps, warmup)

def interleaved_medians(models:dict, x, reps:int, warmup:int=3) -> dict:
    "Median seconds of a forward+backward of each model on `x`, interleaved rep by rep, in alternating order."
    times = {k: [] for k in models}
    for r in range(warmup + reps):
        order = list(models) if r % 2 == 0 else list(models)[::-1]  # alternate the order too
        for k in order:
            models[k].zero_grad(set_to_none=True)
            t = step(models[k], x)
            if r >= warmup: times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--reps-large', type=int, default=SIZES[0]['reps'], help='reps at (64, 70, 400->1152), ~1 s each')
    ap.add_argument('--reps-small', type=int, default=SIZES[1]['reps'], help='reps at (8, 20, 64->64), ~0.5 ms each')
    ap.add_argument('--p', type=float, default=0.5, help='weight dropout probability')
    ap.add_argument('--only', choices=('large', 'small'), help='run one size only')
    ap.add_argument('--repeat', type=int, default=7, help='measurements of the small size (the large one is measured once)')
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} thread, CPU, weight_p={args.p}, '
          f'median of {args.reps_large} (large) / {args.reps_small} (small) interleaved reps, forward+backward of one batch\n')
    print('| size (bs, seq, in->hid) | plain nn.LSTM ms | floor ms (ratio) | fastai ms (ratio) | weightdrop ms (ratio) '
          '| weightdrop vs floor | target |')
    print('|---|---|---|---|---|---|---|')
    for s in SIZES:
        small = s['bs'] != 64
        if args.only and (args.only == 'small') != small: continue
        reps, repeat = (args.reps_small, args.repeat) if small else (args.reps_large, 1)
        runs = [bench(s['bs'], s['seq'], s['n_in'], s['n_hid'], reps, args.p) for _ in range(repeat)]
        ratios = {k: sorted(r[k] / r['plain nn.LSTM'] for r in runs) for k in ('floor', 'fastai WeightDropout', 'weightdrop WeightDropout')}
        vs_floor = statistics.median(r['weightdrop WeightDropout'] / r['floor'] for r in runs)
        ms = {k: statistics.median(r[k] for r in runs) * 1e3 for k in runs[0]}
        def cell(k):
            rs = ratios[k]
            spread = f', {rs[0]:.3f}-{rs[-1]:.3f}' if len(rs) > 1 else ''
            return f"{ms[k]:.2f} ({statistics.median(rs):.3f}x{spread})"
        ours = statistics.median(ratios['weightdrop WeightDropout'])
        ok = 'met' if ours <= s['target'] else 'missed'
        print(f"| {s['bs']}, {s['seq']}, {s['n_in']}->{s['n_hid']} | {ms['plain nn.LSTM']:.2f} | {cell('floor')} "
              f"| {cell('fastai WeightDropout')} | {cell('weightdrop WeightDropout')} | {vs_floor:.3f}x "
              f"| <= {s['target']:.2f}x ({ok}) |")
    if args.repeat > 1 and args.only != 'large':
        print(f'\nsmall size: median ratio of {args.repeat} measurements, then the lowest-highest')

if __name__ == '__main__': main()
