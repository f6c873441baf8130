"Start a test script on N gloo processes with torchrun, and load what each rank saved: shared by the multi-process tests."
import os, socket, subprocess, sys
from pathlib import Path
import pytest, torch

REPO = Path(__file__).resolve().parent.parent

def free_port() -> int:
    "A TCP port nothing listens on now, for one process group's rendezvous."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def torchrun(script:Path, out:Path, *args, nproc:int=2) -> list:
    "Run `script OUT ARGS` on `nproc` CPU processes; fail the test with its output on a non-zero exit or after 120 s (a hang)."
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_port', str(free_port()),
           str(script), str(out), *args]
    try: r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e: pytest.fail(f"{Path(script).name} {args} timed out after 120 s (a hang?)\n{e.stdout}\n{e.stderr}")
    if r.returncode != 0: pytest.fail(f"{Path(script).name} {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-6000:]}")
    return [torch.load(Path(out) / f'rank{i}.pt', weights_only=False) for i in range(nproc)]
