"""Benchmark: weight dropout with masks made again in backward (`recompute=True`) against stored masks and a plain stack.

The model is a stack of `--layers` x `nn.Linear(--width, --width)` (4 x 4096x4096 by default: 64 MiB of float32 per
weight, served by mmap). Three contenders: plain `nn.Linear` layers; `WeightDropout(p=0.5)` on every weight (stored
masks); the same with `recompute=True`.

1. Memory, each contender in a fresh process (glibc's mmap threshold pinned at 128 KiB, so RSS follows the live
   tensors): one warm-up step (so the `.grad` buffers exist), `reset()` of the wrappers, garbage collected and malloc
   trimmed, then `VmRSS` read and the high-water mark reset through /proc/self/clear_refs. Then a forward: the RSS
   it adds is what the graph holds. Then the backward: the peak (`VmHWM`) and what is still resident after it.
   Reported in weight sizes per layer.
2. Step time (forward + backward, 1 thread) on `--time-width` layers, the contenders interleaved in one process,
   medians of `--reps` rounds at several batch sizes, ratios paired by round. Per layer, recompute adds one mask draw
   and one product to the backward (timed alone too), and a step's matrix products grow with the batch, so the ratio
   depends on the batch and hardly on the width. With `hold_mask=True` (one mask per step, drawn by `resample()` as
   `ResampleCallback` does) recompute adds only the product.

Run: PYTHONPATH=. python benchmarks/bench_recompute.py [--layers 4] [--width 4096] [--time-width 2048] [--reps 7]
"""
import argparse, ctypes, gc, json, os, statistics, subprocess, sys, time
import torch
from torch import nn

KINDS = (('plain `nn.Linear`', 'plain'), ('`WeightDropout`, stored masks', 'stored'),
         ('`WeightDropout(recompute=True)`', 'recomputed'),
         ('`WeightDropout(hold_mask=True)`, one mask per step', 'stored_held'),
         ('`WeightDropout(hold_mask=True, recompute=True)`, one mask per step', 'recomputed_held'))

def make_model(kind, layers, width, seed=0):
    from weightdrop.dropout import WeightDropout
    torch.manual_seed(seed)
    lins = [nn.Linear(width, width) for _ in range(layers)]
    if kind != 'plain':
        lins = [WeightDropout(l, 0.5, recompute=kind.startswith('recomputed'), hold_mask=kind.endswith('held')) for l in lins]
    return nn.Sequential(*lins)

def batch(n, width): return torch.randn(n, width, generator=torch.Generator().manual_seed(1))

def train_step(model, x):
    "One step; a held mask is drawn again first, as `ResampleCallback` does before every batch."
    for m in model:
        if getattr(m, 'hold_mask', False): m.resample()
    model(x).pow(2).mean().backward()

def _status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key): return int(line.split()[1]) * 1024
    raise KeyError(key)

def mem_worker(kind, layers, width, bs):
    "RSS the graph holds after a forward, the step's peak, and what stays after the backward, above the model and its grads."
    torch.set_num_threads(1)
    model, x = make_model(kind, layers, width), batch(bs, width)
    train_step(model, x)                                   # allocates the .grad buffers, which every contender keeps
    for m in model:
        if hasattr(m, 'reset'): m.reset()                  # the module shows its raw weight again, no mask is held
    gc.collect(); ctypes.CDLL('libc.so.6').malloc_trim(0)
    base = _status('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f: f.write('5')   # reset VmHWM to the current resident size
    loss = model(x).pow(2).mean()
    after_forward = _status('VmRSS') - base
    loss.backward(); del loss
    gc.collect()
    print(json.dumps(dict(forward=after_forward, peak=_status('VmHWM') - base, after=_status('VmRSS') - base,
                          weight=width * width * 4)))

def memory_table(layers, width, bs):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MALLOC_MMAP_THRESHOLD_': '131072'}
    rows = []
    for label, kind in KINDS:
        r = subprocess.run([sys.executable, __file__, '--mem', kind, '--layers', str(layers), '--width', str(width),
                            '--mem-batch', str(bs)], env=env, check=True, capture_output=True, text=True)
        rows.append((label, json.loads(r.stdout.strip().splitlines()[-1])))
    w = rows[0][1]['weight']
    print(f"## Memory: {layers} x Linear({width}, {width}), batch {bs}, fresh process each; RSS above the model and "
          f"its grads, in weight sizes per layer (one weight: {w / 2**20:.0f} MiB)\n")
    print("| contender | held by the graph after forward | peak during the step | resident after the step |")
    print("|---|---:|---:|---:|")
    for label, d in rows:
        cells = [f"{d[k] / w / layers:.2f} ({d[k] / 2**20:.0f} MiB)" for k in ('forward', 'peak', 'after')]
        print(f"| {label} | " + " | ".join(cells) + " |")

def interleaved(fns, reps):
    "Seconds of each function in each round, the functions taking turns in every round (after one warm-up round)."
    for f in fns: f()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter(); f(); ts[i].append(time.perf_counter() - t0)
    return ts

def med(t): return statistics.median(t)
def ratio(a, b): return statistics.median(x / y for x, y in zip(a, b))   # paired: the same round's load on both

def time_table(layers, width, batches, reps):
    from weightdrop.dropout import _keep_mask
    torch.set_num_threads(1)
    models = {kind: make_model(kind, layers, width) for _, kind in KINDS}
    raw = models['plain'][0].weight.detach()
    def redraw(): return raw * _keep_mask(raw.shape, raw, 0.5)
    redraw()
    draws = []
    for _ in range(reps):
        t0 = time.perf_counter(); redraw(); draws.append(time.perf_counter() - t0)
    t_draw = statistics.median(draws)
    print(f"\n## Step time (forward + backward), {layers} x Linear({width}, {width}), p = 0.5, 1 thread, medians of "
          f"{reps} interleaved rounds; ratios paired by round\n")
    print(f"Making one {width}x{width} mask and dropped weight again (what recompute adds to the backward per layer): "
          f"{t_draw * 1e3:.0f} ms.\n")
    print("| batch | plain (ms) | stored masks (ms) | recomputed (ms) | recomputed / stored | plain / stored | "
          "held mask: stored (ms) | held mask: recomputed (ms) | held: recomputed / stored |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for bs in batches:
        x = batch(bs, width)
        fns = [lambda m=models[k]: (train_step(m, x), m.zero_grad(set_to_none=False)) for _, k in KINDS]
        tp, ts, tr, ths, thr = interleaved(fns, reps)
        print(f"| {bs} | {med(tp) * 1e3:.0f} | {med(ts) * 1e3:.0f} | {med(tr) * 1e3:.0f} | **{ratio(tr, ts):.3f}×** | "
              f"{ratio(tp, ts):.3f}× | {med(ths) * 1e3:.0f} | {med(thr) * 1e3:.0f} | **{ratio(thr, ths):.3f}×** |", flush=True)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--layers', type=int, default=4); ap.add_argument('--width', type=int, default=4096)
    ap.add_argument('--time-width', type=int, default=2048, help='width of the timed layers (the ratio depends on the batch)')
    ap.add_argument('--batches', type=int, nargs='+', default=[16, 64, 256, 512, 1024])
    ap.add_argument('--reps', type=int, default=5); ap.add_argument('--mem-batch', type=int, default=64)
    ap.add_argument('--mem'); ap.add_argument('--only', choices=('memory', 'time'))
    a = ap.parse_args()
    if a.mem: return mem_worker(a.mem, a.layers, a.width, a.mem_batch)
    print(f"torch {torch.__version__}, CPU\n")
    if a.only != 'time': memory_table(a.layers, a.width, a.mem_batch)
    if a.only != 'memory': time_table(a.layers, a.time_width, a.batches, a.reps)

if __name__ == '__main__': main()
