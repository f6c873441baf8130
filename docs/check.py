"""Open the built site in headless Chromium and fail on what a reader would hit.

Every page of `_docs/` is served on 127.0.0.1 and loaded in Chromium, driven over the DevTools protocol. The check fails
on a page that does not load, a JavaScript error or console error, a broken image, an internal link to a missing page
or anchor, more than one search box on view, a search that finds nothing, or a public name of `weightdrop.__all__`
without an API entry. It saves screenshots of the front page and an API page into `_docs/_screenshots/`.

    python docs/check.py [--site _docs] [--chromium /usr/bin/chromium]
"""
from __future__ import annotations
import argparse, base64, contextlib, functools, http.server, itertools, json, re, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path
from urllib.parse import urldefrag, urlparse
from urllib.request import urlopen

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
LIB = 'weightdrop'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--hide-scrollbars', '--remote-debugging-port=0']
SCREENSHOTS = {'index.html': ('front.png', None), 'dropout.html': ('api-dropout.png', 'dl.py')}   # page: (file, scrolled to)

class Chromium:
    "A headless Chromium with a fresh profile, and one tab driven over the DevTools protocol."
    def __init__(self, exe:str, timeout:float=30):
        self.profile = tempfile.mkdtemp(prefix='wd-chromium-')
        self.proc = subprocess.Popen([exe, *FLAGS, f'--user-data-dir={self.profile}', 'about:blank'],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, t = Path(self.profile) / 'DevToolsActivePort', time.time()
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() - t > timeout:
                self.close(); raise RuntimeError(f"{exe} did not start (exit code {self.proc.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        ws = json.load(urlopen(f'http://127.0.0.1:{port}/json/version', timeout=timeout))['webSocketDebuggerUrl']
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(ws, max_size=None, open_timeout=timeout))
        self.ids, self.events, self.timeout = itertools.count(1), [], timeout
        target = self.send('Target.createTarget', url='about:blank')['targetId']
        self.session = self.send('Target.attachToTarget', targetId=target, flatten=True)['sessionId']
        for domain in ('Page', 'Runtime', 'Log', 'Network'): self.send(f'{domain}.enable', session=True)
        self.send('Emulation.setDeviceMetricsOverride', width=1280, height=1000, deviceScaleFactor=1, mobile=False, session=True)

    def send(self, method, session=False, **params):
        "Send one command and wait for its answer; events that arrive meanwhile are kept in `self.events`."
        i = next(self.ids)
        msg = {'id': i, 'method': method, 'params': params}
        if session: msg['sessionId'] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            r = json.loads(self.ws.recv(timeout=self.timeout))
            if r.get('id') == i:
                if 'error' in r: raise RuntimeError(f"{method}: {r['error']}")
                return r.get('result', {})
            self.events.append(r)

    def wait_for(self, event, timeout):
        t = time.time()
        while time.time() - t < timeout:
            if any(e.get('method') == event for e in self.events): return True
            try: self.events.append(json.loads(self.ws.recv(timeout=0.2)))
            except TimeoutError: pass
        return False

    def js(self, expr):
        r = self.send('Runtime.evaluate', session=True, expression=expr, returnByValue=True, awaitPromise=True)
        if 'exceptionDetails' in r: raise RuntimeError(f"{expr[:60]}...: {r['exceptionDetails']}")
        return r['result'].get('value')

    def open(self, url) -> list[str]:
        "Load `url`; return the problems the page reported while loading (errors, failed requests)."
        self.events = []
        nav = self.send('Page.navigate', session=True, url=url)
        if nav.get('errorText'): return [f"does not load: {nav['errorText']}"]
        if not self.wait_for('Page.loadEventFired', self.timeout): return ['did not finish loading']
        self.js('new Promise(r => setTimeout(r, 100))')          # let scripts run after the load event
        problems = []
        for e in self.events:
            m, p = e.get('method'), e.get('params', {})
            if m == 'Runtime.exceptionThrown':
                d = p['exceptionDetails']
                problems.append(f"JavaScript error: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == 'Runtime.consoleAPICalled' and p.get('type') in ('error', 'assert'):
                problems.append('console error: ' + ' '.join(str(a.get('value', a.get('description', ''))) for a in p.get('args', [])))
            elif m == 'Log.entryAdded' and p['entry'].get('level') == 'error':
                problems.append(f"console error: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
            elif m == 'Network.responseReceived' and p['response']['status'] >= 400:
                problems.append(f"HTTP {p['response']['status']} for {p['response']['url']}")
            elif m == 'Network.loadingFailed' and not p.get('canceled'):
                problems.append(f"request failed: {p.get('errorText')}")
        return problems

    def screenshot(self, path:Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send('Page.captureScreenshot', session=True, format='png')['data']))

    def close(self):
        if hasattr(self, 'stack'): self.stack.close()
        self.proc.terminate()
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

class Server:
    "The site over HTTP on 127.0.0.1, as a reader gets it."
    def __init__(self, site:Path):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *a): pass
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(site)))
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    def close(self): self.httpd.shutdown(); self.httpd.server_close()

PAGE_FACTS = """(() => ({
  broken_images: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src')),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  ids: [...document.querySelectorAll('[id]')].map(e => e.id),
  api: [...document.querySelectorAll('dl.py > dt[id]')].map(e => e.id),
  title: document.title,
  search_boxes: [...document.querySelectorAll('.search-button-field')].filter(e => e.getClientRects().length > 0).length,
}))()"""

def public_names() -> list[str]:
    import weightdrop
    return list(weightdrop.__all__)

def check(site:Path, exe:str, names:list[str]|None=None, shots:Path|None=None, search:str='WeightDropout') -> list[str]:
    "Every problem found on the site at `site`, as `page: problem` lines; an empty list when it is sound."
    site = Path(site)
    pages = sorted(str(p.relative_to(site)) for p in site.rglob('*.html') if p.relative_to(site).parts[0] != '_static')
    server, browser = Server(site), Chromium(exe)
    problems, facts = [], {}
    try:
        for page in pages:
            problems += [f"{page}: {p}" for p in browser.open(server.url + page)]
            facts[page] = browser.js(PAGE_FACTS)
            problems += [f"{page}: broken image {src}" for src in facts[page]['broken_images']]
            if facts[page]['search_boxes'] > 1: problems.append(f"{page}: {facts[page]['search_boxes']} search boxes on view")
            if shots and page in SCREENSHOTS:
                name, selector = SCREENSHOTS[page]
                if selector: browser.js(f"document.querySelector({selector!r}).scrollIntoView()")
                browser.screenshot(shots / name)
        problems += [f"search.html: {p}" for p in browser.open(server.url + f'search.html?q={search}')]
        found = browser.js("""new Promise(r => { let n = 0; const t = setInterval(() => {
            const hits = [...document.querySelectorAll('#search-results a')].map(a => a.href);
            if (hits.length || ++n > 100) { clearInterval(t); r(hits); } }, 100); })""")
        if not any(re.search(rf'#{LIB}\.\w+\.{search}$', h) for h in found or []):
            problems.append(f"search.html: searching {search} does not find its API entry (found {found})")
    finally:
        browser.close(); server.close()
    for page, f in facts.items():
        for link in f['links']:
            if not link.startswith(server.url): continue
            target, anchor = urldefrag(link[len(server.url):])
            target = urlparse(target).path or page
            if target.endswith('/'): target += 'index.html'
            if target not in facts and not (site / target).exists(): problems.append(f"{page}: link to missing page {target}")
            elif anchor and target in facts and anchor not in facts[target]['ids']:
                problems.append(f"{page}: link to missing anchor {target}#{anchor}")
    api = {i for f in facts.values() for i in f['api']}
    for n in names or []:
        if not any(re.fullmatch(rf'{LIB}\.\w+\.{re.escape(n)}', i) for i in api):
            problems.append(f"no API entry for weightdrop.{n}")
    return problems

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--site', type=Path, default=ROOT / '_docs')
    ap.add_argument('--chromium', default=shutil.which('chromium') or '/usr/bin/chromium')
    a = ap.parse_args(argv)
    if not (a.site / 'index.html').exists(): sys.exit(f"docs check: no site at {a.site}; build it first")
    t = time.time()
    problems = check(a.site, a.chromium, public_names(), a.site / '_screenshots')
    n = len([p for p in a.site.rglob('*.html') if p.relative_to(a.site).parts[0] != '_static'])
    for p in problems: print(f"docs check: {p}")
    if problems: sys.exit(f"docs check: FAIL, {len(problems)} problems on {n} pages")
    print(f"docs check: {n} pages open in Chromium with no errors, broken images or broken links; "
          f"every public name has an API entry ({time.time() - t:.1f} s); screenshots in {a.site / '_screenshots'}")

if __name__ == '__main__': main()
