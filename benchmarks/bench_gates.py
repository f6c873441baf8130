"""Benchmark: SGD step time of a two-branch supernet, three ways, plus a 4-branch gate as k goes 1..4.

Seed network: two conv branches on 3x32x32 input, concatenated, then three linear layers, batch 256.
  1. mask:      compute both branches, multiply each by a 0/1 gate (the usual hand-written supernet)
  2. hand skip: compute the chosen branch only, hand-made zeros for the other
  3. RandomGate(b1, b2, combine='cat')
One thread; the approaches are interleaved rep by rep so machine noise hits them alike; medians of wall time and of
CPU process time. Run: PYTHONPATH=. python benchmarks/bench_gates.py [--reps 30]
"""
import argparse, random, statistics, time
import torch
from torch import nn
import torch.nn.functional as F
from weightdrop.gates import RandomGate

BS, WIDTH = 256, 16
OUT = WIDTH * 8 * 8   # one branch's flattened output

def branch():
    return nn.Sequential(nn.Conv2d(3, WIDTH, 3, padding=1), nn.ReLU(), nn.Conv2d(WIDTH, WIDTH, 3, padding=1, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(8), nn.Flatten())

def head(n): return nn.Sequential(nn.Linear(n * OUT, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

class Masked(nn.Module):
    "Both branches run; the off one is multiplied by 0."
    def __init__(self): super().__init__(); self.b, self.head = nn.ModuleList([branch(), branch()]), head(2)
    def forward(self, x, on):
        gate = [1.0 if i == on else 0.0 for i in range(2)]
        return self.head(torch.cat([b(x) * g for b, g in zip(self.b, gate)], 1))

class HandSkip(nn.Module):
    "Only the chosen branch runs; zeros of the known shape for the other."
    def __init__(self): super().__init__(); self.b, self.head = nn.ModuleList([branch(), branch()]), head(2)
    def forward(self, x, on):
        y = self.b[on](x)
        z = torch.zeros(x.shape[0], OUT, dtype=y.dtype, device=y.device)
        return self.head(torch.cat([y, z] if on == 0 else [z, y], 1))

class Gated(nn.Module):
    def __init__(self, n=2, k=1):
        super().__init__(); self.gate, self.head = RandomGate(*[branch() for _ in range(n)], k=k, combine='cat'), head(n)
    def forward(self, x, on=None): return self.head(self.gate(x))

def make_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    def step(x, y, on):
        loss = F.cross_entropy(model(x, on), y)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return step

def bench(cases, reps, warmup=3, seed=0):
    "Median wall and CPU-process seconds per step of each case, interleaved rep by rep."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(BS, 3, 32, 32, generator=g), torch.randint(0, 10, (BS,), generator=g)
    rng = random.Random(seed)
    wall, cpu = {n: [] for n in cases}, {n: [] for n in cases}
    for r in range(warmup + reps):
        on = rng.randrange(2)
        for name, step in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step(x, y, on)
            if r >= warmup: wall[name].append(time.perf_counter() - t0); cpu[name].append(time.process_time() - c0)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in cases}

def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--reps', type=int, default=30); a = ap.parse_args()
    torch.set_num_threads(1); torch.manual_seed(0)
    res = bench({'mask (compute both, multiply by 0/1)': make_step(Masked()),
                 'hand skip (chosen branch + zeros)': make_step(HandSkip()),
                 'RandomGate(k=1)': make_step(Gated())}, a.reps)
    (mw, mc), (hw, hc) = res['mask (compute both, multiply by 0/1)'], res['hand skip (chosen branch + zeros)']
    print(f"SGD step, batch {BS}, 3x32x32, torch.set_num_threads(1), median of {a.reps} interleaved reps after warmup\n")
    print('| approach | ms/step (wall) | ms/step (CPU) | vs hand skip (CPU) | vs mask (CPU) |')
    print('|---|---:|---:|---:|---:|')
    for n, (w, c) in res.items(): print(f'| {n} | {w * 1e3:.1f} | {c * 1e3:.1f} | {c / hc:.2f}x | {c / mc:.2f}x |')
    print('\nTargets: RandomGate <= 1.05x hand skip and <= 0.55x mask.\n')
    res4 = bench({k: make_step(Gated(4, k)) for k in range(1, 5)}, max(a.reps // 2, 5))
    c1 = res4[1][1]
    print('| 4-branch RandomGate | ms/step (wall) | ms/step (CPU) | vs k=1 (CPU) |')
    print('|---|---:|---:|---:|')
    for k, (w, c) in res4.items(): print(f'| k={k} | {w * 1e3:.1f} | {c * 1e3:.1f} | {c / c1:.2f}x |')

if __name__ == '__main__': main()
