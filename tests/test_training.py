"""Training: exact resumes, the objective's options (beta, warm-up, K, binarization), what
the metrics say, and the memory tuning of the step."""

import io
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import train
from conftest import ROOT, SMALL, TINY, cli_error, read_csv, same_metrics
from lib import cli, training
from lib.checks import load_checkpoint, with_checksums
from lib.evaluation import importance_nll
from model import VAE, VAEConfig

def test_resume_matches_straight_run(tmp_path, capsys):
    """On CPU, 2 epochs then --resume to 4 gives the same weights and metrics as 4 straight, with a rate
    (--lr-decay) that does not depend on the number of epochs."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert train.main([*TINY, "--epochs", "4", "--lr-decay", "0.8", "--ema", "0.999", "--checkpoint", str(a)]) == 0
    assert train.main([*TINY, "--epochs", "2", "--lr-decay", "0.8", "--ema", "0.999", "--checkpoint", str(b)]) == 0
    # No model or run flags: --resume takes them from the checkpoint (and says so if they differ).
    assert train.main(["--epochs", "4", "--checkpoint", str(b), "--resume", "--lr", "0.5"]) == 0
    assert "--lr 0.5 ignored" in capsys.readouterr().out
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert cb["epoch"] == 4 and ca["ema"] is not None  # the averaged weights are state too
    for part in ("model", "ema"):
        for k, v in ca[part].items():
            assert torch.equal(v, cb[part][k]), (part, k)
    assert same_metrics(read_csv(tmp_path / "a.pt.metrics.csv"), read_csv(tmp_path / "b.pt.metrics.csv"))
    # without --epochs, --resume goes to the stored run's number of epochs: this one is done
    assert train.main(["--checkpoint", str(a), "--resume"]) == 0
    assert "already has 4 epochs" in capsys.readouterr().out and load_checkpoint(a)["epoch"] == 4
    line = cli_error(train.main, ["--checkpoint", a, "--resume", "--epochs", "3"], capsys)  # fewer than it has
    assert "cannot undo" in line and load_checkpoint(a)["epoch"] == 4


def test_a_resume_on_another_kind_of_device_reseeds_the_noise_and_says_so(tmp_path, capsys):
    """A noise generator's state from another kind of device (a CUDA generator's is 16 bytes) cannot be restored
    on this one: the resume says so, reseeds, and finishes the run."""
    ckpt = tmp_path / "vae.pt"
    assert train.main([*TINY, "--epochs", "1", "--mixture-components", "0", "--checkpoint", str(ckpt)]) == 0
    c = load_checkpoint(ckpt)
    c["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(with_checksums(c), ckpt)
    capsys.readouterr()
    assert train.main(["--epochs", "2", "--checkpoint", str(ckpt), "--resume"]) == 0
    assert "noise RNG reseeded" in capsys.readouterr().out and load_checkpoint(ckpt)["epoch"] == 2


def test_the_resume_hint_is_a_command_to_paste():
    hint = training.resume_hint(SimpleNamespace(checkpoint="runs/my run.pt", epochs=3))
    assert hint.endswith("--checkpoint 'runs/my run.pt' --epochs 3")


def test_extending_a_cosine_run_says_it_is_no_straight_run(tmp_path, capsys):
    """The default rate reaches 0 at the last epoch: --resume --epochs N moves that end, and says so."""
    c = tmp_path / "c.pt"
    assert train.main([*TINY, "--epochs", "1", "--checkpoint", str(c)]) == 0
    assert "reaches 0" not in capsys.readouterr().out
    assert train.main(["--epochs", "2", "--checkpoint", str(c), "--resume"]) == 0
    assert "reaches 0 at epoch 2, not 1" in capsys.readouterr().out and load_checkpoint(c)["epoch"] == 2


# Each RUN flag of the table, set to a value other than its default, in one of two runs (--iw-k
# above 1 refuses a --beta other than 1; --arch mlp refuses --res-blocks).
NON_DEFAULT = (
    [*TINY, "--eval-batch-size", "128", "--lr", "1e-3", "--lr-decay", "0.9", "--seed", "5",
     "--res-blocks", "2", "1", "0", "1", "--activation", "elu", "--conditional", "--binarize", "--beta", "2",
     "--kl-warmup", "1",
     "--mixture-components", "3", "--precision", "fp32", "--ema", "0.99", "--flow-prior", "2"],
    ["--arch", "mlp", "--hidden-dim", "32", "--latent-dim", "4", "--limit", "256", "--iw-k", "2", "--iw-start", "1",
     "--mixture-components", "0", "--res-blocks", "0", "0", "0", "0", "--flow-prior", "0", "--output-bias", "torch",
     "--ema", "0"],
)


def test_a_metric_added_to_the_rows_becomes_a_column_and_older_rows_leave_it_empty(tmp_path):
    """An extension that adds a key to train.py's rows gets a CSV column after the standard ones, and checkpoints
    written before it (whose rows lack the key) still resume."""
    ckpt = tmp_path / "run.pt"
    assert train.main([*TINY, "--epochs", "1", "--mixture-components", "0", "--checkpoint", str(ckpt)]) == 0
    c = load_checkpoint(ckpt)
    c["metrics"][0]["lr"] = 0.003  # as if the first epoch had logged it
    torch.save(with_checksums(c), ckpt)
    assert train.main(["--resume", "--epochs", "2", "--checkpoint", str(ckpt)]) == 0
    first, second = read_csv(tmp_path / "run.pt.metrics.csv")
    assert list(first) == [*training.METRIC_FIELDS, "lr"] and first["lr"] == "0.0030" and second["lr"] == ""


def test_every_flag_that_shapes_a_run_survives_a_resume(tmp_path):
    """Walks the flag table: every RUN flag, set on the command line, is stored and restored by
    --resume (given no flags), so the resumed run is the run that never stopped."""
    covered = set()
    for i, flags in enumerate(NON_DEFAULT):
        ckpt = tmp_path / f"run{i}.pt"
        args = cli.Parser("", cli.TRAIN_FLAGS).parse_args([*flags, "--checkpoint", str(ckpt)])
        given = {name: getattr(args, name) for name in cli.RUN_FLAGS
                 if getattr(args, name) != cli.Parser("", cli.TRAIN_FLAGS).get_default(name)}
        covered |= set(given)
        assert train.main([*flags, "--epochs", "1", "--checkpoint", str(ckpt)]) == 0
        assert train.main(["--epochs", "2", "--checkpoint", str(ckpt), "--resume"]) == 0
        c = load_checkpoint(ckpt)
        assert c["epoch"] == 2 and {name: c["args"][name] for name in given} == given
        if args.mixture_components:
            assert c["latent_mixture"]["weights"].shape == (10, args.mixture_components)
        else:
            assert c["latent_mixture"] is None
    assert covered == set(cli.RUN_FLAGS), f"set these in a run of NON_DEFAULT: {set(cli.RUN_FLAGS) - covered}"


@pytest.mark.parametrize("arch", [[], ["--arch", "mlp"]])
def test_a_new_run_starts_the_decoder_at_the_mean_pixel(tmp_path, arch):
    """--output-bias mean (the default): the decoder's output bias starts at the log-odds of the training images' mean
    pixel, so the untrained decoder predicts the mean grey level; torch: PyTorch's init. All else is the same."""
    models = {}
    for choice in ("mean", "torch"):
        args = cli.Parser("", cli.TRAIN_FLAGS).parse_args([*(TINY[3:] if arch else TINY), *arch, "--output-bias", choice,
                                                           "--checkpoint", str(tmp_path / f"{choice}.pt")])
        with training.setup(args) as run:
            models[choice] = (run.model, run.train_set.images)
    (mean, images), (torch_init, _) = models["mean"], models["torch"]
    out = [name for name in mean.state_dict() if name.startswith("dec_")][-1]  # the decoder's last layer's bias
    p = images.double().mean() / 255
    assert out.endswith(".bias") and torch.allclose(torch.sigmoid(mean.state_dict()[out].double()), p.expand(784))
    for name, t in torch_init.state_dict().items():
        assert torch.equal(t, mean.state_dict()[name]) == (name != out), name


def test_compile_flag_compiles_the_objective(tmp_path, monkeypatch):
    """--compile hands VAE.loss to torch.compile and trains with what it returns."""
    compiled, calls = [], []

    def fake_compile(fn, **kw):  # records what is compiled; runs it eagerly (a real compile is slow)
        compiled.append(fn)

        def compiled_fn(*args, **kwargs):
            calls.append(1)
            return fn(*args, **kwargs)
        return compiled_fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert train.main([*TINY, "--epochs", "1", "--mixture-components", "0", "--compile",
                       "--checkpoint", str(tmp_path / "c.pt")]) == 0
    assert compiled == [training.objective] and len(calls) == 512 // 64  # every step, through what compile gave


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_the_objective_traces_as_one_graph(bf16, k):
    """torch.compile (train.py --compile) sees the objective with its noise given as one graph: each
    graph break would add a compiled-graph call to every training step."""
    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL))
    x, eps = torch.rand(4, 1, 28, 28), torch.randn(k, 4, SMALL["latent_dim"])
    graphs = []

    def count_graphs(gm, example_inputs):  # a torch.compile backend that runs the graph as traced
        graphs.append(gm)
        return gm.forward

    torch.compile(training.objective, backend=count_graphs, fullgraph=True)(m, x, None, eps, 1.0, bf16)  # raises at a break
    assert len(graphs) == 1


def test_the_compiled_objective_has_the_eager_gradients_under_bf16():
    """Compiled (backend aot_eager: the traced ops, no code generation) and eager, the objective gives
    the same gradients to the bit under bf16 autocast, the flow prior's fp32 density included: its
    backward must not run under autocast as a compiled backward does when autocast wraps the call."""
    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL, flow_prior=2))
    for p in m.prior.parameters():  # off the flow's identity start, where bf16 and fp32 would agree
        p.data.normal_(0, 0.1)
    x, eps = torch.bernoulli(torch.rand(8, 1, 28, 28)), torch.randn(1, 8, SMALL["latent_dim"])
    grads = []
    for fn in (training.objective, torch.compile(training.objective, backend="aot_eager")):
        m.zero_grad()
        fn(m, x, None, eps, 1.0, True).total.sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_schedules_are_functions_of_the_progress():
    run = SimpleNamespace(beta=2.0, kl_warmup=4, lr=1e-3, lr_decay=0.5)
    assert training.kl_weight(SimpleNamespace(beta=1.0, kl_warmup=0), 0.0) == 1.0
    assert training.kl_weight(run, 1.0) == 0.5 and training.kl_weight(run, 10.0) == 2.0
    assert training.learning_rate(run, 0.0) == 1e-3 and training.learning_rate(run, 2.0) == 2.5e-4
    cosine = SimpleNamespace(lr=1e-3, lr_decay=None, epochs=4)  # SGDR's eq. 5, one cycle, to 0
    assert training.learning_rate(cosine, 0.0) == 1e-3 and training.learning_rate(cosine, 4.0) == 0.0
    assert training.learning_rate(cosine, 2.0) == pytest.approx(5e-4) and training.learning_rate(cosine, 3.0) < 2e-4


def test_each_epoch_and_seed_has_its_own_shuffle():
    orders = {(seed, epoch): training.epoch_permutation(seed, epoch, 1000) for seed in (0, 1) for epoch in (0, 1, 2)}
    assert all(torch.equal(order.sort().values, torch.arange(1000)) for order in orders.values())  # permutations
    assert len({tuple(order.tolist()) for order in orders.values()}) == len(orders)  # all different
    assert torch.equal(training.epoch_permutation(1, 2, 1000), orders[1, 2])  # a pure function: resumes replay it


def test_the_average_is_the_exponential_moving_average_of_the_weights():
    torch.manual_seed(0)
    model, ema = VAE(VAEConfig(**SMALL)), VAE(VAEConfig(**SMALL))
    before = [e.detach().clone() for e in ema.parameters()]
    for t, decay in ((1, 0.999), (500, 0.9)):  # early on the average follows (1 + t) / (10 + t); later the decay
        d = min(decay, (1 + t) / (10 + t))
        training.update_ema(ema, model, decay, t)
        for e, e0, p in zip(ema.parameters(), before, model.parameters()):
            assert torch.allclose(e, d * e0 + (1 - d) * p, atol=1e-6)
        before = [e.detach().clone() for e in ema.parameters()]


@pytest.mark.parametrize("cpuinfo, bf16", [("GenuineIntel avx512_bf16 amx_bf16", True), ("AuthenticAMD avx512_bf16", True),
                                            ("GenuineIntel avx512_bf16", False), ("GenuineIntel avx2", False),
                                            ("AuthenticAMD avx2", False), (OSError, False)])
def test_auto_precision_is_bf16_only_where_it_is_faster(monkeypatch, cpuinfo, bf16):
    """On a CPU, --precision auto reads /proc/cpuinfo: bf16 with AMX or on AMD's AVX-512 BF16, else (or unreadable)
    fp32; the rule is for CPUs only."""
    def fake_open(*args):
        if cpuinfo is OSError:
            raise OSError("no /proc")
        return io.StringIO(cpuinfo)
    monkeypatch.setattr(cli, "open", fake_open, raising=False)
    assert cli.pick_precision("auto", torch.device("cpu")) is bf16
    assert cli.pick_precision("auto", torch.device("meta")) is False
    assert cli.pick_precision("fp32", torch.device("cpu")) is False and cli.pick_precision("bf16", torch.device("cpu"))


def test_beta_and_warmup_report_true_elbo(tmp_path, capsys):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    # the KL in closed form (a flow's sampled one is noisier), of the trained weights (not an average), and a rate at
    # which TINY's 16 steps leave it above 0
    n01 = [*TINY, "--epochs", "2", "--flow-prior", "0", "--ema", "0", "--lr", "1e-2"]
    assert train.main([*n01, "--checkpoint", str(a)]) == 0
    capsys.readouterr()
    assert train.main([*n01, "--beta", "4", "--kl-warmup", "4", "--checkpoint", str(b)]) == 0
    assert ("weighs the KL by 4 (--beta; 1: the plain ELBO), ramped from 0 over 4 epochs (the run ends at 2);"
            in capsys.readouterr().out)
    ma, mb = load_checkpoint(a)["metrics"], load_checkpoint(b)["metrics"]
    assert [r["kl_weight"] for r in mb] == [1.0, 2.0] and ma[0]["kl_weight"] == cli.BETA  # the default weight
    for r in mb:  # reported losses are recon + KL, whatever weight the training used
        assert abs(r["test_loss"] - r["recon"] - r["kl"]) < 1e-6
        assert abs(r["train_loss"] - r["train_recon"] - r["train_kl"]) < 1e-6
    c = tmp_path / "c.pt"
    assert train.main([*n01, "--beta", "4", "--checkpoint", str(c)]) == 0
    assert load_checkpoint(c)["metrics"][-1]["kl"] < ma[-1]["kl"]  # a heavier KL weight pushes the KL down


def test_binarized_training_sees_binary_pixels(binarized_run, tmp_path, monkeypatch):
    ckpt = tmp_path / "vae.pt"
    ckpt.write_bytes(binarized_run.read_bytes())  # resumed: a copy of the shared run
    seen = []
    real = VAE.loss

    def spy(self, x, *a, **kw):
        seen.append(x.unique())
        return real(self, x, *a, **kw)

    monkeypatch.setattr(VAE, "loss", spy)
    assert train.main(["--epochs", "2", "--checkpoint", str(ckpt), "--resume"]) == 0
    assert all(set(u.tolist()) <= {0.0, 1.0} for u in seen)


def test_passes_give_the_same_gradient(tmp_path, monkeypatch):
    """Memory stays bounded: with K samples per image a batch is split into passes over parts of it whose
    gradients add up to the one-pass gradient (the first step's, same weights, batch and noise)."""
    runs, real, passes, objective = [], torch.optim.Adam.step, [], training.objective

    def spy(opt, *a, **kw):  # records the gradients every step applies
        runs[-1].append([p.grad.clone() for group in opt.param_groups for p in group["params"]])
        return real(opt, *a, **kw)

    def counted(*args, **kwargs):  # the forward passes of the step
        passes[-1] += 1
        return objective(*args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    monkeypatch.setattr(training, "objective", counted)
    for per_pass in (10_000, 16):  # 8 samples per image: 1 pass of 64 images, then 32 passes of 2
        monkeypatch.setattr(train, "SAMPLES_PER_PASS", per_pass)
        runs.append([])
        passes.append(0)
        assert train.main([*TINY, "--limit", "64", "--epochs", "1", "--iw-k", "8", "--mixture-components", "0",
                           "--precision", "fp32", "--checkpoint", str(tmp_path / f"g{per_pass}.pt")]) == 0
    (one,), (split,) = runs
    assert passes == [1, 32]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(one, split))


def test_cli_logs_both_bounds(tmp_path, capsys):
    ckpt = tmp_path / "iw.pt"
    assert train.main([*TINY, "--epochs", "2", "--iw-k", "4", "--mixture-components", "0",
                       "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "importance-weighted bound with K = 4" in out and "IW-4 bound: train" in out
    rows = read_csv(tmp_path / "iw.pt.metrics.csv")
    assert {"train_iw", "test_iw"} <= set(rows[0])
    assert load_checkpoint(ckpt)["args"]["beta"] == 1.0  # the default KL weight with --iw-k above 1: none
    for r in rows:  # the K-sample bound is tighter than the one-sample ELBO
        assert float(r["test_iw"]) < float(r["test_loss"]) and float(r["train_iw"]) < float(r["train_loss"])
    assert train.main(["--epochs", "3", "--checkpoint", str(ckpt), "--resume"]) == 0
    assert len(read_csv(tmp_path / "iw.pt.metrics.csv")) == 3
    line = cli_error(train.main, [*TINY, "--iw-k", "4", "--beta", "2", "--checkpoint", tmp_path / "b.pt"], capsys)
    assert "--iw-k" in line and "--beta" in line


def test_the_test_sets_iw_bound_decodes_no_more_per_pass_than_training(tmp_path, monkeypatch):
    passes = []

    def recorded(model, data, k, chunk, batch_size, *args):
        passes.append(chunk * batch_size)
        return importance_nll(model, data, k, chunk, batch_size, *args)

    monkeypatch.setattr(train, "importance_nll", recorded)
    assert train.main([*TINY, "--epochs", "1", "--iw-k", "64", "--mixture-components", "0",
                       "--checkpoint", str(tmp_path / "iw.pt")]) == 0
    assert passes and max(passes) <= train.SAMPLES_PER_PASS, passes


def test_an_iwae_phase_follows_elbo_epochs(tmp_path, capsys):
    """--iw-start E: the first E epochs are the ELBO run's to the bit, the IW bound trains (and is
    logged) from epoch E + 1 on; a KL warm-up must end by then."""
    elbo, iw = tmp_path / "elbo.pt", tmp_path / "iw.pt"
    n01 = [*TINY, "--flow-prior", "0"]  # the ELBO's KL in closed form: the bound's order is not a sample's noise
    # the IW run's ELBO epochs weigh the KL by 1 (the default with --iw-k above 1), so the ELBO run is given 1
    assert train.main([*n01, "--epochs", "1", "--kl-warmup", "1", "--beta", "1", "--checkpoint", str(elbo)]) == 0
    assert train.main([*n01, "--epochs", "1", "--kl-warmup", "1", "--iw-k", "4", "--iw-start", "1",
                       "--checkpoint", str(iw)]) == 0
    for k, v in load_checkpoint(elbo)["model"].items():
        assert torch.equal(v, load_checkpoint(iw)["model"][k]), k
    assert train.main(["--epochs", "2", "--checkpoint", str(iw), "--resume"]) == 0
    assert "IW-4 bound: train" in capsys.readouterr().out
    first, second = read_csv(tmp_path / "iw.pt.metrics.csv")
    assert first["test_iw"] == "" and float(second["test_iw"]) < float(second["test_loss"])
    for bad, named in ((["--iw-start", "2"], "--iw-k"),
                       (["--iw-k", "4", "--kl-warmup", "2", "--iw-start", "1"], "--kl-warmup")):
        assert named in cli_error(train.main, [*TINY, *bad, "--checkpoint", tmp_path / "b.pt"], capsys)


# Training steps of the default model at batch 64 on the CPU; prints the minor page faults of
# steps 4 to 13.
STEPS = """
import resource, sys, torch
from lib import cli
from model import VAE
if sys.argv[1] == "tuned":
    cli.keep_freed_memory()
torch.manual_seed(0)
model = VAE()
opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
x = torch.rand(64, 1, 28, 28)
def steps(n):
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        model.loss(x).total.backward()
        opt.step()
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
    # Seen: tens of thousands of faults by default, 0 to 2,000 tuned (pages the kernel reclaimed from
    # the process's libraries and faults back in, which no malloc setting affects).
    assert _faults("tuned") < default / 10
