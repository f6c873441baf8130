import pytest

def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: long soak or multi-process runs (still run by default)')
    config.addinivalue_line('markers', 'distributed: needs torch.distributed with gloo (CPU); most spawn several processes')
    config.addinivalue_line('markers', 'gpu: needs CUDA; skipped without it')

def pytest_collection_modifyitems(config, items):
    import torch
    from capabilities import gloo_failure
    skips = {'gpu': None if torch.cuda.is_available() else 'needs a CUDA device', 'distributed': gloo_failure()}
    for item in items:
        for mark, why in skips.items():
            if why is not None and mark in item.keywords: item.add_marker(pytest.mark.skip(reason=why))
