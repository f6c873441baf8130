"""EvolutionCallback: a fastai Learner trained by an evolution strategy on its own batches, with its own optimizer; on
2 gloo processes (torchrun), the ranks split each batch's population and end bit-identical."""
import re, sys
from pathlib import Path
import pytest, torch
from torch import nn
from fastai.basics import Learner, DataLoaders, MSELossFlat, set_seed, Callback
import fastai.callback.all  # noqa: F401  (Learner.no_bar, fit_one_cycle)
from weightdrop.evolution_callbacks import EvolutionCallback
from weightdrop.evolution import NoiseTable

SCRIPTS = Path(__file__).resolve().parent / 'es_scripts'
sys.path.insert(0, str(SCRIPTS))
import es_fit  # noqa: E402
from launch import torchrun

def synth_dls(n=256, bs=64, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g); y = x[:, :1] * 2 - x[:, 1:2] + 0.5
    return DataLoaders.from_dsets(list(zip(x[:192], y[:192])), list(zip(x[192:], y[192:])), bs=bs, **kwargs)

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

# ---- behaviour

def test_only_included_parameters_move():
    set_seed(0)
    model = net(); before = {k: v.clone() for k, v in model.state_dict().items()}
    learn = Learner(synth_dls(), model, loss_func=MSELossFlat(), cbs=EvolutionCallback(4, 0.05, include='4.*'), wd=0.)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1)
    sd = model.state_dict()
    assert not torch.equal(sd['4.weight'], before['4.weight'])
    assert all(torch.equal(sd[k], before[k]) for k in ('0.weight', '0.bias', '1.weight', '1.bias'))

class Modes(Callback):
    "Record, at every call of the loss, whether autograd is on and which modules are in training mode."
    def __init__(self): self.calls = []
    def before_fit(self):
        self.inner = self.learn.loss_func
        def recording(*a, **k):
            self.calls.append((torch.is_grad_enabled(), [m.training for m in self.learn.model.modules()]))
            return self.inner(*a, **k)
        self.learn.loss_func = recording
    def after_fit(self): self.learn.loss_func = self.inner

def es_learner(path=None):
    "A Learner whose batches come in the same order in every epoch, so that a resumed epoch sees the straight one's."
    data = synth_dls(shuffle=False)
    kw = dict(path=path) if path else {}
    return Learner(data, net(), loss_func=MSELossFlat(), cbs=EvolutionCallback(6, 0.05, seed=2), **kw)

def fit_quiet(learn, epochs, seed):
    set_seed(seed)
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 0.05)

def test_fit_twice_then_save_load_resumes_exactly(tmp_path):
    "BatchNorm and Dropout: the members are scored in eval mode under no_grad, the Learner trains in train mode; a second "
    "fit goes on with new seeds; learn.save/learn.load carry the weights, Adam's state and the generation, so a loaded "
    "Learner's next fit is bit for bit the straight run's."
    straight = es_learner(); cb = straight.cbs.filter(lambda c: isinstance(c, EvolutionCallback))[0]
    modes = Modes(); straight.add_cb(modes)
    fit_quiet(straight, 1, seed=1)
    n = len(straight.dls.train)
    assert cb.generation == n and len(straight.recorder.losses) == n
    # the Learner's own forward: grad on, every module training; the members' (and validation's): no grad, none training
    learner_calls = [t for g, t in modes.calls if g]; scored = [t for g, t in modes.calls if not g]
    assert len(learner_calls) == n and all(all(t) for t in learner_calls)
    assert len(scored) >= 6 * n and not any(any(t) for t in scored)
    straight.remove_cb(modes)
    straight.path = tmp_path; straight.save('one')
    fit_quiet(straight, 1, seed=2)
    assert cb.generation == 2 * n and len(straight.recorder.losses) == n

    resumed = es_learner(path=tmp_path); resumed.load('one')
    rcb = resumed.cbs.filter(lambda c: isinstance(c, EvolutionCallback))[0]
    fit_quiet(resumed, 1, seed=2)
    assert rcb.generation == 2 * n
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    sa, sb = straight.opt.state_dict()['state'], resumed.opt.state_dict()['state']
    assert all(x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
               for x, y in zip(sa, sb))
    assert straight.recorder.losses == resumed.recorder.losses

def test_fit_then_fit_again_is_one_longer_fit():
    "The second fit goes on with the first's generation (new seeds) and optimizer state: two fits of one epoch end "
    "bit for bit where one fit of two epochs ends. (Dropout comes after BatchNorm here, so its masks touch only the "
    "recorded loss.)"
    twice = es_learner(); fit_quiet(twice, 1, seed=1); fit_quiet(twice, 1, seed=1)
    once = es_learner(); fit_quiet(once, 2, seed=1)
    cb = twice.cbs.filter(lambda c: isinstance(c, EvolutionCallback))[0]
    assert cb.population.generation == cb.generation == 2 * len(twice.dls.train)
    a, b = twice.model.state_dict(), once.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

# ---- distributed: 2 processes, gloo, CPU

@pytest.fixture(scope='module')
def fit2(tmp_path_factory): return torchrun(SCRIPTS / 'es_fit.py', tmp_path_factory.mktemp('es_fit'))

@pytest.mark.distributed
def test_two_ranks_fit_bit_identical_to_one_process(fit2):
    "Each rank built its model from another seed; after fit, both ranks hold the weights and BatchNorm statistics of "
    "the same fit in one process, having split every batch's members."
    r0, r1 = fit2
    assert r0['world'] == r1['world'] == 2
    assert sorted(r0['members'] + r1['members']) == list(range(es_fit.POPSIZE))
    threads = torch.get_num_threads()
    try: torch.set_num_threads(1); one = es_fit.fit(model_seed=0)
    finally: torch.set_num_threads(threads)
    init = es_fit.net(0).state_dict()
    assert any(not torch.equal(init[k], one['state'][k]) for k in init if k.endswith('weight'))    # it trained
    for r in (r0, r1):
        assert r['generation'] == one['generation'] == es_fit.EPOCHS * 4
        assert all(torch.equal(r['state'][k], one['state'][k]) for k in one['state']), r['world']
        assert r['losses'] == one['losses']

@pytest.fixture(scope='module')
def fit2_table(tmp_path_factory): return torchrun(SCRIPTS / 'es_fit.py', tmp_path_factory.mktemp('es_fit_table'), '--table')

@pytest.mark.distributed
def test_two_ranks_fit_with_a_noise_table_bit_identical_to_one_process(fit2_table, fit2):
    "The members' noise sliced from a NoiseTable under torchrun: both ranks end fit where one process ends, and not "
    "where the drawn noise ends."
    threads = torch.get_num_threads()
    try: torch.set_num_threads(1); one = es_fit.fit(model_seed=0, table=True)
    finally: torch.set_num_threads(threads)
    for r in fit2_table:
        assert r['world'] == 2 and r['generation'] == one['generation'] == es_fit.EPOCHS * 4
        assert all(torch.equal(r['state'][k], one['state'][k]) for k in one['state'])
        assert r['losses'] == one['losses'] and "ranks disagree on evaluate's key" in r['shard_error']
    assert any(not torch.equal(one['state'][k], fit2[0]['state'][k]) for k in one['state'] if k.endswith('weight'))

@pytest.mark.distributed
def test_ranks_on_different_batches_all_raise(fit2):
    "A sharded loader would score each rank's members on another batch: every rank raises, naming the cause."
    for r in fit2: assert "ranks disagree on evaluate's key" in r['shard_error'] and 'distrib_ctx' in r['shard_error']

# ---- bad input

@pytest.mark.parametrize('kwargs, msg', [(dict(popsize=3), 'popsize must be even'), (dict(sigma=-1.), 'sigma must be'),
                                         (dict(seed=1.5), 'seed must be an int'), (dict(antithetic=None), 'antithetic must be'),
                                         (dict(table='shared'), 'table must be a NoiseTable or None')])
def test_bad_arguments(kwargs, msg):
    with pytest.raises((TypeError, ValueError), match=msg): EvolutionCallback(**kwargs)

def test_loading_the_state_of_a_run_with_another_table_raises(tmp_path):
    "The optimizer's state carries the table's size and seed with the generation; a Learner whose callback has another "
    "table (here none) refuses to go on from it, and its weights stay as loaded."
    a = Learner(synth_dls(), net(), loss_func=MSELossFlat(), cbs=EvolutionCallback(4, 0.05, table=NoiseTable(2**12, 1)),
                path=tmp_path)
    fit_quiet(a, 1, seed=0); a.save('t')
    b = Learner(synth_dls(), net(), loss_func=MSELossFlat(), cbs=EvolutionCallback(4, 0.05), path=tmp_path); b.load('t')
    w = b.model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=re.escape("saved with table=NoiseTable(size=4096, seed=1), this callback has "
                                                   "table=None: build EvolutionCallback(table=NoiseTable(size=4096, seed=1))")):
        fit_quiet(b, 1, seed=0)
    assert torch.equal(b.model[0].weight, w)
