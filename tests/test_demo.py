"The `weightdrop-demo` console script: a short run end to end, and every bad input stopped before training."
import os, subprocess, sys
from pathlib import Path
import pytest
from pydoc_data.topics import topics

ROOT = Path(__file__).resolve().parent.parent

def demo(args, cwd, timeout=300):
    "Run the demo as pip's console-script wrapper does (`sys.exit(main())`) in a fresh interpreter."
    code = f"import sys; from weightdrop.demo import main; sys.exit(main({list(map(str, args))!r}))"
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, 'PYTHONPATH': str(ROOT)})

# ---- behaviour

def test_demo_console_script_exits_zero(tmp_path):
    text = tmp_path/'small.txt'
    text.write_text('\n\n'.join(topics[k] for k in sorted(topics)[:24]))
    out = tmp_path/'curves.png'
    r = demo(['--epochs', '1', '--text', text, '--out', out], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert 'final validation perplexity' in r.stdout and '| 1 |' in r.stdout
    assert out.stat().st_size > 1000

# ---- bad input

def paragraphs(tmp_path, n, words=1):
    p = tmp_path/'mine.txt'
    p.write_text('\n\n'.join(' '.join(f'word{i}x{j}' for j in range(words)) for i in range(n)))
    return p

@pytest.mark.parametrize('args, message', [
    (['--weight-p', '1.5'], '--weight-p must be in (0, 1)'),
    (['--epochs', '0'], '--epochs must be at least 1'),
    (['--text', 'missing.txt'], "--text: no such file 'missing.txt'"),
    (['--out', 'no/such/folder/plot.png'], "--out: no folder 'no/such/folder'"),
])
def test_bad_flags_stop_with_a_usage_error(tmp_path, args, message):
    r = demo(args, tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('weightdrop-demo: error: ') and message in last, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr and r.stdout == ''   # stopped before reading the corpus or training

@pytest.mark.parametrize('n, words, message', [
    (5, 20, 'holds 5 paragraphs; the demo needs at least 10'),
    (12, 1, '32 parallel streams need at least 33'),   # fastai's loader would raise a bare IndexError mid-epoch
])
def test_too_little_text_stops_before_training(tmp_path, n, words, message):
    r = demo(['--text', paragraphs(tmp_path, n, words), '--out', tmp_path/'plot.png'], tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('weightdrop-demo: error: --text: ') and message in last, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr and '== weight_p' not in r.stdout
    assert not (tmp_path/'plot.png').exists()
