"""Time to quality: `python train.py` against the tutorial it is compared with, in one run.

    git clone https://github.com/pytorch/examples /tmp/examples   # the tutorial, not shipped here
    git -C /tmp/examples checkout 77f55b9   # benchmarks/README.md: other revisions print another loss
    python benchmarks/time_to_quality.py --tutorial /tmp/examples/vae/main.py

Runs the tutorial (pytorch/examples' VAE, its own script and settings: 10 epochs) and then the
project's default training, one after the other on the bundled MNIST, each as a fresh process
as a user starts it, and timestamps every test loss either prints (wall-clock from the start of
the process, start-up and data loading included). Reports the seconds each takes to reach the
tutorial's 10-epoch test loss, 95 and 92 nats, and its whole run. Both print the same test loss:
the negative ELBO with grey levels as Bernoulli targets, nats per image. Extra arguments after
`--` go to train.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib import cli  # noqa: E402
from lib.checks import UserError  # noqa: E402
from lib.data import ensure_mnist  # noqa: E402

TUTORIAL_LOSS = re.compile(r"====> Test set loss: ([\d.]+)")
PROJECT_LOSS = re.compile(r"^epoch\s+\d+/\d+\s+train\s+[\d.]+\s+test\s+([\d.]+)")  # the ELBO, not an IW bound
TARGETS = (95.0, 92.0)


def timed(cmd: list[str], cwd: str | None, pattern: re.Pattern) -> tuple[list[tuple[float, float]], float]:
    """Run cmd; return [(seconds since start, test loss)] for each line matching pattern, and the
    seconds until the process ended. UserError, with the process's last line, if it fails or prints no loss."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    losses, last = [], ""
    try:
        for line in proc.stdout:
            last = line.strip() or last
            m = pattern.search(line)
            if m:
                losses.append((time.perf_counter() - t0, float(m.group(1))))
                print(f"{losses[-1][0]:7.1f} s  {line.strip()}", flush=True)
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: the child goes too
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or not losses:
        why = f"exited {proc.returncode}" if proc.returncode else "printed no test loss"
        raise UserError(f"{' '.join(cmd)} {why}" + (f" ({last})" if last else ""))
    return losses, time.perf_counter() - t0


def reached(losses, target: float) -> float | None:
    return next((t for t, loss in losses if loss <= target), None)


def interrupted(signum, frame):
    """SIGTERM (or SIGHUP: the terminal closed) as Ctrl-C: the temporary folder and the running child are cleaned
    up on the way out."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = cli.Parser(__doc__.split("\n")[0])
    p.add_argument("--tutorial", required=True,
                   help="path to pytorch/examples' vae/main.py, run with its own settings (10 epochs)")
    p.add_argument("train_args", nargs="*",
                   help="arguments for train.py after -- (default: none, the default run; a quick check: -- --limit "
                        "2048 --epochs 1, which shortens train.py's run only)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.tutorial):
        raise UserError(f"{args.tutorial}: no such file; clone https://github.com/pytorch/examples and pass its "
                        "vae/main.py")
    train = cli.Parser("", cli.TRAIN_FLAGS)
    train.prog = "train.py"
    train.set_defaults(checkpoint=None)  # so that any --checkpoint given shows
    flags = train.parse_args(args.train_args)  # bad flags (rules between them too), device or data: now, not after
    cli.check_flags(flags)  # the tutorial's minutes
    cli.pick_device(flags.device)
    if flags.resume or flags.checkpoint is not None:
        raise UserError("train.py runs afresh here, into a temporary checkpoint: leave out --resume and --checkpoint")
    ensure_mnist(flags.data_dir)
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
        signal.signal(sig, interrupted)
    with tempfile.TemporaryDirectory() as tmp:
        # The tutorial reads ../data/MNIST/raw relative to where it runs and writes results/.
        os.makedirs(os.path.join(tmp, "run", "results"))
        os.makedirs(os.path.join(tmp, "data", "MNIST"))
        os.symlink(ensure_mnist(os.path.join(ROOT, "dataset")), os.path.join(tmp, "data", "MNIST", "raw"))
        tutorial, tutorial_s = timed([sys.executable, os.path.abspath(args.tutorial)], os.path.join(tmp, "run"),
                                     TUTORIAL_LOSS)
        project, project_s = timed([sys.executable, os.path.join(ROOT, "train.py"), "--checkpoint",
                                    os.path.join(tmp, "vae.pt"), *args.train_args], None, PROJECT_LOSS)  # relative paths as checked
    goal = tutorial[-1][1]
    print(f"\n{'seconds to reach':24s} {'tutorial':>9s} {'train.py':>9s} {'ratio':>6s}")
    for name, target in ((f"{goal:.2f} (tutorial, 10 ep.)", goal), *((f"{t:.0f}", t) for t in TARGETS),
                         ("the end of the run", None)):
        a = tutorial_s if target is None else reached(tutorial, target)
        b = project_s if target is None else reached(project, target)
        ratio = f"{a / b:5.2f}x" if a and b else ""
        print(f"{name:24s} {f'{a:.1f}' if a else 'never':>9s} {f'{b:.1f}' if b else 'never':>9s} {ratio:>6s}")
    print(f"final test loss: tutorial {goal:.2f}, train.py {project[-1][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
