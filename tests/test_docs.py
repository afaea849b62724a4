"""The docs site as a reader meets it: `make docs`' builder makes it, headless Chromium opens every page offline.

A page fails on a console error, a request that leaves the machine, a file it cannot load, an image or figure that does not
show, raw Quarto or show_doc syntax, unrendered math, or a link to a page or anchor that does not exist. A screenshot of each
page is saved in `_docs/_screenshots/`."""
import json, re, subprocess, sys, time
from pathlib import Path
from urllib.parse import unquote, urlparse
import pytest

ROOT = Path(__file__).parents[1]
DOCS, SHOTS = ROOT / '_docs', ROOT / '_docs' / '_screenshots'
sys.path.insert(0, str(ROOT / 'tools'))
import docs  # tools/docs.py: the builder under test

CHROMIUM = dict(executable_path='/usr/bin/chromium', args=['--headless', '--no-sandbox', '--disable-gpu',
                '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'])
SIDEBAR = docs.sidebar()
def _listed(es): return [x for e in es for x in (_listed(e['contents']) if isinstance(e, dict) else [e])]
PAGES = [docs.page_name(nb) for nb in _listed(SIDEBAR)]
# chapters whose point is a figure: each must show at least one
WITH_FIGURES = {'index.html', 'ascent.html', 'viz.html', 'paths.html', 'studies/ascent_vs_baselines.html'}
# Quarto's link attributes, fenced divs, class attributes and cell options; show_doc; a markdown link; TeX left as text
RAW = [r'\{target=', r'(?m)^:::', r'\{\.[\w-]+[ }]', r'(?m)^#\| ', r'show_doc\(', r'\]\(http', r'\$\$', r'\$\\', r'\\\(', r'<!--']


@pytest.fixture(scope='module')
def site():
    "The site, built as `make docs` builds it (the notebooks run first, `#| slow` cells skipped), and the build's outcome."
    start = time.perf_counter()
    build = subprocess.run([sys.executable, str(ROOT / 'tools' / 'docs.py')], cwd=ROOT, capture_output=True, text=True)
    print(build.stdout + f'docs built in {time.perf_counter() - start:.0f} s; screenshots in {SHOTS}')
    SHOTS.mkdir(parents=True, exist_ok=True)
    return DOCS, build


def test_docs_build(site):
    "`make docs` succeeds; where a notebook fails, its page says why and the others are still checked below."
    build = site[1]
    last = (build.stderr.strip().splitlines() or [f'exit status {build.returncode}'])[-1]  # the list of failed notebooks
    assert build.returncode == 0, last + '\n\n' + build.stderr[-6000:]


@pytest.fixture(scope='module')
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(**CHROMIUM)
        yield b
        b.close()


NOTEBOOKS = sorted(str(p.relative_to(ROOT / 'nbs')) for p in (ROOT / 'nbs').rglob('*.ipynb')
                   if '.ipynb_checkpoints' not in p.parts and not p.name.startswith('_'))


@pytest.mark.parametrize('nb', NOTEBOOKS)
def test_no_cell_mixes_imports_with_code(nb):
    "nbdev's docs processing runs every cell that imports: one that also computes fails there, or warns and runs out of order."
    import warnings
    from nbdev.process import NBProcessor
    from nbdev.processors import _do_eval
    bad = []
    for i, cell in enumerate(NBProcessor(ROOT / 'nbs' / nb).nb.cells):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            _do_eval(cell) if cell.cell_type == 'code' else None
        if caught: bad.append(f'cell {i}: {cell.source.splitlines()[0]!r}')
    assert not bad, f'{nb}: cells mixing imports with other code (move the imports to an import cell):\n' + '\n'.join(bad)


def test_every_notebook_is_a_page_in_the_sidebar(site):
    assert set(NOTEBOOKS) == set(_listed(SIDEBAR)), "_quarto.yml's sidebar must list every notebook once, in reading order"
    assert {str(p.relative_to(site[0])) for p in site[0].rglob('*.html')} == set(PAGES)


def _ids(path): return set(re.findall(r'\bid="([^"]+)"', path.read_text()))


@pytest.mark.parametrize('name', PAGES)
def test_page(site, browser, name):
    site, problems, outside = site[0], [], []
    ctx = browser.new_context(viewport=dict(width=1440, height=900))
    page = ctx.new_page()
    def route(r):
        if urlparse(r.request.url).scheme in ('file', 'data', 'blob'): return r.continue_()
        outside.append(r.request.url); r.abort()
    page.route('**/*', route)
    page.on('console', lambda m: m.type == 'error' and problems.append(f'console error: {m.text}'))
    page.on('pageerror', lambda e: problems.append(f'page error: {e}'))
    page.on('requestfailed', lambda r: r.url not in outside and problems.append(f'failed to load {r.url}'))
    page.goto((site / name).as_uri(), wait_until='load')
    if page.locator('.build-error').count(): problems.append(page.locator('.build-error').inner_text()[-3000:])
    n_figures = page.locator('.plotly-figure').count()
    try: page.wait_for_function("() => [...document.querySelectorAll('.plotly-figure')].every(d => d.querySelector('.main-svg'))",
                                timeout=30_000)
    except Exception: problems.append('a plotly figure was not drawn')
    page.wait_for_timeout(300)
    page.screenshot(path=SHOTS / (name.replace('/', '_').removesuffix('.html') + '.png'), full_page=True)
    broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src.slice(0, 80))")
    problems += [f'image not shown: {src}' for src in broken]
    if name in WITH_FIGURES and n_figures + len(page.locator('main img').all()) == 0: problems.append('no figure on the page')
    def text_without(selector): return page.evaluate(f"""(() => {{ const b = document.body.cloneNode(true);
        b.querySelectorAll('{selector}').forEach(e => e.remove()); return b.innerText; }})()""")
    text, prose = text_without('.highlight, :not(pre) > code'), text_without('.highlight, pre, code')  # code may say `#| slow`
    for pat, where in [(p, text) for p in RAW] + [('`', prose)]:
        for m in re.finditer(pat, where): problems.append(f'raw syntax {pat!r} in: {where[max(0, m.start() - 60):m.end() + 40]!r}')
    for href in page.evaluate("[...document.querySelectorAll('a[href]')].map(a => a.href)"):
        url = urlparse(href)
        if url.scheme in ('http', 'https'):
            if docs.SITE_URL.split('//')[1] in href: problems.append(f'link to the published site instead of this one: {href}')
            continue
        if url.scheme != 'file': continue
        target = Path(unquote(url.path))
        if not target.is_file(): problems.append(f'dead link: {href}')
        elif url.fragment and target.suffix == '.html' and unquote(url.fragment) not in _ids(target):
            problems.append(f'dead anchor: {href}')
    ctx.close()
    problems += [f'request to the network: {u}' for u in outside]
    assert not problems, f'{name}:\n' + '\n'.join(problems)


def test_sync_clears_outputs_and_keeps_sources(monkeypatch):
    "settings.ini's clear_all: `make sync` (nbdev_clean) removes what a JupyterLab session saved, and keeps the notebook."
    from nbdev.clean import _nbdev_clean
    nb = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())
    sources = [(c['cell_type'], c['source']) for c in nb['cells']]
    code = next(c for c in nb['cells'] if c['cell_type'] == 'code')
    code.update(execution_count=3, metadata={'scrolled': True},
                outputs=[dict(output_type='display_data', metadata={}, data={'text/plain': ['a figure']})])
    md = next(c for c in nb['cells'] if c['cell_type'] == 'markdown')
    md['attachments'] = {'a.png': {'image/png': 'iVBORw0KGgo='}}
    monkeypatch.chdir(ROOT)  # settings.ini's clear_all
    _nbdev_clean(nb)
    assert all(c.get('outputs', []) == [] and c.get('execution_count') is None for c in nb['cells'])
    assert code['metadata'] == {}
    assert [(c['cell_type'], c['source']) for c in nb['cells']] == sources
    assert md['attachments'] == {'a.png': {'image/png': 'iVBORw0KGgo='}}


def test_readme_is_generated_from_the_start_notebook(tmp_path):
    "README.md is what `make sync` makes of nbs/index.ipynb, and it starts with the two commands."
    readme = (ROOT / 'README.md').read_text()
    docs.readme(ROOT / 'nbs' / 'index.ipynb', tmp_path / 'README.md')
    assert (tmp_path / 'README.md').read_text() == readme, 'README.md is stale: run `make sync`'
    first_block = re.search(r'```sh\n(.*?)```', readme, re.S)[1]
    assert 'make lab' in first_block and 'make test' in first_block
    for needed in ['token', 'PORT=', 'ssh -L', 'pip install', 'make sync', 'make docs', 'tests/']: assert needed in readme
