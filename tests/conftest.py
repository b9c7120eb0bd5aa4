"""Shared helpers. Tests use the bundled MNIST (a few hundred images) and tiny models: CPU only."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# CPU only, also in the scripts the tests start (they inherit it): the exact-resume tests hold on a CPU.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest.ini's worker processes, which share the cores:
    # OpenMP threads spin-waiting for a busy core would slow both workers; the scripts the tests start inherit it
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# A tiny conv VAE on 512 images: each epoch is a fraction of a second on a 2-core CPU.
TINY = ["--channels", "4", "8", "--hidden-dim", "32", "--latent-dim", "4", "--limit", "512",
        "--batch-size", "64", "--eval-batch-size", "256", "--device", "cpu"]
MIXTURE_RUN = [*TINY, "--epochs", "1", "--mixture-components", "2", "--ema", "0.99"]  # every checkpoint field filled
SMALL = dict(channels=(4, 8), hidden_dim=32, latent_dim=4)  # TINY's model, as VAEConfig keywords
SMALL3 = dict(SMALL, latent_dim=3)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def same_metrics(a, b):
    """Metrics rows equal in every column but wall-clock seconds."""
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    return drop(a) == drop(b)


def run_script(script, *args, timeout=120, **kw):
    """Run one of the project's scripts in a subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=kw.get("cwd", ROOT))


def one_line_error(proc):
    """The script failed with exactly one non-empty stderr line, and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def cli_error(main, args, capsys):
    """Run a script's main() as the command line does (cli.run): exit 1 and one stderr line."""
    from lib import cli

    capsys.readouterr()
    code = cli.run(main, [str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.fixture(scope="session")
def mnist_subset():
    """(x float [256, 1, 28, 28] in [0, 1], labels) from the real test split."""
    from lib.data import TensorDataset

    ds = TensorDataset.load("test", limit=256)
    return ds.batch(slice(0, 256))


@pytest.fixture(scope="session")
def binarized_run(tmp_path_factory):
    """A finished 1-epoch tiny run with --binarize and no weight average (read it, don't change it)."""
    import train

    ckpt = tmp_path_factory.mktemp("bin") / "vae.pt"
    assert train.main([*TINY, "--epochs", "1", "--binarize", "--ema", "0", "--checkpoint", str(ckpt)]) == 0
    return ckpt


@pytest.fixture(scope="session")
def mixture_run(tmp_path_factory):
    """A finished 1-epoch tiny run with a 2-component latent mixture and averaged weights (read it,
    don't change it)."""
    import train

    ckpt = tmp_path_factory.mktemp("mixture_run") / "vae.pt"
    assert train.main([*MIXTURE_RUN, "--checkpoint", str(ckpt)]) == 0
    return ckpt
