"""WeightDropout AWD-LSTM language models under DistributedDataParallel: 2 processes, gloo, CPU, started with torchrun.

Issue #6, "Distributed training on an existing engine". The scripts in tests/ddp_scripts/ train; these tests read what
every rank saved and check it. How to go from one machine to many, as the README says:

    torchrun --nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 tests/ddp_scripts/lm_plain.py OUT
"""
import os, socket, subprocess, sys
from pathlib import Path
import pytest, torch

TESTS = Path(__file__).resolve().parent
REPO, SCRIPTS = TESTS.parent, TESTS / 'ddp_scripts'
sys.path.insert(0, str(SCRIPTS))
from lm_common import make_model, eval_outputs, token_stream, batch  # noqa: E402

pytestmark = pytest.mark.distributed

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def torchrun(script, out, *args, nproc=2):
    "Run `script` on `nproc` CPU processes with torchrun; fail with its output if it fails."
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_port', str(free_port()),
           str(SCRIPTS / script), str(out), *args]
    try: r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{script} {args} timed out after 120 s\n{e.stdout}\n{e.stderr}")
    if r.returncode != 0: pytest.fail(f"{script} {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-6000:]}")
    return [torch.load(out / f'rank{i}.pt', weights_only=False) for i in range(nproc)]

def run_once(base, script, *args):
    "Launch each configuration once per test session, even when pytest-xdist spreads the tests over workers."
    from filelock import FileLock    # a dependency of torch
    out = base / (script.replace('.py', '') + '_'.join(a.strip('-') for a in args))
    with FileLock(str(out) + '.lock'):
        if (out / 'done').exists(): return out, [torch.load(out / f'rank{i}.pt', weights_only=False) for i in range(2)]
        out.mkdir(exist_ok=True)
        res = torchrun(script, out, *args)
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

def test_plain_ddp_checkpoint_loads_single_process(runs):
    "Rank 0's checkpoint, loaded into a model built in this (non-distributed) process, gives the same eval outputs."
    out, (r0, r1) = runs('lm_plain.py')
    assert torch.equal(r0['eval'], r1['eval'])
    model = make_model(seed=12345)                      # different init: everything must come from the checkpoint
    before = eval_outputs(model)
    model.load_state_dict(torch.load(out / 'checkpoint.pt'))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(eval_outputs(model), r0['eval'])
    finally: torch.set_num_threads(threads)
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
    model = make_model(seed=12345)
    model.load_state_dict(torch.load(out / 'checkpoint.pth'))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(eval_outputs(model), r0['eval'])
    finally: torch.set_num_threads(threads)
