"""Evolve the shared MLP with EvolutionStrategy on every rank of a gloo group; launch with torchrun.

    python -m torch.distributed.run --nproc_per_node=2 es_run.py OUT_DIR [--fail-rank R] [--table]

Every rank saves OUT_DIR/rank{r}.pt: its final weights, the stats, and the elements each collective call sent, per
generation. With --fail-rank R, rank R's fitness_fn raises at its second member of generation 1; every rank records
the error it got, checks its weights were restored, and retries the generation. With --table, the members' noise
comes from a `NoiseTable`, and at the end each rank steps once more with a table of its own seed, recording the error.
"""
import argparse, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from es_common import *

# Count what goes through torch.distributed: wrap its collectives before weightdrop binds any of them
calls = []
def counting(name, fn):
    def wrapped(*args, **kwargs):
        sent = args[1] if name in ('all_gather_single', 'all_gather_into_tensor', 'all_gather') else args[0]
        calls.append((name, sum(t.numel() for t in sent) if isinstance(sent, (list, tuple)) else sent.numel()))
        return fn(*args, **kwargs)
    return wrapped
for name in ('all_gather_single', 'all_gather_into_tensor', 'all_gather', 'all_reduce', 'broadcast', 'reduce',
             'reduce_scatter', 'all_to_all', 'send', 'recv', 'gather', 'scatter', 'broadcast_object_list',
             'all_gather_object'):
    if hasattr(dist, name): setattr(dist, name, counting(name, getattr(dist, name)))

from weightdrop.evolution import EvolutionStrategy, NoiseTable

p = argparse.ArgumentParser()
p.add_argument('out'); p.add_argument('--fail-rank', type=int, default=None); p.add_argument('--table', action='store_true')
args = p.parse_args()
dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
table = NoiseTable(TABLE_SIZE, seed=TABLE_SEED) if args.table else None

model = make_model(seed=rank)                 # different init per rank: the strategy must broadcast rank 0's
es = EvolutionStrategy(model, POPSIZE, SIGMA, LR, seed=SEED, table=table)
at_start, calls[:] = list(calls), []
per_generation, stats, errors = [], [], []
for g in range(GENERATIONS):
    n_calls = [0]
    def fitness(m):
        n_calls[0] += 1
        if args.fail_rank == rank and g == 1 and n_calls[0] == 2 and not errors: raise ValueError('episode diverged')
        return neg_mse(m)
    if args.fail_rank is not None and g == 1:
        before = state(model)
        try: es.step(fitness)
        except RuntimeError as e: errors.append(str(e))
        assert all(torch.equal(before[k], v) for k, v in state(model).items()), 'weights not restored'
        assert es.generation == 1
        per_generation.append(list(calls)); calls[:] = []
    stats.append(es.step(fitness))
    per_generation.append(list(calls)); calls[:] = []

# The same strategy on a model with 30 times as many parameters sends the same number of elements per generation
big = make_model(seed=0, width=200)
EvolutionStrategy(big, POPSIZE, SIGMA, LR, seed=SEED, table=table).step(neg_mse)
calls_big = list(calls)[-1:]

table_error = None
if args.table:    # a table of another seed on each rank: every rank must raise, naming the tables
    try: EvolutionStrategy(make_model(), POPSIZE, SIGMA, LR, seed=SEED, table=NoiseTable(TABLE_SIZE, seed=rank)).step(neg_mse)
    except RuntimeError as e: table_error = str(e)

res = dict(state=state(model), stats=stats, per_generation=per_generation, at_start=at_start, errors=errors,
           calls_big=calls_big, table_error=table_error, n_params=sum(p.numel() for p in model.parameters()),
           n_params_big=sum(p.numel() for p in big.parameters()), world=world, members=es.population.members_of(rank))
torch.save(res, os.path.join(args.out, f'rank{rank}.pt'))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)   # skip C++ teardown at exit: gloo threads sometimes abort it ('terminate called ...')
