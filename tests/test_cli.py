"""The scripts end to end, in tmp_path, on 512 real images and a tiny model."""

import csv

import pytest
import torch
from PIL import Image

import generate
import train
from checkpoint import load_checkpoint
from conftest import TINY, one_line_error, run_script
from model import VAE


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def same_metrics(a, b):
    """Metrics rows equal in every column but wall-clock seconds."""
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    return drop(a) == drop(b)


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
    rows = read_csv(ckpt.with_name("vae.metrics.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"epoch", "train_loss", "test_loss", "recon", "kl", "seconds"} <= set(rows[0])
    for r in rows:
        assert abs(float(r["test_loss"]) - float(r["recon"]) - float(r["kl"])) < 1e-3
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    model = VAE.from_checkpoint(ckpt)  # rebuilt from the file alone
    assert not model.training and model.config.latent_dim == 4


def test_generate_writes_valid_pngs_and_repeats(trained, tmp_path):
    ckpt, _ = trained
    outs = []
    for name in ("a", "b"):
        proc = run_script("generate.py", "--checkpoint", ckpt, "--out", tmp_path / name, "--seed", 3)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout.split())
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


def test_resume_matches_straight_run(tmp_path, capsys):
    """On CPU, 2 epochs then --resume to 4 gives the same weights and metrics as 4 straight."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert train.main([*TINY, "--epochs", "4", "--checkpoint", str(a)]) == 0
    assert train.main([*TINY, "--epochs", "2", "--checkpoint", str(b)]) == 0
    # No model or run flags: --resume takes them from the checkpoint (and says so if they differ).
    assert train.main(["--epochs", "4", "--checkpoint", str(b), "--resume", "--lr", "0.5"]) == 0
    assert "--lr 0.5 ignored" in capsys.readouterr().out
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert cb["epoch"] == 4
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert same_metrics(read_csv(tmp_path / "a.metrics.csv"), read_csv(tmp_path / "b.metrics.csv"))


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


@pytest.mark.parametrize("args", [["--n", "0"], ["--digit", "10"], ["--seed", "-1"], ["--device", "gpu"]])
def test_bad_generate_values_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(args)
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_generate_without_checkpoint_says_train_first(tmp_path):
    line = one_line_error(run_script("generate.py", "--checkpoint", tmp_path / "none.pt"))
    assert "python train.py" in line


def test_corrupt_checkpoint_gives_one_line(trained, tmp_path):
    ckpt, _ = trained
    bad = tmp_path / "bad.pt"
    bad.write_bytes(ckpt.read_bytes()[:5000])  # truncated
    for script, args in (("generate.py", []), ("train.py", ["--resume", "--epochs", 3])):
        line = one_line_error(run_script(script, "--checkpoint", bad, *args))
        assert str(bad) in line and "corrupt" in line


def test_res_blocks_train_and_resume_a_checkpoint_from_before_the_flag(tmp_path, capsys):
    """The conv model has one residual block per resolution unless --res-blocks says otherwise;
    the checkpoint stores the number. A checkpoint written before the flag existed (no res_blocks
    or iw_k in its config and flags) resumes as the plain model it is."""
    deep = tmp_path / "deep.pt"
    assert train.main([*TINY, "--epochs", "1", "--checkpoint", str(deep)]) == 0
    c = load_checkpoint(deep)
    assert c["model_config"]["res_blocks"] == 1 and c["args"]["res_blocks"] == 1
    assert VAE.from_checkpoint(deep).config.res_blocks == 1

    old = tmp_path / "old.pt"
    assert train.main([*TINY, "--epochs", "1", "--res-blocks", "0", "--checkpoint", str(old)]) == 0
    c = load_checkpoint(old)
    for d, key in ((c["args"], "res_blocks"), (c["args"], "iw_k"), (c["model_config"], "res_blocks")):
        del d[key]
    torch.save(c, old)
    assert train.main(["--epochs", "2", "--checkpoint", str(old), "--resume"]) == 0
    c = load_checkpoint(old)
    assert c["epoch"] == 2 and c["args"]["res_blocks"] == 0 and c["args"]["iw_k"] == 1
    assert c["model_config"]["res_blocks"] == 0


def test_res_blocks_need_the_conv_arch(tmp_path):
    line = one_line_error(run_script("train.py", "--arch", "mlp", "--res-blocks", 1,
                                     "--checkpoint", tmp_path / "m.pt"))
    assert "--res-blocks" in line and not (tmp_path / "m.pt").exists()
