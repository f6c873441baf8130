import pytest

def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: long soak or multi-process runs (still run by default)')
    config.addinivalue_line('markers', 'distributed: spawns several processes (gloo, CPU)')
    config.addinivalue_line('markers', 'gpu: needs CUDA; skipped without it')

def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords: item.add_marker(skip)
