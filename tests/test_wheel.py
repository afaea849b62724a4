"""The package as people install it: the wheel, its contents and metadata, and the README's example run from it.

The wheel goes into a fresh venv that sees this environment's packages through a .pth file (torch is not downloaded twice)
and is installed with `--no-index`, so nothing is downloaded; the example must then import the wheel's copy of the package,
not this checkout."""
import ast, json, re, shutil, subprocess, sys, sysconfig, time, zipfile
from email.parser import Parser
from importlib.metadata import packages_distributions
from pathlib import Path
import pytest

ROOT = Path(__file__).parents[1]
LIB = 'excitation_workbench'
# run the example in a network namespace of its own, with no network at all, where the machine allows it
OFFLINE = ['unshare', '-rn'] if shutil.which('unshare') and subprocess.run(['unshare', '-rn', 'true']).returncode == 0 else []


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    "The wheel, built from a copy of what the build reads (a stale build/ in the checkout would slip old files in)."
    src, out = tmp_path_factory.mktemp('src'), tmp_path_factory.mktemp('dist')
    for f in ['setup.py', 'settings.ini', 'pyproject.toml', 'README.md', 'LICENSE']: shutil.copy(ROOT / f, src)
    shutil.copytree(ROOT / LIB, src / LIB, ignore=shutil.ignore_patterns('__pycache__'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q',
                    '-w', out, src], check=True)
    return next(out.glob('*.whl'))


def _metadata(whl):
    with zipfile.ZipFile(whl) as z: return Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith('/METADATA'))).decode())


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.name for p in (ROOT / LIB).glob('*.py')}
    assert {n.split('/')[-1] for n in names if re.fullmatch(rf'{LIB}/[^/]+\.py', n)} == modules
    shipped = {p.name for p in (ROOT / LIB / 'data').iterdir()} - {'fer_keras_fixture.pt'}  # a test fixture, not shipped
    assert {n.split('/')[-1] for n in names if n.startswith(f'{LIB}/data/')} == shipped
    assert f'{LIB}/data/FER_LICENSE.txt' in names and any(n.endswith('.dist-info/licenses/LICENSE') for n in names)
    assert not any(n.startswith(('tests/', 'tools/', 'nbs/')) for n in names)


def test_wheel_metadata(wheel):
    meta = _metadata(wheel)
    assert meta['Summary'].startswith('See what a ReLU network sees') and meta['License'] == 'Apache-2.0'
    assert 'License :: OSI Approved :: Apache Software License' in meta.get_all('Classifier')
    assert meta['Description-Content-Type'] == 'text/markdown' and 'make lab' in meta.get_payload()
    assert meta['Provides-Extra'] == 'dev'
    requires = meta.get_all('Requires-Dist')
    assert any(r.startswith('nbdev') and 'extra == "dev"' in r for r in requires)
    # every package the library imports is a declared requirement (an independent reading: the import statements);
    # an import inside `try: ... except ImportError` is optional
    declared = {re.split(r'[<>=!; \[]', r)[0].lower().replace('_', '-') for r in requires if 'extra ==' not in r}
    dists = packages_distributions()
    for py in (ROOT / LIB).glob('*.py'):
        tree = ast.parse(py.read_text())
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and any(
                    'ImportError' in ast.unparse(h.type or ast.Name('')) for h in t.handlers) for b in t.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in optional: continue
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                   [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for top in {m.split('.')[0] for m in mods} - set(sys.stdlib_module_names) - {LIB}:
                provided = {d.lower().replace('_', '-') for d in dists.get(top, [top])}
                assert provided & declared, f'{py.name} imports {top}, which no requirement in settings.ini provides'


def _readme_example():
    "The python blocks of the README's 'Install' section, in order."
    readme = (ROOT / 'README.md').read_text()
    section = re.search(r'^## Install\n(.*?)(?=^## )', readme, re.S | re.M)[1]
    return '\n'.join(re.findall(r'```python\n(.*?)```', section, re.S))


def test_readme_example_runs_from_the_installed_wheel(wheel, tmp_path):
    start = time.perf_counter()
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', venv], check=True)
    site = next(venv.glob('lib/python*/site-packages'))
    (site / 'outer_env.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')  # torch & co., not their .pth hooks
    py = venv / 'bin' / 'python'
    # --force-reinstall: this environment's editable install is visible through the .pth and would count as installed
    subprocess.run([sys.executable, '-m', 'pip', '--python', py, 'install', '--no-index', '--no-deps', '--force-reinstall',
                    '-q', wheel], check=True)
    check = f"""
import importlib, json, pkgutil
from importlib.metadata import distribution, requires, version
from packaging.requirements import Requirement
import {LIB}
missing = [r for r in map(Requirement, requires('{LIB}')) if not r.marker and version(r.name) not in r.specifier]
mods = [m.name for m in pkgutil.iter_modules({LIB}.__path__)]
for m in mods: importlib.import_module('{LIB}.' + m)
print(json.dumps(dict(file={LIB}.__file__, dist=str(distribution('{LIB}')._path), mods=mods, missing=[str(r) for r in missing])))
"""
    r = subprocess.run([py, '-c', check], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info['file'].startswith(str(site)) and info['dist'].startswith(str(site)), info  # the wheel's copy, not ROOT's
    assert not info['missing'], f'requirements not met: {info["missing"]}'
    assert {'gates', 'ascent', 'attribution', 'zoo', 'viz', 'paths'} <= set(info['mods'])
    example = tmp_path / 'example.py'
    example.write_text(_readme_example())
    r = subprocess.run(OFFLINE + [py, example], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, f'the README example failed from the wheel:\n{r.stderr}'
    print(f'wheel installed, the README example ran {"without network " if OFFLINE else ""}in {time.perf_counter() - start:.0f} s')
