"""pip install -e . (pyproject.toml): model.py and the sinkgpt package import from any folder, and the scripts
still run from the repository root."""
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_an_editable_install_imports_model_and_sinkgpt_from_another_folder(tmp_path):
    prefix = tmp_path / "prefix"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--prefix", str(prefix), "-e", REPO], capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    site_dir = next(str(p) for p in prefix.rglob("site-packages"))
    probe = ("import site, sys; site.addsitedir(sys.argv[1]); import model, sinkgpt.config; "
             "print(model.__file__); print(sinkgpt.config.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", probe, site_dir], capture_output=True, text=True, cwd=tmp_path,
                         env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [os.path.join(REPO, "model.py"), os.path.join(REPO, "sinkgpt", "config.py")]
    without = subprocess.run([sys.executable, "-c", "import model"], capture_output=True, text=True, cwd=tmp_path,
                             env=env)
    assert without.returncode != 0  # the import came from the install, not from the folder it ran in
