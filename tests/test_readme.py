"The README's quick start runs as written, each block in a fresh interpreter, as a user would paste it."
import re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent

def quick_start_blocks():
    text = (ROOT/'README.md').read_text()
    section = text.split('\n## Quick start\n', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```python\n(.*?)```', section, re.S)

def run(code, cwd):
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True, timeout=600)

def test_quick_start_has_a_plain_pytorch_block_and_a_fastai_block():
    blocks = quick_start_blocks()
    assert len(blocks) == 2, f'expected two python blocks in the quick start, found {len(blocks)}'
    assert 'from fastai' not in blocks[0] and 'from fastai.text.all import' in blocks[1]

def test_plain_pytorch_block_runs_and_imports_no_fastai(tmp_path):
    check = "\nimport sys\nassert not [m for m in sys.modules if m.split('.')[0] == 'fastai'], 'fastai was imported'\n" \
            "assert lstm.weight_hh_l0_raw.grad is not None and lstm.weight_hh_l0_raw.grad.abs().sum() > 0\n"
    r = run(quick_start_blocks()[0] + check, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

@pytest.mark.slow
def test_fastai_block_runs_and_uses_weightdrops_awd_lstm(tmp_path):
    check = "\nimport weightdrop.awdlstm\nassert type(learn.model[0]) is weightdrop.awdlstm.AWD_LSTM\n" \
            "assert mean.shape == std.shape and (std > 0).any(), 'mc_preds gave no spread'\n" \
            "assert sorted(p.name for p in __import__('pathlib').Path('.').iterdir()) == [], 'the quick start wrote files'\n"
    r = run(quick_start_blocks()[1] + check, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
