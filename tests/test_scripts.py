"""The scripts end to end, in tmp_path, on a few hundred real images and a tiny model."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile

import pytest
import torch
from PIL import Image

import evaluate
import generate
import train
from conftest import ROOT, SMALL, TINY, cli_error, one_line_error, read_csv, run_script
from lib import cli
from lib.checks import load_checkpoint, with_checksums
from lib.evaluation import load_classifier
from lib.data import BINARIZE_SEED, TensorDataset, fitting_set, load_test_set
from lib.evaluation import active_dimensions, classify, frechet_distance
from lib.mixture import fit_to_model
from lib.training import save_model
from model import VAE, VAEConfig
from tools import fit_mixture, train_classifier

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch tiny run through the real CLI (a subprocess, as a user runs it)."""
    ckpt = tmp_path_factory.mktemp("run") / "vae.pt"
    proc = run_script("train.py", *TINY, "--epochs", 2, "--checkpoint", ckpt)
    assert proc.returncode == 0, proc.stderr
    return ckpt, proc


def test_train_writes_checkpoint_and_metrics(trained):
    ckpt, proc = trained
    assert "device: cpu" in proc.stdout and "epoch   2/2" in proc.stdout
    c = load_checkpoint(ckpt)
    assert c["epoch"] == 2 and c["step"] == 0 and len(c["metrics"]) == 2
    assert {"model", "optimizer", "rng", "model_config", "args"} <= set(c)
    rows = read_csv(ckpt.with_name("vae.pt.metrics.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"epoch", "train_loss", "test_loss", "recon", "kl", "seconds"} <= set(rows[0])
    for r in rows:
        assert abs(float(r["test_loss"]) - float(r["recon"]) - float(r["kl"])) < 1e-3
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    model = VAE.from_checkpoint(ckpt)  # rebuilt from the file alone
    assert not model.training and model.config.latent_dim == 4


def test_generate_writes_valid_pngs_and_repeats(trained, tmp_path):
    ckpt, _ = trained
    proc = run_script("generate.py", "--checkpoint", ckpt, "--out", tmp_path / "a", "--seed", 3)  # as a user runs it
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(cli.device_note(cli.pick_device("auto"), "auto") + "\n")
    outs = [[line.split()[0] for line in proc.stdout.splitlines()[1:]]]
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--seed", "3"]) == 0
    outs.append([p.replace(str(tmp_path / "a"), str(tmp_path / "b")) for p in outs[0]])
    names = [p.rsplit("/", 1)[1] for p in outs[0]]
    assert names == ["reconstructions.png", "samples.png", "samples_prior.png", "interpolation.png",
                     "traversal.png"]
    for a, b in zip(*outs):
        with Image.open(a) as img:
            img.verify()  # a complete, valid PNG
        with Image.open(a) as img:
            assert img.format == "PNG" and min(img.size) > 28
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()  # same seed, same images
    with Image.open(outs[0][1]) as samples:
        assert samples.size == (8 * 30 + 2, 8 * 30 + 2)  # 64 samples, 8 per row, 2-pixel padding


def test_another_seed_gives_other_images(tmp_path):
    torch.manual_seed(0)
    save_model(VAE(VAEConfig(**SMALL)), tmp_path / "fresh.pt")  # untrained: every latent dimension shows
    for seed in (3, 4):
        assert generate.main(["--checkpoint", str(tmp_path / "fresh.pt"), "--out", str(tmp_path / str(seed)),
                              "--seed", str(seed)]) == 0
    for name in ("samples.png", "samples_prior.png", "reconstructions.png"):
        assert (tmp_path / "3" / name).read_bytes() != (tmp_path / "4" / name).read_bytes(), name


def test_existing_checkpoint_is_not_overwritten_by_accident(trained, tmp_path):
    ckpt, _ = trained
    before = ckpt.read_bytes()
    line = one_line_error(run_script("train.py", *TINY, "--checkpoint", ckpt))
    assert "exists" in line and "--resume" in line and ckpt.read_bytes() == before


@pytest.mark.parametrize("args, flag", [
    (["--epochs", "0"], "--epochs"), (["--latent-dim", "0"], "--latent-dim"),
    (["--device", "tpu"], "--device"), (["--lr", "nan"], "--lr"), (["--batch-size", "-3"], "--batch-size"),
    (["--beta", "0"], "--beta"), (["--epochs", "two"], "--epochs"),
])
def test_bad_train_values_give_one_line_and_exit_2(args, flag, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "error" in err


@pytest.mark.parametrize("args", [["--n", "0"], ["--n", "257"], ["--digit", "10"], ["--seed", "-1"], ["--device", "gpu"]])
def test_bad_generate_values_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(args)
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_generate_without_checkpoint_says_train_first(tmp_path, capsys):
    assert "python train.py" in cli_error(generate.main, ["--checkpoint", tmp_path / "none.pt"], capsys)


def test_conv_only_flags_need_the_conv_arch(tmp_path, capsys):
    for flag in (["--res-blocks", 1], ["--res-blocks", 0, 1], ["--res-blocks", 0, 0, 0, 1], ["--channels", 8, 8]):
        line = cli_error(train.main, ["--arch", "mlp", *flag, "--checkpoint", tmp_path / "m.pt"], capsys)
        assert flag[0] in line and not (tmp_path / "m.pt").exists()
    line = cli_error(train.main, ["--res-blocks", 1, 2, 3, "--checkpoint", tmp_path / "m.pt"], capsys)
    assert "--res-blocks must be 1, 2 or 4 ints" in line and not (tmp_path / "m.pt").exists()


def test_evaluate_cli_writes_json(binarized_run, tmp_path, capsys):
    out = tmp_path / "nll.json"
    assert evaluate.main(["--checkpoint", str(binarized_run), "--k", "20", "--limit", "50",
                          "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "binarized protocol" in printed and "bits/dim" in printed and "moving average" not in printed
    r = json.loads(out.read_text())
    assert r["k"] == 20 and r["images"] == 50 and r["protocol"] == "binarized"
    assert r["nll"] <= r["neg_elbo"] + 1.0  # the IS bound is tighter than one-sample ELBO
    assert abs(r["bits_per_dim"] - r["nll"] / (784 * math.log(2))) < 1e-9
    assert abs(r["neg_elbo"] - r["recon"] - r["kl"]) < 1e-6
    line = cli_error(evaluate.main, ["--checkpoint", tmp_path / "missing.pt"], capsys)
    assert "no such checkpoint" in line and "python train.py" in line


def test_train_says_when_its_test_losses_are_the_averaged_weights(tmp_path, capsys):
    run = [*TINY, "--epochs", "1", "--mixture-components", "0"]
    assert train.main([*run, "--checkpoint", str(tmp_path / "a.pt")]) == 0  # the average is on by default
    assert "; test losses of the weights' moving average (--ema 0.999)" in capsys.readouterr().out
    assert train.main([*run, "--ema", "0", "--checkpoint", str(tmp_path / "b.pt")]) == 0
    assert "moving average" not in capsys.readouterr().out


def test_evaluate_says_when_it_scores_the_averaged_weights(mixture_run, capsys):
    assert evaluate.main(["--checkpoint", str(mixture_run), "--k", "2", "--limit", "5"]) == 0
    assert "(epoch 1, the weights' moving average (--ema))" in capsys.readouterr().out


def test_results_reach_the_json_file_before_a_closed_pipe_stops_the_printing(binarized_run, tmp_path, monkeypatch):
    def closed_pipe(*args, **kwargs):  # `evaluate.py ... | head -1`: the reader has left
        if str(args[0]).startswith("NLL"):
            raise BrokenPipeError

    monkeypatch.setattr(evaluate, "print", closed_pipe, raising=False)
    out = tmp_path / "r.json"
    with pytest.raises(BrokenPipeError):
        evaluate.main(["--checkpoint", str(binarized_run), "--k", "2", "--limit", "5", "--json", str(out)])
    assert json.loads(out.read_text())["k"] == 2


@pytest.mark.skipif(not os.path.exists("/dev/full") or not os.path.isdir("/proc/self/fd"), reason="Linux devices")
def test_json_goes_to_a_pipe_and_a_failed_json_write_keeps_the_printed_results(binarized_run, capsys):
    r, w = os.pipe()  # /proc/self/fd/W stands for /dev/stdout piped to another program
    try:
        assert evaluate.main(["--checkpoint", str(binarized_run), "--k", "2", "--limit", "5",
                              "--json", f"/proc/self/fd/{w}"]) == 0
        os.close(w)
        assert json.loads(os.read(r, 1 << 16))["k"] == 2
    finally:
        os.close(r)
    capsys.readouterr()
    assert cli.run(evaluate.main, ["--checkpoint", str(binarized_run), "--k", "2", "--limit", "5",
                                   "--json", "/dev/full"]) == 1  # a full disk
    out, err = capsys.readouterr()
    assert "/dev/full: cannot write" in err and err.count("\n") == 1 and "NLL" in out


def test_outputs_never_replace_what_a_script_reads(mixture_run, tmp_path, capsys):
    before = mixture_run.read_bytes()
    (tmp_path / "link.json").symlink_to(mixture_run)
    for out in (mixture_run, tmp_path / "link.json"):
        line = cli_error(evaluate.main, ["--checkpoint", mixture_run, "--k", 2, "--limit", 5, "--json", out], capsys)
        assert "is the checkpoint it scores" in line
    csv = f"{mixture_run}.metrics.csv"
    rows = read_csv(csv)
    line = cli_error(evaluate.main, ["--checkpoint", mixture_run, "--json", csv], capsys)
    assert "is that checkpoint's metrics CSV" in line and read_csv(csv) == rows
    line = cli_error(evaluate.main, ["--checkpoint", mixture_run, "--json", f"{mixture_run}.lock"], capsys)
    assert "is that checkpoint's lock file" in line
    line = cli_error(train_classifier.main, ["--out", mixture_run], capsys)
    assert "holds no classifier weights" in line and mixture_run.read_bytes() == before
    assert cli_error(generate.main, ["--checkpoint", ""], capsys) == "error: '': no such checkpoint; `python train.py` writes one"


def test_evaluate_with_a_fitted_prior(binarized_run, tmp_path, capsys, monkeypatch):
    out, fitted_to, fit = tmp_path / "nll.json", [], evaluate.fit_to_model

    def counted_fit(model, images, *args, **kwargs):
        fitted_to.append(images)
        return fit(model, images, *args, **kwargs)

    monkeypatch.setattr(evaluate, "fit_to_model", counted_fit)
    assert evaluate.main(["--checkpoint", str(binarized_run), "--k", "5", "--limit", "20",
                          "--prior-components", "5", "--json", str(out)]) == 0
    # --limit applies to the training images the prior is fitted to, too; a binarized model's: one binarized draw
    assert len(fitted_to) == 1
    assert torch.equal(fitted_to[0], TensorDataset.load("train", limit=20).binarized(BINARIZE_SEED + 1).images)
    printed = capsys.readouterr().out
    assert "fitted to 20 training images'" in printed
    assert "note: 20 training images for 5 components" in printed  # fewer than d + 1 = 5 per component
    r = json.loads(out.read_text())
    assert r["prior_components"] == 5 and math.isfinite(r["nll_mixture_prior"]) and r["nll_mixture_prior"] > 0
    assert r["prior_fit_images"] == 20
    # the N(0, I) figure does not depend on whether a fitted prior is scored beside it
    assert evaluate.main(["--checkpoint", str(binarized_run), "--k", "5", "--limit", "20",
                          "--json", str(out)]) == 0
    assert json.loads(out.read_text())["nll"] == pytest.approx(r["nll"], abs=1e-9)
    line = cli_error(evaluate.main, ["--checkpoint", binarized_run, "--prior-components", "3",
                                     "--sample-quality"], capsys)
    assert "--prior-components" in line


def test_conditional_training_and_generation(tmp_path, capsys):
    ckpt = tmp_path / "cvae.pt"
    assert train.main([*TINY, "--epochs", "1", "--conditional", "--checkpoint", str(ckpt)]) == 0
    model = VAE.from_checkpoint(ckpt)
    assert model.config.num_classes == 10
    assert model.sample(3, labels=7).shape == (3, 1, 28, 28)
    out = tmp_path / "img"
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(out), "--n", "5"]) == 0
    with Image.open(out / "samples.png") as im:  # 10 rows (one per digit) of 5
        assert im.size == (5 * 30 + 2, 10 * 30 + 2)
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(out), "--digit", "7", "--n", "4"]) == 0
    with Image.open(out / "samples_digit7.png") as im:
        assert im.size == (4 * 30 + 2, 30 + 2)
    assert "samples_digit7.png  (from the latent mixture)" in capsys.readouterr().out
    capsys.readouterr()
    r = evaluate.main(["--checkpoint", str(ckpt), "--k", "3", "--limit", "20"])
    assert r == 0 and "NLL" in capsys.readouterr().out


def test_two_d_latent_writes_manifold(tmp_path, capsys):
    ckpt = tmp_path / "vae2d.pt"
    assert train.main([*TINY, "--epochs", "1", "--latent-dim", "2", "--checkpoint", str(ckpt)]) == 0
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path)]) == 0
    with Image.open(tmp_path / "manifold.png") as im:
        assert im.size == (20 * 30 + 2, 20 * 30 + 2)
    # a conditional model's manifold is one digit's, named for it as its samples are
    assert train.main([*TINY, "--epochs", "1", "--latent-dim", "2", "--conditional", "--mixture-components", "0",
                       "--checkpoint", str(tmp_path / "c2d.pt")]) == 0
    assert generate.main(["--checkpoint", str(tmp_path / "c2d.pt"), "--out", str(tmp_path / "c"), "--digit", "3"]) == 0
    assert (tmp_path / "c" / "manifold_digit3.png").exists() and not (tmp_path / "c" / "manifold.png").exists()
    capsys.readouterr()
    assert generate.main(["--checkpoint", str(tmp_path / "c2d.pt"), "--out", str(tmp_path / "d")]) == 0
    assert "note: no manifold.png: a conditional model's manifold is one digit's (pass --digit D)" in \
        capsys.readouterr().out and not (tmp_path / "d" / "manifold.png").exists()


def test_traversal_shows_the_active_dimensions_and_counts_the_rest(tmp_path, capsys):
    """traversal.png has one row per active latent dimension (mean KL over the test set above
    ACTIVE_KL), most active first, and its output line says how many were left out."""
    ckpt = tmp_path / "vae.pt"
    assert train.main([*TINY, "--limit", "1024", "--epochs", "3", "--lr", "1e-2", "--latent-dim", "32", "--seed", "1",
                       "--precision", "fp32", "--mixture-components", "0", "--checkpoint", str(ckpt)]) == 0
    capsys.readouterr()
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "traversal.png" in line)
    shown, active, inactive = map(int, re.search(r"(\d+) of the (\d+) active latent dimensions \(of 32; "
                                                 r"(\d+) inactive\)", line).groups())
    model = VAE.from_checkpoint(ckpt)
    order, expected = active_dimensions(model, load_test_set())
    assert (active, inactive) == (expected, 32 - expected) and 0 < expected < 32
    assert shown == max(1, min(active, 16))
    with Image.open(tmp_path / "traversal.png") as im:
        assert im.size == (11 * 30 + 2, shown * 30 + 2)


def test_fit_mixture_script_adds_and_removes_a_mixture(mixture_run, tmp_path, capsys):
    ckpt = tmp_path / "vae.pt"
    c = load_checkpoint(mixture_run)
    c["latent_mixture"] = None  # as a run with --mixture-components 0 leaves it
    torch.save(with_checksums(c), ckpt)
    assert VAE.from_checkpoint(ckpt).latent_mixture is None
    assert fit_mixture.main(["--checkpoint", str(ckpt), "--components", "3"]) == 0
    assert VAE.from_checkpoint(ckpt).latent_mixture.weights.shape == (1, 3)
    assert fit_mixture.main(["--checkpoint", str(ckpt), "--components", "0"]) == 0
    assert VAE.from_checkpoint(ckpt).latent_mixture is None
    # the choice is the run's from now on: a --resume with nothing left to train does not fit one again
    assert load_checkpoint(ckpt)["args"]["mixture_components"] == 0
    assert train.main(["--checkpoint", str(ckpt), "--resume"]) == 0
    assert VAE.from_checkpoint(ckpt).latent_mixture is None
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "img"), "--n", "2"]) == 0
    assert "samples.png  (from the prior: the checkpoint has no latent mixture)" in capsys.readouterr().out


def test_a_binarized_models_mixture_is_fitted_to_binarized_images(tmp_path):
    """train.py and tools/fit_mixture.py fit a --binarize run's mixture to one binarized draw of the
    training images, as the encoder saw them (grey levels would be inputs it never trained on)."""
    ckpt = tmp_path / "bin.pt"
    assert train.main([*TINY, "--binarize", "--epochs", "1", "--mixture-components", "2",
                       "--checkpoint", str(ckpt)]) == 0
    trained = load_checkpoint(ckpt)["latent_mixture"]["means"]
    model = VAE.from_checkpoint(ckpt)  # its memory format, not training's: the last bits may differ
    train_set = TensorDataset.load("train", limit=512)
    draw = train_set.binarized(BINARIZE_SEED + 1)  # not the test set's draw
    assert torch.equal(fitting_set(train_set, True).images, draw.images)
    assert not torch.equal(draw.images, train_set.binarized(BINARIZE_SEED).images)
    fits = {binary: fit_to_model(model, images.images, images.labels, 2, seed=0)["means"]
            for binary, images in ((True, draw), (False, train_set))}
    assert torch.allclose(fits[True], trained, rtol=0, atol=1e-6)
    assert not torch.allclose(fits[False], trained, rtol=0, atol=1e-5)  # grey levels: other means
    assert fit_mixture.main(["--checkpoint", str(ckpt), "--components", "2"]) == 0
    assert torch.equal(load_checkpoint(ckpt)["latent_mixture"]["means"], fits[True])


def test_a_model_trained_by_ones_own_loop_is_saved_for_the_scripts(mnist_subset, tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**SMALL, num_classes=10))
    x, y = mnist_subset
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for i in range(0, 256, 64):
        loss = vae.loss(x[i:i + 64], y[i:i + 64]).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = tmp_path / "own.pt"
    save_model(vae, ckpt, binarize=True)
    loaded = VAE.from_checkpoint(ckpt)
    assert loaded.config == vae.config and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                                   vae.state_dict().values()))
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "images"), "--n", "2"]) == 0
    assert evaluate.main(["--checkpoint", str(ckpt), "--k", "2", "--limit", "10"]) == 0
    assert "(a model of one's own training loop, saved by lib.training.save_model), 10 test images, binarized" in \
        capsys.readouterr().out
    assert fit_mixture.main(["--checkpoint", str(ckpt), "--components", "1"]) == 0
    assert "cannot resume" in cli_error(train.main, ["--resume", "--checkpoint", ckpt], capsys)
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match="own.pt exists: pass overwrite=True to replace it"):
        save_model(vae, ckpt)
    with torch.no_grad():
        vae.to_stats.bias.fill_(float("nan"))  # a diverged run: written, read back, refused, the old file kept
    with pytest.raises(ValueError, match=r"own.pt: not saved: the scripts could not read this model: bad checkpoint "
                                         r"field model\['to_stats.bias'\]: expected finite"):
        save_model(vae, ckpt, overwrite=True)
    assert ckpt.read_bytes() == before and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(ValueError, match="not saved"):  # nothing made on the way: no folder, no lock file
        save_model(vae, tmp_path / "new" / "x.pt")
    assert not (tmp_path / "new").exists()
    (tmp_path / "own.pt.metrics.csv").write_text("epoch\n1\n")  # the replaced run's history goes with it
    save_model(VAE(VAEConfig(**SMALL, num_classes=10)), ckpt, overwrite=True)
    assert ckpt.read_bytes() != before and not (tmp_path / "own.pt.metrics.csv").exists()
    with pytest.raises(ValueError, match="binarize and overwrite must be True or False, got 1 and False"):
        save_model(vae, tmp_path / "b.pt", binarize=1)
    (tmp_path / "b.pt.file").touch()
    with monkeypatch.context() as patch, pytest.raises(ValueError, match="b.pt: not saved: cannot write its read-back "
                                                                         "copy in .*b.pt.file"):
        patch.setattr(tempfile, "tempdir", str(tmp_path / "b.pt.file"))  # no folder for the read-back copy
        save_model(VAE(VAEConfig(**SMALL)), tmp_path / "b.pt")

    class Mine(VAE):  # its own decode would not be saved: the scripts would score model.VAE's
        pass

    with pytest.raises(ValueError, match=r"save_model saves a model.VAE \(with a GaussianMixture .*\), got a Mine"):
        save_model(Mine(VAEConfig(**SMALL)), tmp_path / "mine.pt")
    with pytest.raises(ValueError, match="not saved: the scripts could not read this model: .*1-channel 32x32"):
        save_model(VAE(VAEConfig(**SMALL, image_size=32)), tmp_path / "big.pt")
    with pytest.raises(ValueError, match="not saved: .*--channels sets the conv arch's widths, but --arch is mlp"):
        save_model(VAE(VAEConfig(arch="mlp", channels=(8, 8))), tmp_path / "mlp.pt")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("mine", "big", "mlp")) or p == "b.pt"]


def test_generate_writes_mixture_and_prior_samples(mixture_run, tmp_path):
    assert generate.main(["--checkpoint", str(mixture_run), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "samples.png").exists() and (tmp_path / "samples_prior.png").exists()
    assert (tmp_path / "samples.png").read_bytes() != (tmp_path / "samples_prior.png").read_bytes()


def test_shipped_classifier_scores_test_images_near_zero_and_noise_high():
    clf = load_classifier()  # checks the SHA-256
    test = TensorDataset.load("test")
    train_set = TensorDataset.load("train", limit=10000)
    f_test, pred = classify(clf, test.images)
    f_train, _ = classify(clf, train_set.images)
    assert (pred == test.labels).double().mean() > 0.98
    floor = frechet_distance(f_test, f_train)  # 4.8 here; 2.4 against all 60,000 (README)
    noise = torch.rand(10000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fd_noise = frechet_distance(classify(clf, noise)[0], f_test)
    assert floor < 6.0 and fd_noise > 200 * floor, (floor, fd_noise)


KEYS = {"fd", "fd_prior", "class_entropy", "digit_accuracy", "nn_samples", "nn_test_recon"}


@pytest.mark.parametrize("conditional", [False, True])
def test_evaluate_sample_quality_cli(tmp_path, conditional, capsys):
    ckpt = tmp_path / "vae.pt"
    extra = ["--conditional"] if conditional else []
    assert train.main([*TINY, "--epochs", "1", *extra, "--checkpoint", str(ckpt)]) == 0
    for with_mixture in (True, False):
        if not with_mixture:
            assert fit_mixture.main(["--checkpoint", str(ckpt), "--components", "0"]) == 0
        out = tmp_path / f"q{with_mixture}.json"
        assert evaluate.main(["--checkpoint", str(ckpt), "--sample-quality", "--samples", "300",
                              "--limit", "300", "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        assert KEYS <= set(r) and r["mixture"] == with_mixture
        assert 0 <= r["class_entropy"] <= math.log(10) + 1e-9
        assert r["fd"] > 0 and r["fd_prior"] > 0 and r["nn_samples"] > 0 and r["nn_test_recon"] > 0
        assert (r["digit_accuracy"] is not None) == conditional
        if not with_mixture:
            assert r["fd"] == pytest.approx(r["fd_prior"], rel=0.5)  # both from the prior
    printed = capsys.readouterr().out
    assert "fd " in printed and "nn_samples" in printed


def test_sample_quality_errors_are_one_line(tmp_path, mixture_run, capsys):
    line = cli_error(evaluate.main, ["--checkpoint", mixture_run, "--sample-quality",
                                     "--classifier", tmp_path / "none.pt"], capsys)
    assert "none.pt" in line and "no classifier" in line
    fake = tmp_path / "clf.pt"
    fake.write_bytes(b"not a classifier")
    line = cli_error(evaluate.main, ["--checkpoint", mixture_run, "--sample-quality",
                                     "--classifier", fake], capsys)
    assert "SHA-256" in line


def test_benchmark_runs_and_reports_every_pipeline():
    """The README's benchmark command still runs (here on 256 images; no timing is asserted)."""
    out = subprocess.run([sys.executable, "benchmarks/epoch_speed.py", "--models", "mlp",
                          "--rounds", "1", "--limit", "256"], capture_output=True, text=True,
                         cwd=ROOT, timeout=240)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("mlp ")}
    assert {"project", "conventional", "conv."} <= rows
    assert "speed-up:" in out.stdout


def test_a_learned_prior_is_what_samples_and_the_likelihood_use(tmp_path, capsys):
    """--flow-prior: the KL is sampled (and labelled so), the latent mixture is fitted as with N(0, I), evaluate.py
    scores the model under its own prior and says so, generate.py writes both grids."""
    ckpt = tmp_path / "flow.pt"
    assert train.main([*TINY, "--epochs", "1", "--flow-prior", "2", "--checkpoint", str(ckpt)]) == 0
    assert "KL" in (out := capsys.readouterr().out) and ", sampled)" in out
    assert load_checkpoint(ckpt)["latent_mixture"] is not None
    assert evaluate.main(["--checkpoint", str(ckpt), "--k", "5", "--limit", "20"]) == 0
    assert "prior a learned flow (L = 2 coupling layers)" in capsys.readouterr().out
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "img")]) == 0
    assert (tmp_path / "img" / "samples.png").exists() and (tmp_path / "img" / "samples_prior.png").exists()


def test_time_to_quality_runs_both_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    from benchmarks import time_to_quality

    silent, tutorial = tmp_path / "silent.py", tmp_path / "tutorial.py"
    silent.write_text("print('hello')\n")
    tutorial.write_text("print('====> Test set loss: 300.0000')\n")  # stands in for pytorch/examples' VAE

    def run(*args):  # as the command line runs it: (exit code, stdout, stderr)
        capsys.readouterr()
        try:
            code = cli.run(time_to_quality.main, [str(a) for a in args])
        except SystemExit as e:  # argparse's exit 2
            code = e.code
        return code, *capsys.readouterr()

    taken = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}  # the script's: given back below
    try:
        for args, code, what in ((["--tutorial"], 2, "expected one argument"),
                                 (["--tutorial", tmp_path / "none.py"], 1, "no such file"),
                                 (["--tutorial", tutorial, "--", "--epochs", "0"], 2, "--epochs"),
                                 (["--tutorial", tutorial, "--", "--iw-start", "2"], 1, "--iw-k is 1"),
                                 (["--tutorial", tutorial, "--", "--resume"], 1, "runs afresh"),
                                 (["--tutorial", tutorial, "--", "--checkpoint", "checkpoints/vae.pt"], 1, "afresh"),
                                 (["--tutorial", silent], 1, "printed no test loss")):
            got, _, err = run(*args)
            assert got == code and err.count("\n") == 1 and what in err and "Traceback" not in err, (args, err)
        got, out, err = run("--tutorial", tutorial, "--", *TINY, "--epochs", "1", "--mixture-components", "0")
        assert signal.getsignal(signal.SIGHUP) is time_to_quality.interrupted  # a closed terminal cleans up too
    finally:
        for s, handler in taken.items():
            signal.signal(s, handler)
    assert got == 0, err
    assert re.search(r"^300\.00 \(tutorial, 10 ep\.\)\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, re.M), out
    assert re.search(r"^95\s+never\s+never\s*$", out, re.M), out  # neither reached 95 nats
    line = "epoch   2/2  train   296.29  test   288.41 (recon 280.00 + KL 8.41)  IW-4 bound: train 296.29 test 288.40"
    assert time_to_quality.PROJECT_LOSS.search(line).group(1) == "288.41"  # the ELBO, not the bound after it
