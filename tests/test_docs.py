"The documentation site builder (docs/nbsite.py) on tiny notebook folders: what the pages show, and bad input."
import importlib.util, json, re, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
for tool in ('sphinx', 'myst_parser', 'sphinx_book_theme'):
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"the docs tools are not installed ({tool} is missing; pip install -e '.[docs]', Python 3.11+)",
                    allow_module_level=True)

spec = importlib.util.spec_from_file_location('nbsite', ROOT / 'docs' / 'nbsite.py')
nbsite = importlib.util.module_from_spec(spec); spec.loader.exec_module(nbsite)

def cell(src, kind='code', outputs=()):
    c = {'cell_type': kind, 'id': f'{abs(hash(src)) % 16**8:08x}', 'metadata': {}, 'source': src}
    if kind == 'code': c.update(execution_count=None, outputs=list(outputs))
    return c

def notebook(path, *cells):
    path.write_text(json.dumps({'cells': list(cells), 'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python',
                    'name': 'python3'}}, 'nbformat': 4, 'nbformat_minor': 5}, indent=1, sort_keys=True))
    return path

def tiny_nbs(tmp_path):
    nbs = tmp_path / 'nbs'; nbs.mkdir()
    notebook(nbs / 'index.ipynb', cell('# tiny\n> A front page.', 'markdown'), cell('See `01_page` and `WeightDropout`.', 'markdown'))
    return nbs

# ---- behaviour
def test_a_page_shows_what_nbdev_shows(tmp_path):
    nbs = tiny_nbs(tmp_path)
    png = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='
    notebook(nbs / '01_page.ipynb',
             cell('# A page\n> Its summary.', 'markdown'),
             cell('#| hide\nsecret_hidden_cell = 1'),
             cell('show_doc(WeightDropout)'),
             cell('`WeightDropout` drops weights; fastai/fastai#2591 is the thread.', 'markdown'),
             cell('print("visible")', outputs=[{'name': 'stdout', 'output_type': 'stream', 'text': 'visible output\n'}]),
             cell('plot()', outputs=[{'data': {'image/png': png, 'text/plain': '<Figure>'}, 'metadata': {},
                                      'output_type': 'display_data'}]))
    nbsite.build(nbs, tmp_path / 'site', tmp_path / 'proc')
    page = (tmp_path / 'site' / 'page.html').read_text()
    assert 'secret_hidden_cell' not in page and '#|' not in page
    assert 'id="weightdrop.dropout.WeightDropout"' in page                       # the API entry, with its docments table
    assert 'Weight dropout probability' in page and 'weight_p' in page
    assert re.search(r'<a [^>]*href="#weightdrop.dropout.WeightDropout"', page)  # the backticked name links to it
    assert 'href="https://github.com/fastai/fastai/issues/2591"' in page
    assert 'visible output' in page and re.search(r'<img [^>]*src="_images/page-5-0.png"', page)
    index = (tmp_path / 'site' / 'index.html').read_text()
    assert re.search(r'href="page.html#weightdrop.dropout.WeightDropout"', index) and 'href="page.html"' in index

def test_quarto_cell_options_hide_what_they_say(tmp_path):
    nbs = tiny_nbs(tmp_path)
    out = lambda text: [{'name': 'stdout', 'output_type': 'stream', 'text': text}]
    notebook(nbs / '01_page.ipynb', cell('# A page', 'markdown'),
             cell('#| echo: false\nsource_one()', outputs=out('output one')),
             cell('#| output: false\nsource_two()', outputs=out('output two')),
             cell('#| include: false\nsource_three()', outputs=out('output three')),
             cell('#| exports\n_shown_source = 1'))
    nbsite.stage(nbs, tmp_path / 'proc')
    md = (tmp_path / 'proc' / 'page.md').read_text()
    assert 'source_one' not in md and 'output one' in md
    assert 'source_two' in md and 'output two' not in md
    assert 'three' not in md and '#|' not in md
    assert '_shown_source = 1' in md                      # `#| exports` shows its code, as nbdev does

def test_a_patched_method_shown_by_hand_is_shown_once(tmp_path):
    nbs = tiny_nbs(tmp_path)      # nbdev's add_show_docs would add a second `show_doc(Learner.mc_preds)`
    notebook(nbs / '04_callbacks.ipynb', cell('# Callbacks', 'markdown'), cell('#| default_exp callbacks'),
             cell('#| export\n@patch\ndef mc_preds(self:Learner, dl=None): "Predictions"'), cell('show_doc(Learner.mc_preds)'))
    nbsite.stage(nbs, tmp_path / 'proc')
    assert (tmp_path / 'proc' / 'callbacks.md').read_text().count('{py:method} Learner.mc_preds(') == 1

def test_pages_follow_the_notebooks_order_with_index_first(tmp_path):
    nbs = tiny_nbs(tmp_path)
    for name in ('10_b', '02_a', '03_c'): notebook(nbs / f'{name}.ipynb', cell(f'# {name}', 'markdown'))
    assert [nbsite.page_name(p) for p in nbsite.notebooks(nbs)] == ['index', 'a', 'c', 'b']

# ---- bad input
def test_broken_json_names_the_notebook_and_the_cell(tmp_path):
    nbs = tiny_nbs(tmp_path)
    nb = notebook(nbs / '01_page.ipynb', cell('# A page', 'markdown'), cell('x = 1'), cell('y = 2'))
    nb.write_text(nb.read_text().replace('"y = 2"', '"y = 2" "oops"'))
    with pytest.raises(nbsite.DocsError, match=r"01_page\.ipynb: broken JSON in cell 2, line \d+ column \d+"):
        nbsite.stage(nbs, tmp_path / 'proc')

def test_show_doc_of_a_missing_name_names_the_notebook_and_the_cell(tmp_path):
    nbs = tiny_nbs(tmp_path)
    notebook(nbs / '01_page.ipynb', cell('# A page', 'markdown'), cell('x = 1'), cell('show_doc(WeightDropuot)'))
    with pytest.raises(nbsite.DocsError, match=r"01_page\.ipynb cell 2 \(id \w+\): `show_doc\(WeightDropuot\)`: "
                                              r"'WeightDropuot' is not defined in weightdrop\.all"):
        nbsite.stage(nbs, tmp_path / 'proc')

def test_an_exported_function_missing_from_the_package_names_its_cell(tmp_path):
    nbs = tiny_nbs(tmp_path)       # the show_doc nbdev adds for an exported function points at the function's cell
    notebook(nbs / '01_page.ipynb', cell('# A page', 'markdown'), cell('#| export\ndef not_exported(): pass'), cell('x = 1'))
    with pytest.raises(nbsite.DocsError, match=r"01_page\.ipynb cell 1 .*'not_exported' is not defined in weightdrop\.all"):
        nbsite.stage(nbs, tmp_path / 'proc')

def test_show_doc_of_a_missing_attribute_names_the_attribute(tmp_path):
    nbs = tiny_nbs(tmp_path)
    notebook(nbs / '01_page.ipynb', cell('# A page', 'markdown'), cell('show_doc(WeightDropout.resmaple)'))
    with pytest.raises(nbsite.DocsError, match=r"01_page\.ipynb cell 1 .*WeightDropout has no attribute 'resmaple'"):
        nbsite.stage(nbs, tmp_path / 'proc')

def test_a_folder_without_index_is_refused(tmp_path):
    nbs = tmp_path / 'nbs'; nbs.mkdir(); notebook(nbs / '01_page.ipynb', cell('# A page', 'markdown'))
    with pytest.raises(nbsite.DocsError, match='no index.ipynb'): nbsite.stage(nbs, tmp_path / 'proc')

def test_a_sphinx_warning_fails_the_build_and_names_the_cell(tmp_path):
    nbs = tiny_nbs(tmp_path)
    notebook(nbs / '01_page.ipynb', cell('# A page', 'markdown'), cell('x = 1'), cell('A plot: ![plot](images/missing.png)', 'markdown'))
    with pytest.raises(nbsite.DocsError, match=r"01_page\.ipynb cell 2 \(id \w+\): WARNING: image file not readable: images/missing.png"):
        nbsite.build(nbs, tmp_path / 'site', tmp_path / 'proc')

def test_two_notebooks_that_make_one_page_are_refused(tmp_path):
    nbs = tiny_nbs(tmp_path)
    for name in ('01_page', '02_page'): notebook(nbs / f'{name}.ipynb', cell(f'# {name}', 'markdown'))
    with pytest.raises(nbsite.DocsError, match=r'01_page\.ipynb, .*02_page\.ipynb: these notebooks would make the same page'):
        nbsite.stage(nbs, tmp_path / 'proc')

# ---- the browser check (docs/check.py) finds what it is for
chromium = shutil.which('chromium')

@pytest.mark.skipif(chromium is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_the_browser_check_passes_a_sound_site_and_finds_each_kind_of_breakage(tmp_path):
    pytest.importorskip('websockets', reason='the browser check drives Chromium with websockets')
    spec = importlib.util.spec_from_file_location('check', ROOT / 'docs' / 'check.py')
    check = importlib.util.module_from_spec(spec); spec.loader.exec_module(check)
    nbs = tiny_nbs(tmp_path)
    png = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='
    notebook(nbs / '01_page.ipynb', cell('# A page', 'markdown'), cell('show_doc(WeightDropout)'),
             cell('plot()', outputs=[{'data': {'image/png': png}, 'metadata': {}, 'output_type': 'display_data'}]))
    site = tmp_path / 'site'
    nbsite.build(nbs, site, tmp_path / 'proc')
    assert check.check(site, chromium, ['WeightDropout']) == []

    page, index = site / 'page.html', site / 'index.html'
    (site / '_images' / 'page-2-0.png').unlink()
    page.write_text(page.read_text().replace('</body>', '<script>throw new Error("boom")</script></body>')
                    .replace('</head>', '<style>header.bd-header { display: block; }</style></head>'))   # the theme's own header back
    index.write_text(index.read_text().replace('href="page.html#weightdrop.dropout.WeightDropout"', 'href="page.html#nowhere"'))
    problems = check.check(site, chromium, ['WeightDropout', 'WeightNoise'])
    assert any(p.startswith('page.html: broken image') for p in problems), problems
    assert any(p.startswith('page.html: JavaScript error') and 'boom' in p for p in problems), problems
    assert 'index.html: link to missing anchor page.html#nowhere' in problems, problems
    assert 'page.html: 2 search boxes on view' in problems and not any('index.html: 2 search' in p for p in problems)
    assert 'no API entry for weightdrop.WeightNoise' in problems and not any('weightdrop.WeightDropout' in p for p in problems)

def test_a_namedtuple_signature_reads_as_written():
    "Under `from __future__ import annotations` a NamedTuple's fields are ForwardRefs; its entry shows `seed: int`."
    from weightdrop.evolution import MemberNoise
    assert str(nbsite.signature(MemberNoise, drop_self=True)) == '(seed: int, mirror: bool, index: int = 0, count: int = 1)'
