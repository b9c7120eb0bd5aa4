"""What the speed work relies on, asserted as behaviour (timings live in benchmarks/)."""

import copy
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from model import VAE, VAEConfig
from train import adam_step, make_optimizer

# Training steps of the default model at batch 128, as train.py runs them on CPU; prints the
# minor page faults of steps 4 to 13.
STEPS = """
import resource, sys, torch
import cli
from model import VAE
from train import make_optimizer, train_step
if sys.argv[1] == "tuned":
    cli.keep_freed_memory()
torch.manual_seed(0)
model = VAE()
opt = make_optimizer(model, 1e-3, torch.device("cpu"))
x, noise = torch.rand(128, 1, 28, 28), torch.Generator().manual_seed(0)
def steps(n):
    for _ in range(n):
        train_step(model, opt, x, None, 1.0, noise)
steps(3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_refaulting_every_step():
    default = _faults("default")
    if default < 10 * 256:  # this libc keeps the memory anyway: nothing to show
        pytest.skip(f"the C library's defaults already keep freed memory ({default} faults)")
    # Seen: about 55,000 faults by default, 0 to 2,000 tuned (pages the kernel reclaimed from
    # the process's libraries and faults back in, which no malloc setting affects).
    assert _faults("tuned") < default / 10


def _pair():
    torch.manual_seed(0)
    a = VAE(VAEConfig(arch="mlp", hidden_dim=32, latent_dim=4))
    b = copy.deepcopy(a)
    return a, b


def _fake_grads(models, seed):
    g = torch.Generator().manual_seed(seed)
    for ps in zip(*(m.parameters() for m in models)):
        grad = torch.randn(ps[0].shape, generator=g)
        for p in ps:
            p.grad = grad.clone()


def test_adam_step_is_opt_step_bit_for_bit():
    """adam_step calls the fused kernel itself; weights, state and the saved state dict must be
    exactly what torch.optim's step() gives, through learning-rate changes and a resume."""
    a, b = _pair()
    opt_a, opt_b = (make_optimizer(m, 1e-3, torch.device("cpu")) for m in (a, b))
    for i in range(6):
        for opt in (opt_a, opt_b):
            opt.param_groups[0]["lr"] = 1e-3 * 0.9 ** i
        _fake_grads((a, b), i)
        opt_a.step()
        adam_step(opt_b)
        if i == 2:  # a resume: the state tensors are replaced by load_state_dict
            opt_b.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name]), (k, name)


def test_adam_step_leaves_other_optimisers_and_hooks_to_step():
    """What the direct call does not cover goes through opt.step(): hooks still fire, and a
    non-fused Adam (as on MPS) or amsgrad gives torch.optim's result."""
    a, b = _pair()
    fired = []
    opt = make_optimizer(a, 1e-3, torch.device("cpu"))
    opt.register_step_post_hook(lambda *args: fired.append(1))
    for i in range(2):
        _fake_grads((a,), i)
        adam_step(opt)
    assert fired == [1, 1]
    for kwargs in ({"fused": False}, {"fused": True, "amsgrad": True}):
        a, b = _pair()
        opt_a = torch.optim.Adam(a.parameters(), lr=1e-3, **kwargs)
        opt_b = torch.optim.Adam(b.parameters(), lr=1e-3, **kwargs)
        for i in range(3):
            _fake_grads((a, b), i)
            opt_a.step()
            adam_step(opt_b)
        assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters())), kwargs


def test_benchmark_runs_and_reports_every_pipeline():
    """The README's benchmark command still runs (here on 256 images; no timing is asserted)."""
    out = subprocess.run([sys.executable, "benchmarks/epoch_speed.py", "--models", "mlp",
                          "--rounds", "1", "--limit", "256"], capture_output=True, text=True,
                         cwd=ROOT, timeout=240)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("mlp ")}
    assert {"project", "conventional", "conv."} <= rows
    assert "speed-up:" in out.stdout
