"""Build weightdrop's documentation site from the notebooks, without Quarto and without executing them.

nbdev's own processors prepare each notebook as `nbdev-docs` would: `#| hide` and `#| export` cells go, directives are
stripped, and exported classes and functions get a `show_doc`. Then every `show_doc` becomes an API entry rendered from
the live object (signature, docstring, docments table), backticked names link to their entries, and each notebook
becomes one MyST page for Sphinx. The saved outputs and plots are shown as they are: nothing is executed.

    python docs/nbsite.py                  # nbs/ -> _proc/ (MyST pages) -> _docs/ (the site)
"""
from __future__ import annotations
import argparse, ast, base64, importlib, io, inspect, json, re, shutil, sys, time, typing
from pathlib import Path
from urllib.parse import quote

from fastcore.basics import AttrDict
from fastcore.nbio import read_nb, mk_cell
from fastcore.docments import docments
from nbdev import processors as nbdev_procs
from nbdev.doclinks import NbdevLookup
from nbdev.process import NBProcessor

ROOT = Path(__file__).resolve().parents[1]
LIB = 'weightdrop'

class DocsError(Exception):
    "A notebook the site cannot be built from; the message names the notebook and the cell."

# nbdev-docs' processors (nbdev.processors.FilterDefaults.base_procs) less the Quarto-only ones (front matter, code
# folding, the generated-file warning) and `exec_show_docs`, which executes cells: `render_api` below replaces it.
NBDEV_PROCS = [nbdev_procs.populate_language, nbdev_procs.add_show_docs, nbdev_procs.strip_ansi, nbdev_procs.hide_line,
               nbdev_procs.filter_stream_, nbdev_procs.rm_header_dash, nbdev_procs.rm_export, nbdev_procs.ai_magics,
               nbdev_procs.clean_magics, nbdev_procs.hide_, nbdev_procs.mv_exports, nbdev_procs.strip_hidden_metadata]

def page_name(nb_path:Path) -> str:
    "The page a notebook becomes, as nbdev names it: `02_dropout.ipynb` -> `dropout`."
    return re.sub(r'^\d+[a-z]?_', '', nb_path.stem)

def notebooks(nbs:Path) -> list[Path]:
    "The site's notebooks in sidebar order: `index` first, then the others by file name."
    paths = sorted(p for p in nbs.glob('*.ipynb') if not p.name.startswith(('.', '_')))
    if not any(p.stem == 'index' for p in paths): raise DocsError(f"{nbs}: no index.ipynb for the front page")
    return sorted(paths, key=lambda p: p.stem != 'index')

# ---------------------------------------------------------------------------------------------------------- reading
def where(path, cell) -> str:
    "`nbs/x.ipynb cell 7 (id 1a2b3c4d)`: how errors point at a cell."
    cid = cell.get('id') if hasattr(cell, 'get') else None
    return f"{path} cell {cell.nb_index_}" + (f" (id {cid})" if cid else '')

def read_notebook(path:Path):
    "The notebook at `path`, each cell knowing its index; broken JSON is a `DocsError` naming the line and the cell."
    text = path.read_text(encoding='utf-8')
    try: d = json.loads(text)
    except json.JSONDecodeError as e:
        n = text[:e.pos].count('"cell_type"') - 1   # nbdev-clean sorts keys, so each cell opens with `cell_type`
        cell = f" in cell {n}" if n >= 0 else ''
        raise DocsError(f"{path}: broken JSON{cell}, line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(d, dict) or not isinstance(d.get('cells'), list):
        raise DocsError(f"{path}: not a notebook (no list of cells)")
    for i, c in enumerate(d['cells']):
        if not isinstance(c, dict) or c.get('cell_type') not in ('code', 'markdown', 'raw') or 'source' not in c:
            raise DocsError(f"{path} cell {i}: not a notebook cell (needs a cell_type and a source)")
    nb = read_nb(path)
    for i, c in enumerate(nb.cells): c.nb_index_ = i
    return nb

def default_module(nb):
    "The module a notebook exports to (its `#| default_exp`), imported; `weightdrop.all` for a tutorial."
    m = nbdev_procs._default_exp(nb)
    if m is None: m = 'all'
    name = LIB if m == '__init__' else f'{LIB}.{m}'
    return importlib.import_module(name)

# ---------------------------------------------------------------------------------------------------- API entries
class Raw(str):
    "Text that `inspect` prints as it is (an annotation written as a string)."
    def __repr__(self): return str(self)

def annotation(a) -> str:
    "An annotation as written: a string as it is, a `ForwardRef` (a postponed `NamedTuple` field) as its text."
    if isinstance(a, typing.ForwardRef): return a.__forward_arg__
    return a if isinstance(a, str) else inspect.formatannotation(a)

def signature(obj, drop_self:bool):
    "The signature of `obj` with annotations as written, without `self`; `None` if it has none."
    try: sig = inspect.signature(obj)
    except (TypeError, ValueError): return None
    ps = list(sig.parameters.values())
    if drop_self and ps and ps[0].name in ('self', 'cls'): ps = ps[1:]
    ps = [p.replace(annotation=Raw(annotation(p.annotation))) if p.annotation is not p.empty else p for p in ps]
    ret = sig.return_annotation
    return sig.replace(parameters=ps, return_annotation=sig.empty if ret is sig.empty else Raw(annotation(ret)))

def cell_text(s) -> str: return str(s).replace('\n', ' ').replace('|', r'\|')

def docment_table(obj, sig, link) -> str:
    "nbdev's docments table: one row per argument (type, default, comment), and the return value's."
    try: dms = docments(obj, returns=True)
    except Exception: return ''
    if not any(dms.get(n) for n in list(sig.parameters) + ['return']): return ''
    rows = ['|  | **Type** | **Default** | **Details** |', '|---|---|---|---|']
    for n, p in sig.parameters.items():
        star = {p.VAR_POSITIONAL: '\\*', p.VAR_KEYWORD: '\\*\\*'}.get(p.kind, '')
        anno = f"`{cell_text(p.annotation)}`" if p.annotation is not p.empty else ''
        default = f"`{cell_text(repr(p.default))}`" if p.default is not p.empty else ''
        rows.append(f"| {star}`{n}` | {anno} | {default} | {cell_text(link(dms.get(n) or ''))} |")
    if dms.get('return') or sig.return_annotation is not sig.empty:
        anno = f"`{cell_text(sig.return_annotation)}`" if sig.return_annotation is not sig.empty else ''
        rows.append(f"| **Returns** | {anno} |  | {cell_text(link(dms.get('return') or ''))} |")
    return '\n'.join(rows)

def fence(text:str, info:str) -> str:
    "`text` in a backtick fence longer than any run of backticks inside it."
    n = max([3] + [len(r) + 1 for r in re.findall(r'`{3,}', text)])
    return f"{'`' * n}{info}\n{text}\n{'`' * n}"

class ApiEntry:
    "One `show_doc`: the object, the name it is shown under, and its Sphinx Python-domain directive."
    def __init__(self, obj, shown:str, module:str, owner=None):
        self.obj, self.shown, self.module, self.owner = obj, shown, module, owner
        self.fullname = f"{module}.{shown}"

    @property
    def kind(self) -> str:
        o = self.obj
        if isinstance(o, property): return 'property'
        if inspect.isclass(o): return 'class'
        if callable(o): return 'method' if '.' in self.shown else 'function'
        return 'data'

    def markdown(self, link, index:bool=True) -> str:
        "A MyST `{py:...}` directive: the signature, then the docstring and the docments table."
        o, kind = self.obj, self.kind
        opts = [f":module: {self.module}"] + ([] if index else [':no-index:'])
        body, sig_text = [], self.shown
        if kind == 'property':
            doc = inspect.getdoc(o)
        elif kind == 'data':
            value = repr(o)
            opts += [f":type: {type(o).__name__}", f":value: {value if len(value) <= 120 else value[:117] + '...'}"]
            doc = None
        else:
            raw = inspect.getattr_static(self.owner, self.shown.split('.')[-1], None) if self.owner is not None else None
            if isinstance(raw, staticmethod): opts.append(':staticmethod:')
            if isinstance(raw, classmethod): opts.append(':classmethod:')
            sig = signature(o, drop_self=kind in ('class', 'method') and not isinstance(raw, staticmethod))
            if sig is not None: sig_text += str(sig)
            doc = o.__doc__        # its own: `inspect.getdoc` would show `nn.Module.forward`'s for an undocumented `forward`
            table = docment_table(o, sig, link) if sig is not None else ''
            if table: body.append(table)
        if doc: body.insert(0, link(inspect.cleandoc(doc)))
        content = '\n'.join(opts) + ('\n\n' + '\n\n'.join(body) if body else '')
        return fence(content, f"{{py:{kind}}} {sig_text}")

def dotted_names(node) -> list[str] | None:
    "`['WeightHijacker', 'sample']` for the expression `WeightHijacker.sample`; `None` for anything else."
    if isinstance(node, ast.Name): return [node.id]
    if isinstance(node, ast.Attribute):
        pre = dotted_names(node.value)
        return None if pre is None else pre + [node.attr]

# ------------------------------------------------------------------------------------------------------------ links
class Links:
    "Backticked names to links: weightdrop's to their API entries, other nbdev libraries' (fastai, fastcore) to their docs."
    def __init__(self, pages:dict[str, str]):
        self.api, self.pages = {}, pages          # name -> Sphinx target; notebook stem -> page
        try: self.external = NbdevLookup(strip_libs='fastai fastcore')
        except Exception: self.external = None

    def add(self, e:ApiEntry):
        for n in (e.shown, e.fullname, f"{LIB}.{e.shown}"): self.api.setdefault(n, e.fullname)

    def _code(self, m):
        name, call = m.group(1), m.group(2) or ''
        if name in self.api: return f"{{py:obj}}`{name}{call} <{self.api[name]}>`"
        stem = re.sub(r'^nbs/|\.ipynb$', '', name)
        if stem in self.pages: return f"[`{name}`]({self.pages[stem]}.md)"
        # Another library's name links only when it can't be a plain word: `Learner`, `Learner.fit`, not `module`.
        url = self.external.doc(name) if self.external is not None and re.search(r'[A-Z.]', name) else None
        if url and url.startswith('http'): return f"[`{name}{call}`]({url})"
        return m.group(0)

    def __call__(self, md:str) -> str:
        "Link the backticked names and `owner/repo#123` references in markdown `md`, outside code blocks and links."
        out, in_fence = [], False
        for line in md.splitlines():
            if line.lstrip().startswith(('```', '~~~')): in_fence = not in_fence
            if in_fence or line.startswith('    ') or line.lstrip().startswith('```'): out.append(line); continue
            parts = re.split(r'(\[[^\]]*\]\([^)]*\)|<[^>]+>)', line)      # existing links and HTML tags stay as they are
            for i in range(0, len(parts), 2):
                bits = re.split(r'(`[^`]+`)', parts[i])
                for j in range(0, len(bits), 2):
                    bits[j] = re.sub(r'(?<![\w/.:-])([\w.-]+/[\w.-]+)#(\d+)\b', r'[\1#\2](https://github.com/\1/issues/\2)', bits[j])
                for j in range(1, len(bits), 2):
                    bits[j] = re.sub(r'^`([\w./-]+?)(\(\))?`$', self._code, bits[j])
                parts[i] = ''.join(bits)
            out.append(''.join(parts))
        return '\n'.join(out)

# ------------------------------------------------------------------------------------------------------------ pages
class Page:
    "One notebook, processed as nbdev-docs does, with its `show_doc`s resolved to API entries."
    def __init__(self, path:Path, root:Path):
        self.path, self.rel = path, path.relative_to(root) if path.is_relative_to(root) else path
        self.name = page_name(path)
        self.nb = read_notebook(path)
        self.entries = []

    def module(self):
        if not hasattr(self, '_module'):
            try: self._module = default_module(self.nb)
            except Exception as e: raise DocsError(f"{self.rel}: cannot import the module it documents: {e!r}") from e
        return self._module

    def resolve(self, call:ast.Call, cell) -> ApiEntry:
        "The object a `show_doc(...)` call names, looked up in the notebook's module, else in `weightdrop.all`."
        src = ast.unparse(call)
        names = dotted_names(call.args[0]) if call.args else None
        if names is None: raise DocsError(f"{where(self.rel, cell)}: `{src}`: show_doc takes a name, like show_doc(WeightDropout)")
        mod, everything = self.module(), vars(importlib.import_module(f'{LIB}.all'))
        ns = vars(mod)
        if names[0] not in ns and names[0] in everything: ns = everything
        if names[0] not in ns:
            hint = ' (after editing an exported cell, run nbdev-export)' if nbdev_procs._default_exp(self.nb) else ''
            raise DocsError(f"{where(self.rel, cell)}: `{src}`: {names[0]!r} is not defined in {mod.__name__}{hint}")
        obj, owner = ns[names[0]], None
        for i, n in enumerate(names[1:], 1):
            owner = obj
            try: obj = inspect.getattr_static(obj, n) if isinstance(inspect.getattr_static(obj, n, None), property) \
                       else getattr(obj, n)
            except AttributeError:
                raise DocsError(f"{where(self.rel, cell)}: `{src}`: {'.'.join(names[:i])} has no attribute {n!r}") from None
        home = getattr(obj.fget if isinstance(obj, property) else obj, '__module__', None) or ''
        module = home if home.split('.')[0] == LIB else mod.__name__
        if any(k.arg == 'name' for k in call.keywords):
            names = [ast.literal_eval(next(k.value for k in call.keywords if k.arg == 'name'))]
        return ApiEntry(obj, '.'.join(names), module, owner)

    def add_data_docs(self):
        "A `show_doc` for each public constant an exported cell defines, as nbdev's `add_show_docs` does for functions."
        shown = {nbdev_procs._get_nm(t) for c in self.nb.cells for t in nbdev_procs._show_docs(c.parsed_() or [])}
        public = set(getattr(self.module(), '__all__', []))
        for cell in reversed(self.nb.cells):
            if not nbdev_procs._want_doc(cell): continue
            targets = [n.id for node in (cell.parsed_() or []) if isinstance(node, (ast.Assign, ast.AnnAssign))
                       for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                       for n in ast.walk(t) if isinstance(n, ast.Name)]     # `OK, FAILED = 0, 1` too
            for n in reversed([t for t in dict.fromkeys(targets) if t in public and t not in shown]):
                self.nb.cells.insert(cell.idx_ + 1, mk_cell(f'show_doc({n})', metadata=AttrDict()))

    def process(self):
        "Run nbdev's doc processors, then find every show_doc's object."
        nb = self.nb
        for c in nb.cells: c.directives_ = c.directives
        if nbdev_procs._default_exp(nb) is not None: self.add_data_docs()
        home = {n: c.nb_index_ for c in nb.cells if 'nb_index_' in c and nbdev_procs._want_doc(c)
                for n in nbdev_procs._def_names(c, set())}
        end = mk_cell('', 'markdown', metadata=AttrDict())   # nbdev's mv_exports looks one past an `exports` cell
        nb.cells.append(end)
        NBProcessor(nb=nb, procs=NBDEV_PROCS, rm_directives=True).process()
        nb.cells = [c for c in nb.cells if c is not end]
        # nbdev compares a patched function's bare name (`mc_preds`) with the shown `Learner.mc_preds`, and shows it twice
        shown = {nbdev_procs._get_nm(t) for c in nb.cells if 'nb_index_' in c
                 for t in nbdev_procs._show_docs(c.parsed_() or [])}
        nb.cells = [c for c in nb.cells if not (c.get('has_sd') and c.source.strip()[len('show_doc('):-1] in shown)]
        last = 0
        for c in nb.cells:                      # a show_doc nbdev added points at the cell that defines its name
            if 'nb_index_' in c: last = c.nb_index_
            else: c.nb_index_ = home.get(c.source.strip()[len('show_doc('):-1], last)
            c.api_ = []
            if c.cell_type != 'code': continue
            trees = c.parsed_()
            if trees is None and 'show_doc' in c.source:
                raise DocsError(f"{where(self.rel, c)}: the cell is not valid Python")
            for t in nbdev_procs._show_docs(trees or []): c.api_.append((t, self.resolve(t.value, c)))
            self.entries += [e for _, e in c.api_]

    # ---- writing
    def cell_markdown(self, c, link, indexed:set) -> list[str]:
        "A cell as MyST: prose linked, code fenced, show_docs as API entries, outputs as saved."
        d = getattr(c, 'directives_', {}) or {}
        if str(d.get('include', '')).lower() == 'false': return []
        if c.cell_type == 'markdown': return [link(c.source)]
        if c.cell_type == 'raw': return []
        out, src = [], c.source
        if c.api_:
            lines = src.splitlines()
            for t, _ in c.api_:
                for i in range(t.lineno - 1, t.end_lineno): lines[i] = None
            src = '\n'.join(l for l in lines if l is not None).strip()
            for _, e in c.api_:
                out.append(e.markdown(link, index=e.fullname not in indexed)); indexed.add(e.fullname)
        if src and str(d.get('echo', '')).lower() != 'false': out.insert(0, fence(src, 'python'))
        if not c.api_ and str(d.get('output', '')).lower() != 'false':
            out += [o for k, op in enumerate(c.get('outputs', [])) if (o := self.output_markdown(op, c, k, link))]
        return out

    def output_markdown(self, o, c, k, link) -> str:
        "One saved output: a plot as an image file, HTML as raw HTML, markdown inline, text in an output block."
        kind = o.get('output_type')
        if kind == 'stream':
            stderr = ' stderr' if o.get('name') == 'stderr' else ''
            return fence(''.join(o.get('text', '')).rstrip('\n'), '{code-block} text\n:class: cell-output' + stderr)
        if kind == 'error':
            tb = nbdev_procs._re_ansi_escape.sub('', '\n'.join(o.get('traceback', [])))
            return fence(tb, '{code-block} text\n:class: cell-output stderr')
        data = o.get('data', {})
        def text(m): v = data[m]; return ''.join(v) if isinstance(v, list) else v
        for mime, ext in (('image/png', 'png'), ('image/jpeg', 'jpg'), ('image/gif', 'gif')):
            if mime in data:
                f = f"_outputs/{self.name}-{c.nb_index_}-{k}.{ext}"
                (self.out_dir / f).write_bytes(base64.b64decode(text(mime)))
                alt = text('text/plain').strip('<>') if 'text/plain' in data else 'output'
                return f"![{alt}]({f})"
        for mime in ('image/svg+xml', 'text/html'):
            if mime in data: return fence(f'<div class="cell-output cell-output-html">\n{text(mime)}\n</div>', '{raw} html')
        if 'text/markdown' in data: return link(text('text/markdown'))
        if 'text/plain' in data: return fence(text('text/plain'), '{code-block} text\n:class: cell-output')
        return ''

    def markdown(self, link, indexed:set) -> str:
        "The page's MyST text; `self.starts` keeps the line each cell starts on, to point Sphinx's warnings at cells."
        blocks, self.starts, line = [], [], 1
        for i, c in enumerate(self.nb.cells):
            md = self.cell_markdown(c, link, indexed)
            if i == 0 and c.cell_type == 'markdown' and md:   # nbdev's `# Title` + `> summary`: the summary as a lead
                md[0] = re.sub(r'\A(#[^\n]*\n)> ?([^\n]*(?:\n> ?[^\n]*)*)',
                               lambda m: f"{m[1]}\n{{.lead}}\n{m[2].replace(chr(10) + '>', ' ')}", md[0])
            if md: self.starts.append((line, c))
            for b in md: blocks.append(b); line += b.count('\n') + 2
        return '\n\n'.join(blocks) + '\n'

    def cell_at(self, line:int):
        "The notebook cell that line `line` of the page came from."
        return next((c for start, c in reversed(self.starts) if start <= line), None)

# ------------------------------------------------------------------------------------------------------------ build
def stage(nbs:Path, proc:Path, root:Path=ROOT) -> list[Page]:
    "Write each notebook of `nbs` as a MyST page into `proc`, with the images the pages use."
    if proc.exists(): shutil.rmtree(proc)
    (proc / '_outputs').mkdir(parents=True)
    if (nbs / 'images').is_dir(): shutil.copytree(nbs / 'images', proc / 'images')
    pages = [Page(p, root) for p in notebooks(nbs)]
    names = [p.name for p in pages]
    if dups := sorted({str(p.rel) for p in pages if names.count(p.name) > 1}):
        raise DocsError(f"{', '.join(dups)}: these notebooks would make the same page; rename one")
    for p in pages: p.process()
    link = Links({p.path.stem: p.name for p in pages})
    for p in pages:
        for e in p.entries: link.add(e)
    indexed = set()
    for p in pages:
        p.out_dir = proc
        md = p.markdown(link, indexed)
        if p.name == 'index':
            md += '\n' + fence(':hidden:\n:maxdepth: 2\n\n' + '\n'.join(q.name for q in pages[1:]), '{toctree}') + '\n'
        (proc / f"{p.name}.md").write_text(md, encoding='utf-8')
    return pages

def where_warned(text:str, pages:list[Page]) -> str:
    "Sphinx's warnings, each pointing at the notebook cell it comes from instead of a line of a MyST page."
    by_file = {p.name: p for p in pages}
    def cell(m):
        p = by_file.get(Path(m[1]).stem)
        c = p.cell_at(int(m[2])) if p else None
        return f"{where(p.rel, c)}:" if c is not None else m[0]
    return re.sub(r'^(\S+?\.md):(\d+):', cell, nbdev_procs._re_ansi_escape.sub('', text).strip(), flags=re.M)

def build(nbs:Path=ROOT/'nbs', out:Path=ROOT/'_docs', proc:Path=ROOT/'_proc', quiet:bool=True) -> list[Page]:
    "Build the site: notebooks -> MyST pages in `proc` -> HTML in `out`. A Sphinx warning fails the build."
    from sphinx.application import Sphinx
    from sphinx.util.docutils import docutils_namespace, patch_docutils
    pages = stage(Path(nbs), Path(proc))
    if Path(out).exists(): shutil.rmtree(out)
    warnings, conf = io.StringIO(), Path(__file__).parent
    with patch_docutils(conf), docutils_namespace():     # as sphinx-build does: each build starts from a clean docutils
        app = Sphinx(proc, conf, out, Path(proc) / '_doctrees', 'html', freshenv=True, warning=warnings,
                     status=None if quiet else sys.stdout)
        app.build()
    if app.statuscode or warnings.getvalue():
        raise DocsError(f"the site has problems:\n{where_warned(warnings.getvalue(), pages)}")
    (Path(out) / '.nojekyll').touch()
    return pages

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--nbs', type=Path, default=ROOT / 'nbs', help='folder of notebooks')
    ap.add_argument('--out', type=Path, default=ROOT / '_docs', help='where the site goes')
    ap.add_argument('--proc', type=Path, default=ROOT / '_proc', help='where the MyST pages go')
    ap.add_argument('-v', '--verbose', action='store_true', help="show Sphinx's progress")
    a = ap.parse_args(argv)
    t = time.time()
    try: pages = build(a.nbs, a.out, a.proc, quiet=not a.verbose)
    except DocsError as e: sys.exit(f"docs: {e}")
    print(f"docs: {len(pages)} pages in {a.out} ({time.time() - t:.1f} s)")

if __name__ == '__main__': main()
