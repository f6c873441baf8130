"Run every notebook in nbs/ through nbdev's own test runner: the notebooks' test cells are part of the suite."
from pathlib import Path
import pytest
from nbdev.test import test_nb

ROOT = Path(__file__).resolve().parent.parent
NBS = sorted((ROOT/'nbs').glob('*.ipynb'))

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook(nb):
    ok, secs = test_nb(nb, skip_flags=['notest'], basepath=ROOT)
    assert ok, f'{nb.name} failed: its traceback is printed above'
