"""The workbench in a real browser: JupyterLab and Voila serve the app notebook, headless Chromium (Playwright) runs it, drags the
temperature slider with the mouse, picks another target and a path, steps along it, and fails on any console error or error
output. Screenshots go to a folder this test prints."""
import json, os, shutil, socket, subprocess, sys, tempfile, time
from contextlib import contextmanager
from pathlib import Path
import pytest
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
APP = ROOT / 'nbs' / '_app.ipynb'
CHROMIUM = '/usr/bin/chromium'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
         '--disable-sync', '--no-first-run']
TOKEN = 'workbench-test'
SHOTS = Path(tempfile.mkdtemp(prefix='workbench-screenshots-'))
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f'no Chromium at {CHROMIUM} (apt-get install chromium)')

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

@contextmanager
def server(args, port, cwd, env, timeout=90):
    "Start a server, wait until it listens on `port`, yield; always kill it (and its kernels) at the end."
    log = open(cwd / 'server.log', 'wb')
    proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.monotonic()
        while True:
            if proc.poll() is not None: raise RuntimeError(f'{args[0]} exited with {proc.returncode}: {(cwd / "server.log").read_text()[-3000:]}')
            try:
                socket.create_connection(('127.0.0.1', port), timeout=2).close(); break
            except OSError:
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f'{args[0]} did not listen on port {port} within {timeout} s: {(cwd / "server.log").read_text()[-3000:]}')
                time.sleep(0.5)
        yield
    finally:
        os.killpg(proc.pid, 15)  # the server's own process group: the server and the kernels it started
        try: proc.wait(10)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, 9); proc.wait()
        log.close()

@pytest.fixture
def workdir(tmp_path):
    "A temp copy of the app notebook (a test never writes the source), and a JupyterLab settings folder without news."
    shutil.copy(APP, tmp_path / 'workbench.ipynb')
    settings = tmp_path / 'lab-settings' / '@jupyterlab' / 'apputils-extension'
    settings.mkdir(parents=True)
    (settings / 'notification.jupyterlab-settings').write_text(json.dumps({'fetchNews': 'false'}))
    return tmp_path

@pytest.fixture
def page():
    "A fresh headless Chromium page that records console errors and page errors."
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            pg = browser.new_page(viewport={'width': 1500, 'height': 1000})
            pg.errors = []
            pg.on('console', lambda m: m.type == 'error' and pg.errors.append(f'console: {m.text}'))
            pg.on('pageerror', lambda e: pg.errors.append(f'page error: {e}'))
            # Voila's page links Font Awesome from a CDN although its own bundle carries it (5.15.4): offline that link
            # fails with a console error and nothing looks different. Serve those two style sheets empty; all else is checked.
            pg.route('https://cdn.jsdelivr.net/npm/@fortawesome/**', lambda route: route.fulfill(content_type='text/css', body=''))
            yield pg
        finally: browser.close()

# each view's element is its plotly graph div: `.data` and `.layout` are what the page shows
def heatmap(page):
    "The pullback view's first heatmap, as the plotly graph div in the page holds it, and the view's title."
    return page.evaluate("""() => {
        const d = document.querySelector('.ew-pullback-view .js-plotly-plot');
        const h = d.data.find(t => t.type === 'heatmap');
        return [JSON.stringify(h.z), d.layout.title.text];
    }""")

def wait_for(page, what, js, arg=None, timeout=180):
    "Wait until `js` is true in the page, failing with `what` and the workbench's message."
    try: page.wait_for_function(js, arg=arg, timeout=timeout * 1000)
    except Exception as e:
        message = page.evaluate("() => document.querySelector('.ew-message')?.innerText || ''")
        page.screenshot(path=SHOTS / 'timeout.png')
        raise AssertionError(f'timed out after {timeout} s waiting for {what}; workbench message: {message!r}; '
                             f'page errors: {page.errors}; screenshot {SHOTS / "timeout.png"}') from e

READY = "() => document.querySelector('.ew-status')?.innerText.trim() === 'ready'"
VIEWS = ('pullback-view', 'temperature-view', 'ascent-view', 'path-view')

def drive(page, name):
    "What a person does: wait for the views, drag T, pick a target, a path, step along it; screenshots along the way."
    print(f'\nscreenshots of the {name} test: {SHOTS}')
    wait_for(page, 'the four views', """() => ['pullback', 'temperature', 'ascent', 'path'].every(v => {
        const d = document.querySelector(`.ew-${v}-view .js-plotly-plot`); return d && d.data && d.data.length > 0 })""")
    wait_for(page, 'the worker to be idle', READY)
    for v in VIEWS: page.locator(f'.ew-{v}').screenshot(path=SHOTS / f'{name}_{v}.png')
    page.evaluate("() => document.querySelector('.ew-workbench').scrollIntoView()")
    page.screenshot(path=SHOTS / f'{name}_top.png')  # the controls and the first view
    before, title = heatmap(page)
    # drag the temperature slider's handle to the right with the mouse
    handle = page.locator('.ew-temperature .noUi-handle')
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box['x'] + box['width'] / 2, box['y'] + box['height'] / 2
    page.mouse.move(x, y); page.mouse.down(); page.mouse.move(x + 60, y, steps=8); page.mouse.up()
    wait_for(page, 'the heatmap to change after the drag', """old => {
        const d = document.querySelector('.ew-pullback-view .js-plotly-plot');
        return JSON.stringify(d.data.find(t => t.type === 'heatmap').z) !== old }""", before)
    after, new_title = heatmap(page)
    assert after != before and new_title != title, (title, new_title)
    wait_for(page, 'the worker to be idle', READY)
    page.locator('.ew-pullback-view').screenshot(path=SHOTS / f'{name}_pullback-view-dragged.png')
    # another target: the second entry of the list (the second most likely class)
    page.locator('.ew-target select').select_option(index=1)
    wait_for(page, 'the pullback view to explain the new target', """old => {
        const d = document.querySelector('.ew-pullback-view .js-plotly-plot'); return d.layout.title.text !== old }""", new_title)
    wait_for(page, 'the worker to be idle', READY)
    # a path, then a step along it
    page.locator('.ew-path select').select_option(index=1)
    wait_for(page, 'the path view at node 1', """() => {
        const d = document.querySelector('.ew-path-view .js-plotly-plot'); return d.layout.title.text.startsWith('node 1 of') }""")
    page.locator('button.ew-next').click()
    wait_for(page, 'the path view at node 2', """() => {
        const d = document.querySelector('.ew-path-view .js-plotly-plot'); return d.layout.title.text.startsWith('node 2 of') }""")
    wait_for(page, 'the worker to be idle', READY)
    page.locator('.ew-path-view').screenshot(path=SHOTS / f'{name}_path-view-node2.png')
    page.screenshot(path=SHOTS / f'{name}_page.png', full_page=True)
    assert page.evaluate("() => document.querySelector('.ew-message').innerText.trim()") == ''
    assert page.errors == [], page.errors

def test_jupyterlab(workdir, page):
    port = free_port()
    url = f'http://127.0.0.1:{port}'
    args = [str(BIN / 'jupyter'), 'lab', '--no-browser', '--ip=127.0.0.1', f'--port={port}', f'--IdentityProvider.token={TOKEN}',
            '--LabApp.expose_app_in_browser=True', '--LabApp.news_url=None',
            '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate', f'--ServerApp.root_dir={workdir}']
    if os.geteuid() == 0: args.append('--allow-root')
    env = {'JUPYTERLAB_SETTINGS_DIR': str(workdir / 'lab-settings'), 'JUPYTERLAB_WORKSPACES_DIR': str(workdir / 'workspaces'),
           'WORKBENCH_MODEL': 'fer-emotion'}
    with server(args, port, workdir, env):
        page.goto(f'{url}/lab/tree/workbench.ipynb?token={TOKEN}')
        wait_for(page, 'JupyterLab', '() => window.jupyterapp !== undefined', timeout=120)
        page.evaluate("""async () => {  // Run > Run All by menu is flaky; the command, once the kernel is ready, is not
            const app = window.jupyterapp; await app.started; await app.restored;
            let panel = app.shell.currentWidget;
            for (let i = 0; i < 200 && !(panel && panel.sessionContext); i++) {
                await new Promise(r => setTimeout(r, 250)); panel = app.shell.currentWidget }
            await panel.context.ready; await panel.sessionContext.ready;
            await panel.sessionContext.session.kernel.info;
            await app.commands.execute('notebook:run-all-cells');
        }""")
        drive(page, 'jupyterlab')
        errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        assert errors.count() == 0, errors.all_inner_texts()

@pytest.mark.parametrize('model', ['fer-emotion', 'fashion-vit'])  # a ReLU CNN, and a Vision Transformer (GELU, attention, LayerNorm)
def test_voila(workdir, page, model):
    port = free_port()
    url = f'http://127.0.0.1:{port}'
    args = [str(BIN / 'voila'), 'workbench.ipynb', '--no-browser', '--Voila.ip=127.0.0.1', f'--port={port}', f'--token={TOKEN}']
    with server(args, port, workdir, {'WORKBENCH_MODEL': model}):
        page.goto(f'{url}/?token={TOKEN}', timeout=180_000)
        drive(page, f'voila-{model}')
        errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        assert errors.count() == 0, errors.all_inner_texts()
