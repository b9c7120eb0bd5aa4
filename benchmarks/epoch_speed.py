"""Training throughput: the project's loop against the conventional tutorial pipeline.

    python benchmarks/epoch_speed.py               # both models, 3 rounds, on --device auto

Full epochs of 60,000 images at batch 128 with Adam (lr 1e-3), same model and same loss, in
three pipelines:
- project: what train.py does. MNIST decoded once into a uint8 tensor on the device, batches
  drawn by indexing a random permutation and converted to float per batch; train.py's step
  (`project_step` below): bf16 autocast where it is faster (`--precision auto`), fused Adam, no host
  sync per step; without the weight average train.py also keeps (--ema: one lerp_ per weight tensor).
- conventional: what tutorials do (pytorch/examples' VAE). torchvision.datasets.MNIST with
  transforms.ToTensor() in a DataLoader (shuffle=True; as the tutorial's, one worker process and pinned memory
  on an accelerator, none on the CPU), batches copied to the
  device, fp32, torch.optim.Adam with its default implementation, loss.item() every step.
- conv. loader: that DataLoader feeding the project's step, so the data path alone is
  compared (what the conventional pipeline would gain from the project's step).
They alternate epoch by epoch in one process, so machine noise hits all alike. Reported:
median images/second, the ratios, and the peak memory while each pipeline ran (resident set
size on CPU, sampled every 5 ms; allocated device memory on a GPU) and the main process's minor
page faults per step. The malloc tuning of train.py (cli.keep_freed_memory) is process-wide, so
it applies to all pipelines; --malloc-defaults turns it off for all. The compiled variant
(--compile) compiles training.objective, as train.py --compile does.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib import cli, training  # noqa: E402
from lib.data import TensorDataset, ensure_mnist, to_unit  # noqa: E402
from model import VAE, VAEConfig  # noqa: E402

MODELS = {
    "mlp": VAEConfig(arch="mlp", hidden_dim=400, latent_dim=20, activation="relu"),
    "default": VAEConfig(flow_prior=cli.FLOW_PRIOR),  # train.py's default model
}


class PeakRSS:
    """Highest resident set size seen while the block runs (Linux /proc; else process peak)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def project_step(model, opt, x, noise, bf16, loss_fn):
    """One step as train.py takes it (K = 1): noise drawn outside the loss, bf16 autocast, no sync."""
    x = to_unit(x)
    eps = torch.randn(1, len(x), model.config.latent_dim, generator=noise, device=x.device)
    opt.zero_grad(set_to_none=True)
    parts = loss_fn(model, x, None, eps, 1.0, bf16)  # training.objective, or its compiled graph
    (parts.total.sum() / len(x)).backward()
    opt.step()


def project_epoch(model, opt, data, bs, noise, bf16, loss_fn):
    perm = torch.randperm(len(data)).to(data.images.device)
    for i in range(0, len(data), bs):
        x, _ = data.gather(perm[i:i + bs], labels=False)
        project_step(model, opt, x, noise, bf16, loss_fn)


def loader_epoch(model, opt, loader, device, noise, bf16, loss_fn):
    """The conventional DataLoader feeding the project's step."""
    for x, _ in loader:
        project_step(model, opt, x.to(device, non_blocking=True), noise, bf16, loss_fn)


def tutorial_step(model, opt, x, noise) -> float:
    """One step as pytorch/examples' VAE takes it: fp32, loss.item() (a host sync) every step."""
    opt.zero_grad()
    loss = model.loss(x, eps=torch.randn(1, len(x), model.config.latent_dim, generator=noise, device=x.device)).total
    loss.backward()
    value = loss.item()  # tutorials add it to a running total they print
    opt.step()
    return value


def conventional_epoch(model, opt, loader, device, noise):
    for x, _ in loader:
        tutorial_step(model, opt, x.to(device), noise)


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform has no getrusage)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, device):
    """(seconds, peak memory in bytes, minor page faults in the main process) of one call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    with PeakRSS() as mem:
        faults = minor_faults()
        t0 = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - t0
        faults = minor_faults() - faults
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else mem.peak
    return seconds, peak, faults


PIPELINES = ("project", "conventional", "conv. loader")


def main(argv=None) -> int:
    p = cli.Parser(__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "default"],
                   help="models to time")
    p.add_argument("--rounds", type=cli.POSITIVE_INT, default=3, help="epochs per pipeline and model")
    p.add_argument("--batch-size", type=cli.Number(int, 1, cli.MAX_BATCH), default=128, help="images per step")
    p.add_argument("--limit", type=cli.POSITIVE_INT, default=None,
                   help="epochs of only the first N images, a quick check that it runs (default: all)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="of the project's step, as in train.py (auto: bf16 where it is the faster "
                        "arithmetic); the conventional pipeline is always fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the objective of the project's step (as train.py --compile), in both "
                        "pipelines that use it")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc settings alone (train.py tunes them: "
                        "cli.keep_freed_memory), to see what that tuning is worth")
    cli.add_common(p, checkpoint=False)
    args = p.parse_args(argv)
    if not args.malloc_defaults:
        cli.keep_freed_memory()

    import torchvision
    from torchvision import transforms

    device = cli.pick_device(args.device)
    bf16 = cli.pick_precision(args.precision, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"project step {'bf16 autocast' if bf16 else 'fp32'}{', compiled' if args.compile else ''}, "
          f"{'default' if args.malloc_defaults else 'tuned'} malloc, batch {args.batch_size}, "
          f"{cli.count(args.rounds, 'round')}" + (f", the first {cli.count(args.limit, 'image')} only (--limit)"
                                                   if args.limit else ""))
    ensure_mnist(args.data_dir)
    data = TensorDataset.load("train", args.data_dir, device, args.limit)
    n = len(data)
    conventional = torchvision.datasets.MNIST(args.data_dir, train=True, transform=transforms.ToTensor())
    if args.limit is not None:
        conventional = torch.utils.data.Subset(conventional, range(n))
    accel = {"num_workers": 1, "pin_memory": True} if device.type != "cpu" else {}  # the tutorial's kwargs
    loader = torch.utils.data.DataLoader(conventional, batch_size=args.batch_size, shuffle=True, **accel)
    print(f"{'model':8s} {'pipeline':13s} {'img/s':>9s} {'epoch s':>8s} {'peak MiB':>9s} "
          f"{'faults/step':>11s}")
    for model_name in args.models:
        torch.manual_seed(0)
        model = VAE(MODELS[model_name]).to(device)
        # The conventional pipeline trains its own copy (same initial weights) with its own Adam;
        # the project's is kept in channels_last, as train.py keeps it.
        tutorial_model = copy.deepcopy(model)
        model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
        tutorial_opt = torch.optim.Adam(tutorial_model.parameters(), lr=1e-3)
        noise = torch.Generator(device=device).manual_seed(0)
        step_fn = torch.compile(training.objective) if args.compile else training.objective
        runs = {
            "project": lambda: project_epoch(model, opt, data, args.batch_size, noise, bf16, step_fn),
            "conventional": lambda: conventional_epoch(tutorial_model, tutorial_opt, loader, device, noise),
            "conv. loader": lambda: loader_epoch(model, opt, loader, device, noise, bf16, step_fn),
        }
        # Warm-up on both batch shapes an epoch has (full, and the last partial one): kernels,
        # allocator and, with --compile, the compilations happen here, not in a timed epoch.
        for size in {min(args.batch_size, n), n % args.batch_size or args.batch_size}:
            x = data.batch(slice(0, size))[0]
            project_step(model, opt, x, noise, bf16, step_fn)
            tutorial_step(tutorial_model, tutorial_opt, x, noise)
        results = {k: [] for k in runs}
        for r in range(args.rounds):
            order = PIPELINES[r % 3:] + PIPELINES[:r % 3]  # rotate who goes first
            for k in order:
                results[k].append(timed(runs[k], device))
        ips = {}
        steps = math.ceil(n / args.batch_size)
        for k, rs in results.items():
            secs = statistics.median(s for s, _, _ in rs)
            ips[k] = n / secs
            faults = statistics.median(f for _, _, f in rs) / steps
            print(f"{model_name:8s} {k:13s} {ips[k]:9.0f} {secs:8.2f} "
                  f"{max(m for _, m, _ in rs) / 2**20:9.0f} {faults:11.1f}", flush=True)
        print(f"{model_name:8s} speed-up: {ips['project'] / ips['conventional']:.1f}x the conventional "
              f"pipeline, {ips['project'] / ips['conv. loader']:.1f}x its loader with the project's step")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
