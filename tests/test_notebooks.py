"Every notebook in nbs/ runs as one pytest test. Cells flagged `#| slow` run only when RUN_SLOW=1 is set."
import os
from pathlib import Path
import pytest
from nbdev import test as nbtest  # the module, not the function: pytest would collect `test_nb` itself

NBS_DIR = Path(__file__).parents[1] / 'nbs'
NBS = sorted(p for p in NBS_DIR.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts and not p.name.startswith('_'))

@pytest.mark.parametrize('nb', NBS, ids=lambda p: str(p.relative_to(NBS_DIR)))
def test_notebook(nb):
    ok, _ = nbtest.test_nb(nb, skip_flags=[] if os.environ.get('RUN_SLOW') else ['slow'])
    assert ok, f'{nb} failed: its traceback is above'
