"The `weightdrop-demo` console script, end to end on a small text file: it exits 0, prints its table and saves the plot."
import os, subprocess, sys
from pathlib import Path
from pydoc_data.topics import topics

ROOT = Path(__file__).resolve().parent.parent

def test_demo_console_script_exits_zero(tmp_path):
    text = tmp_path/'small.txt'
    text.write_text('\n\n'.join(topics[k] for k in sorted(topics)[:24]))
    out = tmp_path/'curves.png'
    # what pip's console-script wrapper does: sys.exit(main())
    code = ("import sys; from weightdrop.demo import main; "
            f"sys.exit(main(['--epochs', '1', '--text', {str(text)!r}, '--out', {str(out)!r}]))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert 'final validation perplexity' in r.stdout and '| 1 |' in r.stdout
    assert out.stat().st_size > 1000

def test_demo_rejects_bad_flags(tmp_path):
    code = "import sys; from weightdrop.demo import main; sys.exit(main(['--weight-p', '1.5']))"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 2 and '--weight-p must be in (0, 1)' in r.stderr
