"""Benchmark: evolution strategies on an `nn.Module`, weightdrop's seed-defined members against the usual ways.

In one run:
1. Time per member of perturbing a model and putting it back (4 x Linear(1024, 1024), about 4.2M parameters), and of
   a whole member with a fitness forward on a batch of 64:
   - weightdrop: `perturb_(model, seed, sigma, backup=one_backup_per_generation)`, then `backup.restore_()`;
   - weightdrop's `Population.evaluate`, which shows each member through scratch copies swapped in by `.data`;
   - per-member `copy.deepcopy(model)`, then noise added to the copy's parameters;
   - the flat vector, as EvoTorch does: `vector_to_parameters(theta + sigma * eps, params)` per member, `theta` from
     `parameters_to_vector` once per generation.
2. The price of a stream per (seed, parameter name) on the CPU: `param_noise` over every parameter against one
   `torch.randn(n)` from a generator seeded once.
3. Members per second of a whole generation on 1 and 2 processes (torchrun, gloo) for four approaches: weightdrop's
   `EvolutionStrategy.step` with drawn noise and with a `NoiseTable` (default size, 2^25 numbers) all-gathers the
   fitness only; the two baselines all-reduce the fitness and then each rank's partial gradient estimate. All use fused
   Adam. Twice: with a fitness of one forward on a batch of 64 (the noise dominates), in `--rounds` rounds of a
   1-process and a 2-process run (medians, and the median of the rounds' paired speed-ups: the machine is shared and
   noisy), and of 1024 (scoring dominates), in one round. Bytes each rank sends per generation, counted by wrapping `torch.distributed`'s collectives. For
   weightdrop, the milliseconds of a generation spent scoring the rank's members, in the all-gather (with the wait for
   the slower rank) and in the update (the estimate, then the optimizer's step), from `step`'s statistics.
4. Memory overhead of a generation: each contender in a fresh process, its peak RSS (VmHWM, reset through
   /proc/self/clear_refs once the model is built) above the resident size at that point, in bytes and in model sizes.

Run: PYTHONPATH=. python benchmarks/bench_evolution.py [--reps 5] [--popsize 16] [--generations 4] [--rounds 3] [--kinds ...]
[--scaling-only]
"""
import argparse, copy, json, os, socket, statistics, subprocess, sys, time
import torch, torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

WIDTH, LAYERS, BATCH = 1024, 4, 64

def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh())])

def batch(n=BATCH): return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(1))

def fitness(x):
    def f(m):
        with torch.no_grad(): return -m(x).pow(2).mean().item()
    return f

# ---- the three ways to make a member and score it

def weightdrop_member(model, seed, score, backup):
    from weightdrop.evolution import perturb_
    backup = perturb_(model, seed, 0.02, backup=backup, check_graph=False)
    try: return score(model), backup
    finally: backup.restore_()

def deepcopy_member(model, seed, score):
    m, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn(p.shape, generator=g), alpha=0.02)
    return score(m)

def flat_member(model, theta, seed, score):
    params, g = list(model.parameters()), torch.Generator().manual_seed(seed)
    eps = torch.randn(theta.numel(), generator=g)
    vector_to_parameters(theta + 0.02 * eps, params)
    return score(model)

def interleaved(fns, reps):
    "Median seconds of each function, the functions taking turns in every round; paired ratios to the first."
    for f in fns: f()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter(); f(); ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts], [statistics.median(a / b for a, b in zip(t, ts[0])) for t in ts]

def per_member_table(reps, popsize):
    from weightdrop.evolution import Backup, named_tensors
    model, x = make_model(), batch()
    n = sum(p.numel() for p in model.parameters())
    params = list(model.parameters())
    from weightdrop.evolution import Population
    pop = Population(model, popsize, 0.02, antithetic=False)
    def generation(kind, score):
        if kind == 'population': pop.evaluate(score)
        elif kind == 'weightdrop':
            bk = None
            for s in range(popsize): _, bk = weightdrop_member(model, s, score, bk)
        elif kind == 'deepcopy':
            for s in range(popsize): deepcopy_member(model, s, score)
        else:
            theta = parameters_to_vector(params)
            for s in range(popsize): flat_member(model, theta, s, score)
            vector_to_parameters(theta, params)
    rows = []
    for label, score in (('perturb and restore only', lambda m: 0.), (f'with a fitness forward (batch {BATCH})', fitness(x))):
        (tw, tp, td, tf), (_, rp, rd, rf) = interleaved(
            [lambda k=k: generation(k, score) for k in ('weightdrop', 'population', 'deepcopy', 'flat')], reps)
        rows.append(f"| {label} | {tw / popsize * 1e3:.1f} | {tp / popsize * 1e3:.1f} ({rp:.2f}x) | "
                    f"{td / popsize * 1e3:.1f} ({rd:.2f}x) | {tf / popsize * 1e3:.1f} ({rf:.2f}x) |")
    print(f"## Per member: {n / 1e6:.1f}M parameters ({LAYERS} x Linear({WIDTH}, {WIDTH})), popsize {popsize}, "
          f"1 thread, medians of {reps} interleaved generations\n")
    print("| member | weightdrop `perturb_` + `restore_` (ms) | weightdrop `Population.evaluate`, scratch copy shown "
          "(ms, vs `perturb_`) | deepcopy + perturb (ms, vs `perturb_`) | flat vector, EvoTorch-style (ms, vs `perturb_`) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows: print(r)

def noise_streams(reps):
    from weightdrop.evolution import param_noise
    model = make_model(); named = list(model.named_parameters()); n = sum(p.numel() for _, p in named)
    bufs = {k: torch.empty(p.shape) for k, p in named}
    g = torch.Generator()
    def streams():
        for k, p in named: param_noise(p, 5, k, out=bufs[k])
    def one(): g.manual_seed(5); torch.randn(n, generator=g)
    (ts, to), (_, r) = interleaved([one, streams], reps)
    print(f"\n## Noise: a CPU stream per (seed, parameter name), {len(named)} parameters, {n / 1e6:.1f}M numbers\n")
    print("| one `torch.randn(n)`, seeded once | `param_noise` per parameter | ratio |")
    print("|---:|---:|---:|")
    print(f"| {ts * 1e3:.1f} ms | {to * 1e3:.1f} ms | {r:.2f}x |")

# ---- members per second and bytes sent, on 1 and 2 processes, for the three approaches

def _pair_seed(g, m): return 1_000_003 * g + m // 2, -1. if m % 2 else 1.

def baseline_step(kind, model, params, opt, popsize, g, rank, world, score, sigma=0.02):
    "One generation of OpenAI-ES the usual way: members by deepcopy or by flat vector, fitness all-reduced, then each "
    "rank's partial gradient estimate (its own members' noise) all-reduced: O(parameters) per rank."
    mine = [k * 2 + j for k in range(rank, popsize // 2, world) for j in range(2)]
    theta, fit = parameters_to_vector(params).detach(), torch.zeros(popsize, dtype=torch.float64)
    for m in mine:
        s, sign = _pair_seed(g, m)
        eps = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(s))
        if kind == 'deepcopy':
            c = copy.deepcopy(model)
            with torch.no_grad():
                for p, e in zip(c.parameters(), eps.split([p.numel() for p in params])): p.add_(e.view_as(p), alpha=sign * sigma)
            fit[m] = score(c)
        else:
            vector_to_parameters(theta + sign * sigma * eps, params); fit[m] = score(model)
    if kind == 'flat': vector_to_parameters(theta, params)
    if world > 1: dist.all_reduce(fit)
    ranks = torch.empty_like(fit); ranks[fit.argsort(stable=True)] = torch.arange(popsize, dtype=fit.dtype)
    w = ranks / (popsize - 1) - 0.5
    est = torch.zeros_like(theta)
    for m in mine:
        s, sign = _pair_seed(g, m)
        est.add_(torch.randn(theta.numel(), generator=torch.Generator().manual_seed(s)), alpha=sign * w[m].item())
    if world > 1: dist.all_reduce(est)
    est.div_(-popsize * sigma)
    for p, e in zip(params, est.split([p.numel() for p in params])): p.grad = e.view_as(p).clone()
    opt.step(); opt.zero_grad()

def adam(params): return torch.optim.Adam(params, lr=0.01, fused=True)   # what EvolutionStrategy uses by default

def worker(out, popsize, generations, bs, kinds):
    sent = []
    def counting(fn, arg):
        def wrapped(*a, **k):
            t = a[arg]; sent.append(sum(x.numel() * x.element_size() for x in t) if isinstance(t, (list, tuple))
                                     else t.numel() * t.element_size())
            return fn(*a, **k)
        return wrapped
    for name, arg in (('all_gather_single', 1), ('all_gather_into_tensor', 1), ('all_gather', 1), ('all_reduce', 0),
                      ('broadcast', 0)):
        if hasattr(dist, name): setattr(dist, name, counting(getattr(dist, name), arg))
    from weightdrop.evolution import EvolutionStrategy, NoiseTable
    dist.init_process_group('gloo'); rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    x, res, table = batch(bs), {}, NoiseTable()       # the table is built once, before any timing
    for kind in kinds:
        model = make_model(); params = list(model.parameters()); split = []
        if kind.startswith('weightdrop'):
            es = EvolutionStrategy(model, popsize, 0.02, 0.01, table=table if kind == 'weightdrop_table' else None)
            opt_time = [0.]
            def timed(fn=es.opt.step):
                t = time.perf_counter(); fn(); opt_time[0] = time.perf_counter() - t
            es.opt.step = timed
            def step(g):
                s = es.step(fitness(x))
                split.append([s['time_evaluate'], s['time_gather'], s['time_update'] - opt_time[0], opt_time[0]])
        else:
            opt = adam(params)
            step = lambda g: baseline_step(kind, model, params, opt, popsize, g, rank, world, fitness(x))
        sent.clear(); step(0)                          # warm-up generation, whose collectives are counted
        per_gen = sum(sent); dist.barrier(); split.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        for g in range(1, generations + 1): step(g)
        cpu = torch.tensor([time.process_time() - c0], dtype=torch.float64)
        dist.barrier(); wall = time.perf_counter() - t0
        dist.all_reduce(cpu, op=dist.ReduceOp.MAX)     # the busiest rank's CPU time: what a core per rank would take
        res[kind] = dict(members_per_s=popsize * generations / wall, bytes_per_gen=per_gen,
                         members_per_cpu_s=popsize * generations / cpu.item())
        if split:                                      # seconds per generation, averaged over generations and ranks
            ms = torch.tensor(split, dtype=torch.float64).mean(0)
            if world > 1: dist.all_reduce(ms)
            res[kind]['split_ms'] = (ms / world * 1e3).tolist()
    if rank == 0:
        json.dump(dict(world=world, n_params=sum(p.numel() for p in make_model().parameters()), **res), open(out, 'w'))
    dist.barrier(); dist.destroy_process_group()
    sys.stdout.flush(); os._exit(0)

def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def run_workers(nproc, popsize, generations, bs, tmp, kinds):
    out = os.path.join(tmp, f'w{nproc}_{bs}.json')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_port',
                    str(free_port()), __file__, '--worker', out, '--popsize', str(popsize), '--generations',
                    str(generations), '--batch', str(bs), '--kinds', ','.join(kinds)], env=env, check=True,
                   capture_output=True)
    return json.load(open(out))

KINDS = ('weightdrop', 'weightdrop_table', 'deepcopy', 'flat')
LABELS = dict(weightdrop='weightdrop `EvolutionStrategy.step`, drawn noise',
              weightdrop_table='weightdrop `EvolutionStrategy.step`, `NoiseTable`',
              deepcopy='deepcopy + perturb per member', flat='flat vector per member (EvoTorch-style)')

def scaling_table(popsize, generations, bs, rounds=1, kinds=KINDS):
    "Alternate 1- and 2-process runs `rounds` times (the order flipped each round, against drift in the machine's "
    "load); report medians over the rounds, and the speed-up as the median of each round's paired ratio."
    import tempfile
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            got = {n: run_workers(n, popsize, generations, bs, tmp, kinds) for n in order}
            runs.append((got[1], got[2]))
    med = statistics.median
    def rate(k, world, key='members_per_s'): return med(run[world - 1][k][key] for run in runs)
    def ratio(k, key='members_per_s', base=None):
        "Median over the rounds of k's 2-process rate over its 1-process rate, or over `base`'s 2-process rate."
        return med(run[1][k][key] / (run[1][base] if base else run[0][k])[key] for run in runs)
    n = runs[0][0]['n_params']
    print(f"\n## A whole generation on 1 and 2 processes: fitness = one forward of a batch of {bs} (torchrun, gloo, 1 "
          f"thread each), popsize {popsize}, {generations} generations after a warm-up, "
          f"{rounds} round{'s' * (rounds > 1)} of 1 and 2 processes, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("Members/s: wall clock; in brackets, members per CPU-second of the busiest rank, the rate with a free core "
          "per rank." + (" Medians over the rounds; the speed-up is the median of the rounds' paired ratios, with "
                         "their range." if rounds > 1 else "") + "\n")
    print("| approach | members/s, 1 process | members/s, 2 processes | speed-up | vs weightdrop drawn, 2 processes | "
          "bytes sent per rank per generation (2 processes) | in parameters' float32 bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in kinds:
        ups = sorted(run[1][k]['members_per_s'] / run[0][k]['members_per_s'] for run in runs)
        spread = f" [{ups[0]:.2f}–{ups[-1]:.2f}]" if rounds > 1 else ""
        vs = (f"{ratio(k, base='weightdrop'):.2f}x ({ratio(k, 'members_per_cpu_s', 'weightdrop'):.2f}x)"
              if 'weightdrop' in kinds else "–")
        sent = runs[0][1][k]['bytes_per_gen']
        print(f"| {LABELS[k]} | {rate(k, 1):.1f} ({rate(k, 1, 'members_per_cpu_s'):.1f}) | {rate(k, 2):.1f} "
              f"({rate(k, 2, 'members_per_cpu_s'):.1f}) | {ratio(k):.2f}x{spread} ({ratio(k, 'members_per_cpu_s'):.2f}x) "
              f"| {vs} | {sent:,} | {sent / (4 * n):.2g} |")
    print(f"\nA weightdrop generation, split (ms per generation, mean over generations and ranks, median over the "
          f"rounds; the all-gather includes the wait for the slower rank):\n")
    print("| noise | processes | evaluate | all-gather | update: estimate | update: Adam step | update, share of the generation |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in [k for k in ('weightdrop', 'weightdrop_table') if k in kinds]:
        for world in (1, 2):
            splits = [run[world - 1][k]['split_ms'] for run in runs]      # evaluate, all-gather, estimate, Adam
            ev, ga, est, opt = (med(ms[i] for ms in splits) for i in range(4))
            share = med((ms[2] + ms[3]) / sum(ms) for ms in splits)
            print(f"| {'drawn' if k == 'weightdrop' else 'table'} | {world} | {ev:.0f} | {ga:.0f} | {est:.0f} | "
                  f"{opt:.0f} | {share:.0%} |")

# ---- memory overhead, each contender in a fresh process

def _status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key): return int(line.split()[1]) * 1024
    raise KeyError(key)

def mem_worker(kind, popsize):
    "Peak resident memory of one generation above the process as it stands once the model is built."
    import ctypes, gc
    torch.set_num_threads(1)
    from weightdrop.evolution import EvolutionStrategy, perturb_
    model, x = make_model(), batch()
    params = list(model.parameters()); score = fitness(x)
    score(model)                                          # the forward's own buffers are not what is measured
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.)   # nor the ~70 MiB the first optimizer imports
    gc.collect(); ctypes.CDLL('libc.so.6').malloc_trim(0)
    base = _status('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f: f.write('5')   # reset VmHWM to the current resident size
    if kind == 'perturbed':
        bk = None
        for s in range(popsize):
            bk = perturb_(model, s, 0.02, mirror=bool(s % 2), backup=bk, check_graph=False)
            score(model); bk.restore_()
    elif kind == 'es_step':
        EvolutionStrategy(model, popsize, 0.02, 0.01, optimizer=torch.optim.SGD).step(score)
    elif kind == 'es_step_table':
        from weightdrop.evolution import NoiseTable
        EvolutionStrategy(model, popsize, 0.02, 0.01, optimizer=torch.optim.SGD, table=NoiseTable()).step(score)
    elif kind == 'deepcopy':
        for s in range(popsize): deepcopy_member(model, s, score)
    elif kind == 'flat':
        theta = parameters_to_vector(params)
        for s in range(popsize): flat_member(model, theta, s, score)
        vector_to_parameters(theta, params)
    elif kind == 'flat_population':   # EvoTorch samples the population as one (popsize, n) matrix
        theta = parameters_to_vector(params)
        pop = theta + 0.02 * torch.randn(popsize, theta.numel())
        for row in pop: vector_to_parameters(row, params); score(model)
        vector_to_parameters(theta, params)
    print(json.dumps(dict(extra=_status('VmHWM') - base, model=sum(p.nbytes for p in params))))

def memory_table(popsize):
    kinds = [('weightdrop `perturb_` + `restore_`, one `Backup` for the generation', 'perturbed'),
             ('weightdrop `EvolutionStrategy.step` (members + estimate + SGD step)', 'es_step'),
             ('the same with the default `NoiseTable` (2^25 float32 numbers, 128 MiB, built in the generation)', 'es_step_table'),
             ('deepcopy + perturb per member, one at a time', 'deepcopy'),
             ('flat vector per member, one at a time', 'flat'),
             ('flat vector, population matrix (EvoTorch)', 'flat_population')]
    # a fixed mmap threshold: glibc then returns every freed tensor to the system, and RSS follows the live tensors
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MALLOC_MMAP_THRESHOLD_': '131072'}
    rows = []
    for label, kind in kinds:
        r = subprocess.run([sys.executable, __file__, '--mem', kind, '--popsize', str(popsize)], env=env, check=True,
                           capture_output=True, text=True)
        rows.append((label, json.loads(r.stdout.strip().splitlines()[-1])))
    model = rows[0][1]['model']
    print(f"\n## Memory overhead of one generation of {popsize} members (peak RSS above the built model, fresh process "
          f"each; model {model / 2**20:.1f} MiB)\n")
    print("| approach | extra peak (MiB) | extra peak (bytes) | in model sizes |")
    print("|---|---:|---:|---:|")
    for label, d in rows:
        print(f"| {label} | {d['extra'] / 2**20:.1f} | {d['extra']:,} | {d['extra'] / d['model']:.2f} |")

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--reps', type=int, default=5); ap.add_argument('--popsize', type=int, default=16)
    ap.add_argument('--generations', type=int, default=4)
    ap.add_argument('--rounds', type=int, default=3, help='alternating 1- and 2-process runs at the cheap fitness')
    ap.add_argument('--kinds', default=','.join(KINDS), help='comma-separated approaches for the scaling tables')
    ap.add_argument('--batch', type=int, default=BATCH, help='worker: fitness batch size')
    ap.add_argument('--worker'); ap.add_argument('--mem')
    ap.add_argument('--scaling-only', action='store_true', help='only the 1- and 2-process tables')
    a = ap.parse_args()
    kinds = tuple(a.kinds.split(','))
    if a.worker: return worker(a.worker, a.popsize, a.generations, a.batch, kinds)
    if a.mem: return mem_worker(a.mem, a.popsize)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU, load average {os.getloadavg()[0]:.1f} at the start\n")
    if not a.scaling_only:
        per_member_table(a.reps, a.popsize)
        noise_streams(a.reps)
    print("\nThe two baselines below all-reduce the fitness and then each rank's partial gradient estimate, as a "
          "data-parallel ES does;\nweightdrop all-gathers the fitness only and every rank rebuilds the whole estimate "
          "from the seeds, redrawing the noise or slicing a NoiseTable.")
    scaling_table(a.popsize, a.generations, BATCH, a.rounds, kinds)
    scaling_table(a.popsize, a.generations, 16 * BATCH, 1, kinds)
    if not a.scaling_only: memory_table(a.popsize)

if __name__ == '__main__': main()
