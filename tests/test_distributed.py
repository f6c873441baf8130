"""WeightDropout AWD-LSTM language models under DistributedDataParallel: 2 processes, gloo, CPU, started with torchrun.

The scripts in tests/ddp_scripts/ train; these tests read what every rank saved and check it. How to go from one machine to many, as the README says:

    torchrun --nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 tests/ddp_scripts/lm_plain.py OUT
"""
import os, sys
from pathlib import Path
import pytest, torch

TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS / "ddp_scripts"
sys.path.insert(0, str(SCRIPTS))
from lm_common import make_model, eval_outputs  # noqa: E402
from launch import free_port, torchrun

pytestmark = pytest.mark.distributed

def run_once(base, script, *args):
    "Launch each configuration once per test session, even when pytest-xdist spreads the tests over workers."
    from filelock import FileLock    # a dependency of torch
    out = base / (script.replace('.py', '') + '_'.join(a.strip('-') for a in args))
    with FileLock(str(out) + '.lock'):
        if (out / 'done').exists(): return out, [torch.load(out / f'rank{i}.pt', weights_only=False) for i in range(2)]
        out.mkdir(exist_ok=True)
        res = torchrun(SCRIPTS / script, out, *args)
        (out / 'done').touch()
    return out, res

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    # under xdist every worker has its own basetemp; their common parent is shared by the session
    base = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'): base = base.parent
    base = base / 'ddp_runs'; base.mkdir(exist_ok=True)
    cache = {}
    def run(script, *args):
        if (script, args) not in cache: cache[(script, args)] = run_once(base, script, *args)
        return cache[(script, args)]
    return run

def same_masks(r0, r1):
    "Per step, whether both ranks' masks of every dropped weight were identical."
    assert len(r0['patterns']) == len(r1['patterns']) >= 2
    return [all(torch.equal(a, b) for a, b in zip(p0, p1)) for p0, p1 in zip(r0['patterns'], r1['patterns'])]

def assert_bit_identical(sd0, sd1):
    assert list(sd0) == list(sd1)
    for k in sd0: assert torch.equal(sd0[k], sd1[k]), f'{k} differs between ranks'

# Plain PyTorch loop

def test_plain_ddp_raw_weights_bit_identical(runs):
    "After N SGD steps on different data and different masks, every raw weight is bit-identical on both ranks."
    out, (r0, r1) = runs('lm_plain.py')
    assert r0['steps'] == r1['steps'] == 6
    assert r0['loss'] != r1['loss']                  # the ranks really saw different batches
    assert_bit_identical(r0['state'], r1['state'])
    init = torch.load(out / 'init.pt')
    raw = [k for k in init if k.endswith('_raw')]
    assert len(raw) == 2 and all(not torch.equal(init[k], r0['state'][k]) for k in raw)  # and the raw weights trained

def test_plain_ddp_needs_no_find_unused_parameters(runs):
    "DDP(model) with the default find_unused_parameters=False trains several steps (it raises on the 2nd if a parameter is unused)."
    _, (r0, r1) = runs('lm_plain.py')
    assert len(r0['patterns']) == len(r1['patterns']) == 6   # every step ran, and every parameter had a gradient (asserted in the script)

def test_plain_ddp_default_masks_differ_across_ranks(runs):
    "Each rank draws its own masks, as data-parallel dropout does."
    _, (r0, r1) = runs('lm_plain.py')
    assert not any(same_masks(r0, r1))

def test_plain_ddp_shared_masks_identical_across_ranks(runs):
    "Seeding every wrapper's `generator` from (seed, step, wrapper) gives both ranks the same masks, new at every step."
    _, (r0, r1) = runs('lm_plain.py', '--shared-masks')
    assert all(same_masks(r0, r1))
    steps = r0['patterns']
    assert not any(all(torch.equal(a, b) for a, b in zip(p, q)) for p, q in zip(steps, steps[1:]))
    assert_bit_identical(r0['state'], r1['state'])

def assert_loads_single_process(path, expected):
    "A model built here with another init, loaded from `path`, gives `expected` eval outputs; returns its outputs before loading."
    model = make_model(seed=12345)                      # different init: everything must come from the checkpoint
    before = eval_outputs(model)
    model.load_state_dict(torch.load(path))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(eval_outputs(model), expected)
    finally: torch.set_num_threads(threads)
    return before

def test_plain_ddp_checkpoint_loads_single_process(runs):
    "Rank 0's checkpoint, loaded into a model built in this (non-distributed) process, gives the same eval outputs."
    out, (r0, r1) = runs('lm_plain.py')
    assert torch.equal(r0['eval'], r1['eval'])
    before = assert_loads_single_process(out / 'checkpoint.pt', r0['eval'])
    assert not torch.equal(before, r0['eval'])

# fastai: Learner.distrib_ctx (accelerate on the CPU)

needs_accelerate = pytest.mark.skipif(__import__('importlib').util.find_spec('accelerate') is None,
                                      reason="fastai.distributed needs accelerate (pip install accelerate)")

@needs_accelerate
@pytest.mark.parametrize('masks', ['global', 'rank', 'shared'])
def test_fastai_ddp_raw_weights_bit_identical(runs, masks):
    "fastai trains through DDP (find_unused_parameters=False) and both ranks end with bit-identical weights."
    _, (r0, r1) = runs('lm_fastai.py', '--masks', masks)
    assert r0['world'] == 2 and r0['n_batches'] == r1['n_batches'] == 5
    assert set(r0['wrappers']) == {('DistributedDataParallel', False)}
    assert r0['model_type'] == 'SequentialRNN'           # unwrapped again after fit
    assert r0['hold_mask'] == r1['hold_mask'] == [False, False]  # ResampleCallback restored the wrappers
    assert_bit_identical(r0['state'], r1['state'])
    init = make_model(seed=0).state_dict()
    assert all(not torch.equal(init[k], r0['state'][k]) for k in init if k.endswith('_raw'))

@needs_accelerate
@pytest.mark.parametrize('masks', ['global', 'rank'])
def test_fastai_ddp_per_rank_masks_differ(runs, masks):
    "`ResampleCallback()` and `ResampleCallback(seed=0)` draw a different mask on each rank."
    _, (r0, r1) = runs('lm_fastai.py', '--masks', masks)
    assert not any(same_masks(r0, r1))

@needs_accelerate
def test_fastai_ddp_shared_masks_identical(runs):
    "`ResampleCallback(seed=0, shared_masks=True)` draws the same masks on both ranks, a new one every batch."
    _, (r0, r1) = runs('lm_fastai.py', '--masks', 'shared')
    assert all(same_masks(r0, r1))
    steps = r0['patterns']
    assert not any(all(torch.equal(a, b) for a, b in zip(p, q)) for p, q in zip(steps, steps[1:]))

@needs_accelerate
def test_fastai_ddp_checkpoint_loads_single_process(runs):
    "The checkpoint fastai's `Learner.save` wrote on rank 0 loads into a single-process model with the same eval outputs."
    out, (r0, r1) = runs('lm_fastai.py', '--masks', 'rank')
    assert torch.equal(r0['eval'], r1['eval'])
    assert_loads_single_process(out / 'checkpoint.pth', r0['eval'])


# ---- random gates under DDP
# Two processes, gloo, CPU, spawned from the test; DDP(model) with the default find_unused_parameters=False.

import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def leave_process_group():
    "End a spawned rank cleanly: meet the peer, tear the group down, and exit without C++ teardown."
    dist.barrier()   # gloo aborts a rank that tears down while its peer still talks
    dist.destroy_process_group()
    os._exit(0)      # gloo threads sometimes abort the interpreter's exit ('terminate called ...')


def join_process_group(rank, world, port):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)


def gate_supernet():
    from weightdrop.gates import RandomGate
    torch.manual_seed(0)
    return nn.Sequential(
        RandomGate(nn.Linear(6, 8), nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Linear(6, 8), combine='sum'),
        nn.ReLU(),
        RandomGate(nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4), k=2, combine='cat', seed=1),
        nn.Linear(12, 1))


def flat(model): return torch.cat([q.detach().reshape(-1) for q in model.parameters()])


def off_state(model, opt):
    "{parameter name: (weight, optimizer state)} of every parameter, cloned."
    return {n: (q.detach().clone(), {k: v.clone() for k, v in opt.state[q].items() if torch.is_tensor(v)})
            for n, q in model.named_parameters()}


def _plain_loop_worker(rank, world, port, out_dir):
    "A plain loop with no weightdrop-specific call: DDP(model), torch.optim, forward, backward, step."
    join_process_group(rank, world, port)
    from weightdrop.gates import gates
    res = {}
    for opt_name in ('sgd', 'adamw'):
        model = gate_supernet()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = (torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01) if opt_name == 'sgd'
               else torch.optim.AdamW(ddp.parameters(), lr=0.01, weight_decay=0.1))
        gen = torch.Generator().manual_seed(100 + rank)   # each rank its own data
        choices, moved_off, checked = [], [], 0
        for step in range(12):
            x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
            before = off_state(model, opt)
            (ddp(x) - y).pow(2).mean().backward()
            off = {id(q) for g in gates(model).values() for q in g.off_params}
            opt.step(); opt.zero_grad()
            after = off_state(model, opt)
            for n, q in model.named_parameters():
                if id(q) not in off: continue
                checked += 1
                (w0, s0), (w1, s1) = before[n], after[n]
                if not (torch.equal(w0, w1) and s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)):
                    moved_off.append((step, n))
            choices.append([g.last_choice for g in gates(model).values()])
        res[opt_name] = dict(choices=choices, moved_off=moved_off, checked=checked, flat=flat(model))
    torch.save(res, os.path.join(out_dir, f'rank{rank}.pt'))
    leave_process_group()


def test_gates_ddp_plain_loop_same_choices_off_branches_still(tmp_path):
    """RandomGate under DDP in a plain loop needs no weightdrop-specific call and no find_unused_parameters: both
    ranks choose the same branches, end with identical trained weights, and in every step where a branch was off its
    weights and optimizer state (SGD momentum and weight decay, AdamW moments) are bit-unchanged."""
    mp.spawn(_plain_loop_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1))
    init = flat(gate_supernet())
    for opt in ('sgd', 'adamw'):
        assert r0[opt]['choices'] == r1[opt]['choices']              # same branches on both ranks, no communication
        assert len({str(c) for c in r0[opt]['choices']}) > 1          # and they do change from step to step
        assert torch.equal(r0[opt]['flat'], r1[opt]['flat'])          # ranks' weights identical
        assert not torch.equal(r0[opt]['flat'], init)                 # and they trained
        assert r0[opt]['checked'] > 0 and r0[opt]['moved_off'] == [] and r1[opt]['moved_off'] == []


def _grad_is_mean_worker(rank, world, port, out_dir):
    join_process_group(rank, world, port)
    from weightdrop.gates import gates
    model, ref = gate_supernet(), gate_supernet()
    ddp = nn.parallel.DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(7 + rank)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
    for m in (model, ref):
        for g in gates(m).values(): g.hold_choice(step=3)
    (ddp(x) - y).pow(2).mean().backward()
    (ref(x) - y).pow(2).mean().backward()
    ok, on = True, [g.last_choice for g in gates(model).values()]
    off = {id(q) for g in gates(model).values() for q in g.off_params}
    for q, r in zip(model.parameters(), ref.parameters()):
        if id(q) in off: ok &= bool((q.grad == 0).all()); continue   # kept on the graph for DDP, cleared at the step
        mean = r.grad.clone(); dist.all_reduce(mean); mean /= world
        ok &= torch.allclose(q.grad, mean, atol=1e-6)
    torch.save((ok, on), os.path.join(out_dir, f'ok{rank}.pt'))
    leave_process_group()


def test_gates_ddp_grad_is_mean_of_rank_grads(tmp_path):
    """With find_unused_parameters=True but ranks choosing different branches, each branch's gradient comes out
    divided by the world size. Step-seeded choices agree on both ranks, and an on branch's gradient is the plain mean
    of the ranks' local gradients."""
    mp.spawn(_grad_is_mean_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    (ok0, on0), (ok1, on1) = (torch.load(tmp_path / f'ok{r}.pt') for r in (0, 1))
    assert ok0 and ok1 and on0 == on1


def _fastai_gates_worker(rank, world, port, out_dir):
    join_process_group(rank, world, port)
    from fastai.basics import Learner, MSELossFlat, SGD, Callback
    from weightdrop.gates import gates
    from weightdrop.gate_callbacks import GateCallback
    from weightdrop.synth import synth_dls
    model = gate_supernet()
    ddp = nn.parallel.DistributedDataParallel(model)

    class OffStill(Callback):
        "At every optimizer step: did the off branches' weights stay put?"
        order = GateCallback.order + 1
        def before_fit(self): self.moved, self.checked, self.choices = [], 0, []
        def before_step(self):
            self.off = [(q, q.detach().clone()) for g in gates(model).values() for q in g._off_since_clear or ()]
        def after_step(self):
            self.checked += len(self.off)
            self.moved += [i for i, (q, q0) in enumerate(self.off) if not torch.equal(q, q0)]
            self.choices.append([g.last_choice for g in gates(model).values()])

    cb, spy = GateCallback(seed=5), OffStill()
    learn = Learner(synth_dls(96, 6, 16, seed=rank), ddp, loss_func=MSELossFlat(),
                    opt_func=lambda *a, **k: SGD(*a, mom=0.9, **k), wd=0.01, cbs=[cb, spy])
    with learn.no_logging(), learn.no_bar(): learn.fit(2, 1e-2)
    torch.save(dict(flat=flat(model), counts=cb.counts, choices=spy.choices, moved=spy.moved, checked=spy.checked),
               os.path.join(out_dir, f'rank{rank}.pt'))
    leave_process_group()


def test_gates_ddp_fastai_gate_callback(tmp_path):
    """GateCallback in a Learner around a DDP model: the same choices and identical weights on both ranks, and the off
    branches never move under fastai's SGD with momentum and weight decay."""
    mp.spawn(_fastai_gates_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1))
    assert r0['choices'] == r1['choices'] and r0['counts'] == r1['counts'] and sum(r0['counts']['0']) == 2 * 4
    assert torch.equal(r0['flat'], r1['flat'])
    assert r0['checked'] > 0 and r0['moved'] == [] and r1['moved'] == []
