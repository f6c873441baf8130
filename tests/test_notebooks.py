"Run every notebook in nbs/ through nbdev's own test runner: the notebooks' test cells are part of the suite."
from pathlib import Path
import pytest
import nbdev.test as nbdev_test  # not `from ... import test_nb`: pytest would collect it as a test

ROOT = Path(__file__).resolve().parent.parent
NBS = sorted((ROOT/'nbs').glob('*.ipynb'))

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook(nb):
    ok, secs = nbdev_test.test_nb(nb, skip_flags=['notest'], basepath=ROOT)
    assert ok, f'{nb.name} failed: its traceback is printed above'
