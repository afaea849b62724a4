"""Build the docs site into `_docs/`, and README.md from `nbs/index.ipynb`.

    python tools/docs.py          # the site: `nbdev_docs` where Quarto is installed, else the same pages without it
    python tools/docs.py readme   # README.md

Output policy: the notebooks in `nbs/` carry no outputs (`make sync` clears them). The site is built from copies that this
script executes first, as the tests do (cells flagged `#| slow` are skipped and say so on the page). Without Quarto, nbdev's
own processing (`show_doc`, hidden and exported cells, links) runs on those copies, pandoc turns their markdown into HTML
with MathML, and plotly figures are drawn by the plotly.js that ships in the plotly wheel: nothing is loaded from the network.
This is a tool for working on the project, not part of the package, so it lives outside it.
"""
import html, json, os, re, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS, DOCS = ROOT / 'nbs', ROOT / '_docs'
EXEC, PROC = ROOT / '_build' / 'run', ROOT / '_build' / 'proc'  # executed notebooks, then processed ones
SITE_URL = 'https://excitation-workbench.github.io/excitation-workbench/'  # settings.ini doc_host + doc_baseurl
_ANSI = re.compile(r'\x1b\[[0-9;]*m')
NOT_RUN = ('<p class="not-run">Not run for the docs (a <code>#| slow</code> cell): run it in JupyterLab, or the tests with '
           '<code>RUN_SLOW=1</code>.</p>')


def _flags(cell):
    "The nbdev and Quarto directives of a cell, left in its source."
    from fastcore.basics import AttrDict
    from nbdev.process import extract_directives
    return extract_directives(AttrDict(source=cell.source), remove=False) if cell.cell_type == 'code' else {}


def _slow(cell): return 'slow' in _flags(cell)
def _skip(cell): return cell.cell_type != 'code' or _slow(cell) or _flags(cell).get('eval:', [''])[0].lower() == 'false'


def execute(src=NBS, dst=EXEC):
    "Copy `src` to `dst` and run every notebook there, saving its outputs (`#| slow` cells skipped); returns the failures."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_*', '*.yml'))
    os.environ['IN_TEST'] = '1'  # as under nbdev_test and the notebook tests
    # figures as plotly JSON, which site() draws with one local plotly.js; Quarto gets HTML with plotly.js inlined too
    renderer = 'plotly_mimetype+notebook' if shutil.which('quarto') else 'plotly_mimetype'
    failed = {}
    for fn in sorted(dst.rglob('*.ipynb')):
        start = time.perf_counter()
        nb = read_nb(fn)
        shell = CaptureShell(fn)
        shell.run_cell(f"import plotly.io\nplotly.io.renderers.default = '{renderer}'")
        for i, cell in enumerate(nb.cells): cell.idx_ = i
        cwd = Path.cwd()
        os.chdir(fn.parent)
        try: shell.run_all(nb, exc_stop=True, preproc=_skip)
        except Exception:
            failed[str(fn.relative_to(dst))] = f'failed while running:\n{_ANSI.sub("", shell.prettytb(fname=fn))}'
            fn.unlink(); continue
        finally: os.chdir(cwd)
        for cell in nb.cells:
            if _slow(cell): cell['outputs'] = [dict(output_type='display_data', metadata={}, data={'text/html': NOT_RUN})]
        write_nb(nb, fn)
        print(f'ran {fn.relative_to(dst)} in {time.perf_counter() - start:.0f} s', flush=True)
    return failed


def _process(job):
    "nbdev's docs processing of one notebook; the error, if it fails."
    import nbdev.serve_drv, traceback
    try: nbdev.serve_drv.main(job)
    except Exception: return f'failed in nbdev\'s docs processing (what nbdev_proc_nbs does):\n{traceback.format_exc()}'


def process():
    "nbdev's processing for the docs of the executed notebooks, into `PROC`; returns the failures."
    from fastcore.parallel import parallel
    from nbdev.processors import FilterDefaults
    shutil.rmtree(PROC, ignore_errors=True)
    jobs = [(nb, PROC / nb.relative_to(EXEC), FilterDefaults) for nb in sorted(EXEC.rglob('*.ipynb'))]
    for _, dst, _ in jobs: dst.parent.mkdir(parents=True, exist_ok=True)
    errors = parallel(_process, jobs, n_workers=2, method='spawn')  # its own folder: nbdev_proc_nbs may run meanwhile
    return {str(src.relative_to(EXEC)): e for (src, _, _), e in zip(jobs, errors) if e}


# ---------------------------------------------------------------------------------------------------------------------
# The site without Quarto

def page_name(nb_path):
    "The page Quarto makes of a notebook: `01_gates.ipynb` -> `gates.html` (numeric prefixes go, as nbdev's links expect)."
    p = Path(nb_path)
    return str(p.with_name(re.sub(r'^\d+[a-z]?_', '', p.stem) + '.html'))


def _frontmatter(nb):
    "The title and description that nbdev put in the notebook's front matter."
    import yaml
    for cell in nb['cells']:
        src = ''.join(cell['source'])
        if cell['cell_type'] == 'raw' and src.startswith('---'): return yaml.safe_load(src.strip().strip('-')) or {}
    return {}


def _directives(source):
    "Quarto's `#| key: value` lines at the top of a cell, and the code after them."
    opts, lines = {}, source.splitlines()
    while lines and (m := re.match(r'#\|\s*([\w-]+):\s*(.*)$', lines[0])):
        opts[m[1]] = m[2].strip().strip('"'); lines.pop(0)
    return opts, '\n'.join(lines)


def _raw(text):
    "`text` as a raw HTML block in pandoc's markdown."
    fence = '`' * max(3, 1 + max((len(m) for m in re.findall(r'`+', text)), default=0))
    return f'\n{fence}{{=html}}\n{text}\n{fence}\n'


def _code_html(source):
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    return highlight(source, PythonLexer(), HtmlFormatter(cssclass='highlight'))


def _join(v): return ''.join(v) if isinstance(v, list) else v
def _inline(text): return re.sub(r'`([^`]+)`', r'<code>\1</code>', html.escape(text))  # a title's `code`


class _Figures:
    "Numbers the plotly figures of a page."
    def __init__(self): self.n = 0
    def __call__(self, fig):
        self.n += 1
        spec = json.dumps(dict(data=fig.get('data', []), layout=fig.get('layout', {}),
                               config=dict(fig.get('config', {}), displaylogo=False, responsive=True)))
        spec = spec.replace('</', '<\\/')
        return (f'<div class="plotly-figure" id="figure-{self.n}"></div>\n<script>(function(){{const f = {spec};'
                f'Plotly.newPlot("figure-{self.n}", f.data, f.layout, f.config);}})();</script>')


def _output(out, figures, asis):
    "One cell output as markdown (raw HTML blocks for what pandoc should leave alone)."
    kind = out['output_type']
    if kind == 'stream':
        return _raw(f'<pre class="output {out["name"]}">{html.escape(_join(out["text"]))}</pre>')
    if kind == 'error': raise ValueError(f'an error output reached the docs: {out["ename"]}')
    data = out.get('data', {})
    if 'application/vnd.plotly.v1+json' in data: return _raw(figures(data['application/vnd.plotly.v1+json']))
    if 'application/vnd.jupyter.widget-view+json' in data:
        return _raw('<p class="widget-note">An interactive widget: it runs in JupyterLab (<code>make lab</code>).</p>')
    if 'text/markdown' in data:  # show_doc's signature is a code block: links nbdev put in it would show raw
        md = re.sub(r'\[`([^`\]]+)`\]\([^)\s]+\)', r'\1', _join(data['text/markdown']))
        return '\n' + md + '\n' if asis else _raw(f'<div class="output">{_pandoc(md)}</div>')
    if 'text/html' in data: return _raw(f'<div class="output">{_join(data["text/html"])}</div>')
    for mime in ('image/png', 'image/jpeg'):
        if mime in data: return _raw(f'<img class="output" src="data:{mime};base64,{_join(data[mime]).strip()}" alt="figure">')
    if 'image/svg+xml' in data: return _raw(f'<div class="output">{_join(data["image/svg+xml"])}</div>')
    if 'text/latex' in data: return '\n' + _join(data['text/latex']) + '\n'
    if 'text/plain' in data: return _raw(f'<pre class="output">{html.escape(_join(data["text/plain"]))}</pre>')
    return ''


def _pandoc(md):
    "Markdown (Quarto's flavour: link attributes, fenced divs, $math$) as HTML, math as MathML."
    r = subprocess.run(['pandoc', '-f', 'markdown-smart', '-t', 'html5', '--mathml', '--no-highlight', '--wrap=none'],
                       input=md, capture_output=True, text=True, check=True)
    return r.stdout


def _body(nb):
    "The HTML of a processed notebook's cells."
    figures, parts = _Figures(), []
    for cell in nb['cells']:
        src = _join(cell['source'])
        if cell['cell_type'] == 'markdown': parts.append('\n' + src + '\n')
        if cell['cell_type'] != 'code': continue
        opts, code = _directives(src)
        if opts.get('include') == 'false': continue
        block = []
        if opts.get('echo') != 'false' and code.strip():
            if 'code-fold' in opts:
                summary = html.escape(opts.get('code-summary', 'Code'))
                block.append(f'<details class="code-fold"{" open" if opts["code-fold"] == "show" else ""}>'
                             f'<summary>{summary}</summary>{_code_html(code)}</details>')
            else: block.append(_code_html(code))
        parts.append(_raw('<div class="cell">' + ''.join(block)))
        parts += [_output(o, figures, opts.get('output') == 'asis') for o in cell.get('outputs', [])]
        parts.append(_raw('</div>'))
    return _pandoc(''.join(parts)), figures.n


def _relink(page_html, depth):
    "Links to notebooks and to the published site become links between the pages here."
    up = '../' * depth
    page_html = page_html.replace(f'href="{SITE_URL}', f'href="{up}')
    return re.sub(r'href="([^":#]+)\.ipynb(#[^"]*)?"', lambda m: f'href="{page_name(m[1] + ".ipynb")}{m[2] or ""}"', page_html)


def _sidebar(entries, titles, current, up):
    "The sidebar's HTML."
    items = []
    for e in entries:
        if isinstance(e, dict):
            items.append(f'<li class="section"><span>{html.escape(e["section"].capitalize())}</span>'
                         f'{_sidebar(e["contents"], titles, current, up)}</li>')
        else:
            cls = ' class="current"' if e == current else ''
            items.append(f'<li><a{cls} href="{up}{page_name(e)}">{_inline(titles[e])}</a></li>')
    return '<ul>' + ''.join(items) + '</ul>'


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{plain_title} - {site}</title><link rel="stylesheet" href="{up}_static/site.css">{scripts}</head>
<body><nav class="sidebar"><a class="site" href="{up}index.html">{site}</a>{sidebar}</nav>
<main><header><h1 class="title">{title}</h1>{description}</header>
{body}</main></body></html>
"""


def sidebar():
    "The sidebar's entries, in reading order, from `_quarto.yml`: notebook paths, and sections with their own."
    import yaml
    return yaml.safe_load((ROOT / '_quarto.yml').read_text())['website']['sidebar']['contents']


def site(failed=None):
    "The site from the processed notebooks into `_docs/`: one page per notebook (or its error), the sidebar, local scripts."
    import plotly
    from pygments.formatters import HtmlFormatter
    shutil.rmtree(DOCS, ignore_errors=True)
    (DOCS / '_static').mkdir(parents=True)
    shutil.copy(Path(plotly.__file__).parent / 'package_data' / 'plotly.min.js', DOCS / '_static')
    css = (Path(__file__).parent / 'docs.css').read_text() + HtmlFormatter().get_style_defs('.highlight')
    (DOCS / '_static' / 'site.css').write_text(css)
    entries = sidebar()
    nbs = {str(p.relative_to(PROC)): json.loads(p.read_text()) for p in sorted(PROC.rglob('*.ipynb'))}
    error = '<div class="build-error"><p>This page failed to build: {}</p><pre>{}</pre></div>'
    for name, err in (failed or {}).items():  # a page that says what went wrong, in place of the chapter
        head, _, tail = err.partition('\n')
        nbs[name] = dict(cells=[dict(cell_type='code', source='#| echo: false', outputs=[dict(output_type='display_data',
                         data={'text/html': error.format(html.escape(head), html.escape(tail))})])])
    titles = {k: _frontmatter(nb).get('title', Path(k).stem) for k, nb in nbs.items()}
    def listed(es): return [x for e in es for x in (listed(e['contents']) if isinstance(e, dict) else [e])]
    missing = set(listed(entries)) - set(nbs)
    if missing: sys.exit(f"_quarto.yml's sidebar lists notebooks that do not exist: {sorted(missing)}")
    for name, nb in nbs.items():
        fm, depth = _frontmatter(nb), name.count('/')
        up = '../' * depth
        body, n_figures = _body(nb)
        description = f'<p class="description">{_inline(fm["description"])}</p>' if fm.get('description') else ''
        scripts = f'<script src="{up}_static/plotly.min.js"></script>' if n_figures else ''
        page = PAGE.format(title=_inline(titles[name]), plain_title=html.escape(titles[name].replace('`', '')),
                           site='excitation-workbench', up=up, scripts=scripts, sidebar=_sidebar(entries, titles, name, up),
                           description=description, body=_relink(body, depth))
        out = DOCS / page_name(name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page)
    for f in EXEC.rglob('*'):  # images and other files the pages reference
        if f.is_file() and f.suffix != '.ipynb':
            (DOCS / f.relative_to(EXEC)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, DOCS / f.relative_to(EXEC))
    print(f'{len(nbs)} pages in {DOCS}')


def docs():
    "The site: `nbdev_docs` over the executed notebooks where Quarto is installed, else `site()`."
    failed = execute()
    if shutil.which('quarto') and not failed:
        shutil.copy(ROOT / '_quarto.yml', EXEC)
        subprocess.run([Path(sys.executable).parent / 'nbdev_docs', '--path', EXEC], check=True, cwd=ROOT)
        readme()  # nbdev_docs also renders README.md with Quarto; `make sync`'s own stays the one in the repository
    elif not shutil.which('quarto'):
        failed |= process()
        site(failed)
    if failed: sys.exit('\n\n'.join(f'{name} {err}' for name, err in failed.items()) + f'\n\nfailed: {", ".join(failed)}')


# ---------------------------------------------------------------------------------------------------------------------
# README

def readme(nb_path=NBS / 'index.ipynb', out=ROOT / 'README.md'):
    "README.md from the start notebook: its markdown, and its code cells as python blocks (outputs left out)."
    from fastcore.basics import AttrDict
    from nbdev.process import extract_directives
    parts = ['<!-- Generated from nbs/index.ipynb by `make sync`: edit the notebook, not this file. -->']
    for cell in json.loads(Path(nb_path).read_text())['cells']:
        cell = AttrDict(cell, source=_join(cell['source']))
        if cell.cell_type == 'markdown':  # images next to the notebook are under nbs/ from the README's place
            parts.append(re.sub(r'(!\[[^\]]*\]\()(?!https?:|/)', r'\1nbs/', cell.source.strip()))
        if cell.cell_type != 'code' or extract_directives(cell).keys() & {'hide', 'export', 'exporti'}: continue
        if cell.source.strip(): parts.append(f"```python\n{cell.source.strip()}\n```")
    Path(out).write_text('\n\n'.join(parts) + '\n')


if __name__ == '__main__':
    import docs as module  # run as the module `docs`: IPython takes `__main__` over, and spawned workers must find `_process`
    {'readme': module.readme, 'site': module.docs}[sys.argv[1] if len(sys.argv) > 1 else 'site']()
