"The top-level package: `import weightdrop` gives the public API and imports fastai only when a fastai name is used."
import configparser, importlib, importlib.util, os, re, subprocess, sys
from pathlib import Path
import pytest
import weightdrop

ROOT = Path(__file__).resolve().parent.parent

def fresh(code):
    "Run `code` in a new interpreter on this tree's weightdrop; return its stdout, stripped."
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()

# ---- behaviour

def test_plain_pytorch_names_import_no_fastai():
    out = fresh("import sys, weightdrop; print('torch' in sys.modules)\n"
                "from torch import nn\n"
                "lstm = weightdrop.WeightDropout(nn.LSTM(4, 4), weight_p=0.5); weightdrop.WeightNoise; weightdrop.RandomGate\n"
                "weightdrop.Mixout(nn.Linear(2, 2), p=0.5); weightdrop.mixout_encoder\n"
                "weightdrop.mutate_; weightdrop.WeightHijacker; weightdrop.mix_seed\n"
                "print(sorted(m for m in ('fastai', 'pandas', 'matplotlib') if m in sys.modules))")  # fastcore (for `patch`) is light
    assert out.splitlines() == ['False', '[]']    # a bare `import weightdrop` imports not even torch

def test_fastai_names_work_and_then_import_fastai():
    out = fresh("import sys, weightdrop\n"
                "cb = weightdrop.ResampleCallback(seed=0)\n"
                "from fastai.callback.core import Callback\n"
                "print(isinstance(cb, Callback), 'fastai' in sys.modules, weightdrop.AWD_LSTM.__module__)")
    assert out == 'True True weightdrop.awdlstm'

def test_dir_lists_the_api_before_it_is_imported():
    out = fresh("import sys, weightdrop; d = dir(weightdrop)\n"
                "print(all(n in d for n in ('WeightDropout', 'ResampleCallback', 'AWD_LSTM', 'MutateCallback')), "
                "'fastai' in sys.modules)")
    assert out == 'True False'

def test_every_name_is_the_object_weightdrop_all_gives():
    import weightdrop.all as wall
    for name in weightdrop.__all__: assert getattr(weightdrop, name) is getattr(wall, name), name
    assert set(weightdrop.__all__) == set(wall.__all__) - set(weightdrop._modules)

def test_star_import_gives_the_api():
    ns = {}
    exec('from weightdrop import *', ns)
    assert {'WeightDropout', 'EmbeddingDropout', 'AWD_LSTM', 'ResampleCallback'} <= set(ns)

def test_module_names_stay_modules():
    # `gates` and `mutate` are functions too; importing a submodule rebinds the package attribute to the module,
    # so the top level never hands out the function under that name
    import weightdrop.gates, weightdrop.mutate, weightdrop.all
    assert type(weightdrop.gates).__name__ == 'module' and callable(weightdrop.all.gates)
    assert type(weightdrop.mutate).__name__ == 'module' and callable(weightdrop.all.mutate)

def test_version_is_the_one_in_settings():
    cfg = configparser.ConfigParser(); cfg.read(ROOT/'settings.ini')
    assert weightdrop.__version__ == cfg['DEFAULT']['version']

@pytest.mark.parametrize('mod', weightdrop._modules)
def test_lazy_map_matches_module_all(mod):
    "The name map in nbs/90_package.ipynb is written out; it must list exactly each module's `__all__`."
    if importlib.util.find_spec(f'weightdrop.{mod}') is None:
        assert mod not in weightdrop._api, f'weightdrop._api lists names of weightdrop.{mod}, which does not exist'
        pytest.skip(f'weightdrop.{mod} is not written yet')
    names = tuple(n for n in importlib.import_module(f'weightdrop.{mod}').__all__ if n not in weightdrop._modules)
    assert weightdrop._api.get(mod) == names, (
        f"weightdrop.{mod}'s __all__ changed: in nbs/90_package.ipynb, set _api[{mod!r}] = {names!r}, "
        "then run nbdev-export")

def test_every_module_is_in_the_map():
    mods = {p.stem for p in (ROOT/'weightdrop').glob('*.py') if not p.stem.startswith('_')}
    assert mods - set(weightdrop._modules) == {'all', 'demo'}   # `all` imports everything; `demo` is a console script

def test_weightdrop_all_imports_the_same_modules_in_the_same_order():
    src = (ROOT/'weightdrop'/'all.py').read_text()
    stars = re.findall(r'^from \.(\w+) import \*', src, re.M)
    assert stars == [m for m in weightdrop._modules if importlib.util.find_spec(f'weightdrop.{m}')]

# ---- bad input

def test_misspelt_name_raises_attribute_error_naming_the_package():
    with pytest.raises(AttributeError, match="module 'weightdrop' has no attribute 'WeightDropuot'") as e:
        weightdrop.WeightDropuot
    assert e.value.name == 'WeightDropuot' and e.value.obj is weightdrop   # lets the traceback suggest the spelling
    assert not hasattr(weightdrop, 'demo_config')   # the demo's helpers are not the API
