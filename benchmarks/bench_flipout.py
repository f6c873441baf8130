"""Flipout against WeightNoise at the same `std`: the gradient's variance over batch size, and the time of a training step.

Gradient variance: a two-layer tanh MLP (32 -> 64 -> 1, both Linears perturbed), one fixed batch, `--draws` draws of the
noise; the variance of the raw weights' gradient over the draws, summed over the weights. Two kinds of input: uniform in
[0, 1) (pixel-like, every feature positive) and standard normal (zero-mean). Flipout's paper (Wen et al. 2018) reports
the variance reduced roughly in proportion to the batch size for fully-connected layers; the `ratio` column is
WeightNoise's variance over Flipout's, 1 at batch size 1 up to the draws' noise (each variance is estimated from
`--draws` draws, about ±sqrt(2/draws) relative).

Step time: forward + backward + SGD step, plain layers against the same layers in `WeightNoise` and in `Flipout`, one
process, 1 thread, the contenders interleaved rep by rep; medians, and ratios paired per rep. Missing an expectation is
reported, never an error: this is a measurement, not a test.

    PYTHONPATH=. python benchmarks/bench_flipout.py [--draws 400] [--reps 60] [--std 0.5]
"""
import argparse, statistics, time
import torch
import torch.nn.functional as F
from torch import nn
from weightdrop.noise import WeightNoise
from weightdrop.flipout import Flipout

SIZES = (1, 4, 16, 64, 256)

def grad_variance(wrap, bs, inputs, std, draws, seed=0):
    "Summed variance over `draws` noise draws of the raw weights' gradient, on one fixed batch of `bs`."
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.rand(bs, 32) if inputs == 'uniform' else torch.randn(bs, 32)
    y = torch.randn(bs, 1)
    g = torch.Generator().manual_seed(seed)
    model[0], model[2] = wrap(model[0], std, generator=g), wrap(model[2], std, generator=g)
    grads = []
    for _ in range(draws):
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        grads.append(torch.cat([model[0].weight_raw.grad.flatten(), model[2].weight_raw.grad.flatten()]))
    return torch.stack(grads).var(0).sum().item()

def mlp(): return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
def cnn(): return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
MODELS = {'MLP 3 x Linear(512), batch 128': (mlp, (128, 512)), 'CNN 2 x Conv2d(3x3, 32 ch), 16x32x32, batch 32': (cnn, (32, 16, 32, 32))}

def wrap_all(model, cls, std):
    for i, m in enumerate(model):
        if isinstance(m, (nn.Linear, nn.Conv2d)): model[i] = cls(m, std)
    return model

def step_times(make, shape, std, reps, warmup=5):
    torch.manual_seed(0)
    base = make()
    models = {'plain': base}
    for cls in (WeightNoise, Flipout):
        m = make(); m.load_state_dict(base.state_dict()); models[cls.__name__] = wrap_all(m, cls, std)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    times = {k: [] for k in models}
    for r in range(warmup + reps):
        for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
            t0 = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(models[k](x), y).backward()
            opts[k].step()
            if r >= warmup: times[k].append(time.perf_counter() - t0)
    return times

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--draws', type=int, default=400, help='noise draws per gradient-variance estimate')
    ap.add_argument('--reps', type=int, default=60, help='timed steps per contender')
    ap.add_argument('--std', type=float, default=0.5, help='standard deviation of the weight noise (variance part)')
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} thread, CPU\n')
    print(f'Gradient variance, MLP 32 -> 64 -> 1 (tanh), std={args.std}, {args.draws} draws per cell\n')
    print('| inputs | batch | WeightNoise | Flipout | WeightNoise / Flipout |')
    print('|---|---:|---:|---:|---:|')
    for inputs in ('uniform', 'normal'):
        for bs in SIZES:
            wn, fl = (grad_variance(c, bs, inputs, args.std, args.draws) for c in (WeightNoise, Flipout))
            label = {'uniform': 'uniform [0, 1)', 'normal': 'standard normal'}[inputs]
            print(f'| {label} | {bs} | {wn:.4g} | {fl:.4g} | {wn / fl:.1f}x |')
    print(f'\nStep time (forward + backward + SGD), std=0.05, median of {args.reps} interleaved reps\n')
    print('| model | plain ms | WeightNoise ms (vs plain) | Flipout ms (vs plain) | Flipout vs WeightNoise |')
    print('|---|---:|---:|---:|---:|')
    for name, (make, shape) in MODELS.items():
        t = step_times(make, shape, 0.05, args.reps)
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(t[a], t[b]))
        print(f"| {name} | {med['plain']:.2f} | {med['WeightNoise']:.2f} ({ratio('WeightNoise', 'plain'):.2f}x) "
              f"| {med['Flipout']:.2f} ({ratio('Flipout', 'plain'):.2f}x) | {ratio('Flipout', 'WeightNoise'):.2f}x |")

if __name__ == '__main__': main()
