"""Benchmark: evolution strategies on an `nn.Module`, weightdrop's seed-defined members against the usual ways.

In one run:
1. Time per member of perturbing a model and putting it back (4 x Linear(1024, 1024), about 4.2M parameters), and of
   a whole member with a fitness forward on a batch of 64:
   - weightdrop: `perturb_(model, seed, sigma, backup=one_backup_per_generation)`, then `backup.restore_()`;
   - per-member `copy.deepcopy(model)`, then noise added to the copy's parameters;
   - the flat vector, as EvoTorch does: `vector_to_parameters(theta + sigma * eps, params)` per member, `theta` from
     `parameters_to_vector` once per generation.
2. The price of a stream per (seed, parameter name) on the CPU: `param_noise` over every parameter against one
   `torch.randn(n)` from a generator seeded once.
3. Members per second of `EvolutionStrategy.step` on 1 and 2 processes (torchrun, gloo), and the bytes each rank sends
   per generation, counted by wrapping `torch.distributed`'s collectives, against the 4 bytes per parameter of
   all-reducing a float32 gradient estimate.
4. Peak memory (ru_maxrss, each contender in a fresh process) of a generation, over the model itself.

Run: PYTHONPATH=. python benchmarks/bench_evolution.py [--reps 5] [--popsize 16]
"""
import argparse, copy, json, os, resource, socket, statistics, subprocess, sys, time
import torch, torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

WIDTH, LAYERS, BATCH = 1024, 4, 64

def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh())])

def batch(): return torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1))

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
    def generation(kind, score):
        if kind == 'weightdrop':
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
        (tw, td, tf), (_, rd, rf) = interleaved([lambda: generation('weightdrop', score), lambda: generation('deepcopy', score),
                                                lambda: generation('flat', score)], reps)
        rows.append(f"| {label} | {tw / popsize * 1e3:.1f} | {td / popsize * 1e3:.1f} ({rd:.2f}x) | "
                    f"{tf / popsize * 1e3:.1f} ({rf:.2f}x) |")
    print(f"## Per member: {n / 1e6:.1f}M parameters ({LAYERS} x Linear({WIDTH}, {WIDTH})), popsize {popsize}, "
          f"1 thread, medians of {reps} interleaved generations\n")
    print("| member | weightdrop `perturb_` + `restore_` (ms) | deepcopy + perturb (ms, vs weightdrop) | "
          "flat vector, EvoTorch-style (ms, vs weightdrop) |")
    print("|---|---:|---:|---:|")
    for r in rows: print(r)

def noise_table(reps):
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

# ---- members per second and bytes sent, on 1 and 2 processes

def worker(out, popsize, generations):
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
    from weightdrop.evolution import EvolutionStrategy
    dist.init_process_group('gloo'); rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model, x = make_model(), batch()
    es = EvolutionStrategy(model, popsize, 0.02, 0.01)
    sent.clear()
    es.step(fitness(x))                               # warm-up generation
    per_gen = sum(sent); dist.barrier()
    t0 = time.perf_counter()
    for _ in range(generations): es.step(fitness(x))
    dist.barrier(); dt = time.perf_counter() - t0
    if rank == 0:
        json.dump(dict(world=world, members_per_s=popsize * generations / dt, bytes_per_gen=per_gen,
                       n_params=sum(p.numel() for p in model.parameters())), open(out, 'w'))
    dist.barrier(); dist.destroy_process_group()
    sys.stdout.flush(); os._exit(0)

def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def run_workers(nproc, popsize, generations, tmp):
    out = os.path.join(tmp, f'w{nproc}.json')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_port',
                    str(free_port()), __file__, '--worker', out, '--popsize', str(popsize), '--generations',
                    str(generations)], env=env, check=True, capture_output=True)
    return json.load(open(out))

def scaling_table(popsize, generations):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        res = [run_workers(n, popsize, generations, tmp) for n in (1, 2)]
    n = res[0]['n_params']
    print(f"\n## `EvolutionStrategy.step` on 1 and 2 processes (torchrun, gloo, 1 thread each), popsize {popsize}, "
          f"{generations} generations\n")
    print("| processes | members/s | speed-up | bytes sent per rank per generation | all-reducing a float32 gradient "
          "estimate instead |")
    print("|---:|---:|---:|---:|---:|")
    for r in res:
        print(f"| {r['world']} | {r['members_per_s']:.1f} | {r['members_per_s'] / res[0]['members_per_s']:.2f}x | "
              f"{r['bytes_per_gen']} | {4 * n:,} ({4 * n / max(r['bytes_per_gen'], 1):,.0f}x)"
              + (" |" if r['world'] > 1 else " (none needed on 1 process) |"))

# ---- peak memory, each contender in a fresh process

def mem_worker(kind, popsize):
    torch.set_num_threads(1)
    model, score = make_model(), (lambda m: 0.)
    params = list(model.parameters())
    from weightdrop.evolution import EvolutionStrategy, perturb_
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == 'weightdrop':
        EvolutionStrategy(model, popsize, 0.02, 0.01, optimizer=torch.optim.SGD).step(score)   # members + update
    elif kind == 'deepcopy':
        for s in range(popsize): deepcopy_member(model, s, score)
    elif kind == 'deepcopy_population':
        pop = [copy.deepcopy(model) for _ in range(popsize)]
    elif kind == 'flat':
        theta = parameters_to_vector(params)
        for s in range(popsize): flat_member(model, theta, s, score)
        vector_to_parameters(theta, params)
    elif kind == 'flat_population':   # EvoTorch samples the population as one (popsize, n) matrix
        theta = parameters_to_vector(params)
        pop = theta + 0.02 * torch.randn(popsize, theta.numel())
        for row in pop: vector_to_parameters(row, params); score(model)
        vector_to_parameters(theta, params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(kib=peak - base, model_kib=sum(p.nbytes for p in params) / 1024)))

def memory_table(popsize):
    kinds = [('weightdrop `EvolutionStrategy.step` (members + update)', 'weightdrop'),
             ('deepcopy per member, one at a time', 'deepcopy'),
             ('deepcopy per member, population held', 'deepcopy_population'),
             ('flat vector, one member at a time', 'flat'),
             ('flat vector, population matrix (EvoTorch)', 'flat_population')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    print(f"\n## Peak memory of one generation over the model itself (popsize {popsize}; ru_maxrss, fresh process each)\n")
    print("| approach | extra peak (MiB) | in models |")
    print("|---|---:|---:|")
    for label, kind in kinds:
        r = subprocess.run([sys.executable, __file__, '--mem', kind, '--popsize', str(popsize)], env=env, check=True,
                           capture_output=True, text=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {label} | {d['kib'] / 1024:.1f} | {d['kib'] / d['model_kib']:.2f} |")

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--reps', type=int, default=5); ap.add_argument('--popsize', type=int, default=16)
    ap.add_argument('--generations', type=int, default=3)
    ap.add_argument('--worker'); ap.add_argument('--mem')
    a = ap.parse_args()
    if a.worker: return worker(a.worker, a.popsize, a.generations)
    if a.mem: return mem_worker(a.mem, a.popsize)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU\n")
    per_member_table(a.reps, a.popsize)
    noise_table(a.reps)
    scaling_table(a.popsize, a.generations)
    # memory_table(a.popsize): ru_maxrss is taken after the model is built, but the process's earlier peak (imports,
    # model construction) hides the generation's own; needs a baseline that has already peaked

if __name__ == '__main__': main()
