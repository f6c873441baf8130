"Start one of these scripts on N gloo processes with torchrun, and load what each rank saved."
import os, socket, subprocess, sys
from pathlib import Path
import pytest, torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent.parent

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def torchrun(script, out, *args, nproc=2):
    "Run SCRIPTS/`script` OUT ARGS on `nproc` processes; fail the test on a non-zero exit or after 120 s (a hang)."
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_port', str(free_port()),
           str(SCRIPTS / script), str(out), *args]
    try: r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e: pytest.fail(f"{script} {args} timed out (a hang?)\n{e.stdout}\n{e.stderr}")
    if r.returncode != 0: pytest.fail(f"{script} {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-6000:]}")
    return [torch.load(Path(out) / f'rank{i}.pt', weights_only=False) for i in range(nproc)]
