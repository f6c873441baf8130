"""Sphinx settings for weightdrop's documentation site; `docs/nbsite.py` writes the pages it reads."""
from configparser import ConfigParser
from pathlib import Path

_cfg = ConfigParser(delimiters=['='])
_cfg.read(Path(__file__).resolve().parents[1] / 'settings.ini', encoding='utf-8')
_cfg = _cfg['DEFAULT']

project, author, copyright = _cfg['title'], _cfg['author'], _cfg['copyright']
release = version = _cfg['version']
html_title = project

extensions = ['myst_parser', 'sphinx.ext.viewcode']
myst_enable_extensions = ['attrs_block', 'attrs_inline']
myst_heading_anchors = 3
suppress_warnings = ['myst.header']         # a notebook may go from `#` to `###`
root_doc = 'index'
exclude_patterns = ['_outputs', 'images', '_doctrees']
toc_object_entries_show_parents = 'hide'     # the right-hand table of contents lists `sample`, not `WeightHijacker.sample`
add_module_names = False                     # signatures read `WeightDropout(...)`, as in the notebooks
python_display_short_literal_types = True
pygments_style = 'default'

html_theme = 'sphinx_book_theme'
html_theme_options = {
    'repository_url': _cfg['git_url'],
    'use_repository_button': True,
    'use_download_button': False,    # it offers the page's source, which the site does not ship
    'path_to_docs': _cfg['nbs_path'],
    'show_toc_level': 2,
    'home_page_in_toc': True,
}
html_context = {'default_mode': 'light'}   # without it a first visit logs 'Got invalid theme mode' in the console
html_static_path = ['_static']
html_favicon = '_static/favicon.svg'
html_css_files = ['weightdrop.css']
html_copy_source = False
html_show_sourcelink = False
html_last_updated_fmt = None
