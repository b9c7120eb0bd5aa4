"""The boundary: every untrusted input (checkpoint files, model configs, the latent mixture, the optimiser state,
the arguments of the model's Python API) is checked here, once, before use, with a one-line UserError.

A checkpoint (format FORMAT), read with torch.load(weights_only=True), is a dict of plain types and tensors: KEYS and
sha256 (of the SEALED parts). model and ema are state dicts of the weights and of their moving average (or None; else
the weights a loaded model gets); epoch counts complete epochs, step the steps done in the next, partial [step, 3]
their sums; rng holds generator states, metrics a dict per epoch, args the training flags; latent_mixture or None.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import operator
import os
import pickle
import warnings
import zipfile
from dataclasses import fields

import torch

FORMAT = 3
MAX_EPOCHS = 1_000_000
# Far above any useful MNIST model: a config that asks for more is refused before torch tries to allocate it.
MAX_SIZE = {"image_channels": 64, "image_size": 1024, "latent_dim": 4096, "hidden_dim": 65536,
            "num_classes": 1000, "channels": 4096, "res_blocks": 64, "flow_prior": 64}
ZERO_ALLOWED = ("num_classes", "res_blocks", "flow_prior")  # int config fields whose 0 means none (others: >= 1)
# config fields of several ints: how many they take (an int is one), and what the ints are
INT_LISTS = {"channels": ((2,), "at 1/2, 1/4 resolution"),
             "res_blocks": ((1, 2, 4), "all; encoder, decoder; or encoder at 1/2, 1/4, decoder at 1/4, 1/2")}
SEALED = ("model", "ema", "optimizer", "rng", "latent_mixture")  # the parts whose SHA-256 a checkpoint stores
# The metrics CSV's first columns, in every row; a key train.py adds to its rows becomes a column after them.
METRIC_FIELDS = ("epoch", "train_loss", "train_recon", "train_kl", "test_loss", "recon", "kl",
                 "kl_weight", "seconds")  # recon, kl: test_loss's two terms; kl_weight: the one the epoch ended at
IW_FIELDS = ("train_iw", "test_iw")  # --iw-k > 1: the negative K-sample bound (train: the objective's estimate), test
KEYS = ("format", "model_config", "model", "ema", "optimizer", "epoch", "step", "partial", "partial_seconds", "rng",
        "metrics", "args", "latent_mixture")  # and sha256, checked on its own


class UserError(ValueError):
    """A problem the user can fix (a flag, a file, an argument); str() is one line naming it."""


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)  # numpy scalars too


def first_line(e: BaseException) -> str:
    """The informative part of an exception's message, on one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    # "Error(s) in loading state_dict for VAE:" says what, its next line why: a line ending in ":" goes on
    return " ".join(lines[:next((i + 1 for i, line in enumerate(lines) if not line.endswith(":")), len(lines))])


# -- the Python API -----------------------------------------------------------------------------

def check_config(config, choices: dict) -> None:
    """UserError unless every field of a VAEConfig has its type and range (`choices`: the string fields' values)."""
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed or not isinstance(getattr(config, name), str):
            raise UserError(f"{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    for name in MAX_SIZE:
        v, low = getattr(config, name), 0 if name in ZERO_ALLOWED else 1
        if name in INT_LISTS:
            counts, meaning = INT_LISTS[name]
            ints = (v,) if 1 in counts and is_int(v) else v
            if not (isinstance(ints, (list, tuple)) and len(ints) in counts
                    and all(is_int(c) and low <= c <= MAX_SIZE[name] for c in ints)):
                how_many = " or ".join(filter(None, (", ".join(map(str, counts[:-1])), str(counts[-1]))))
                raise UserError(f"{name} must be {how_many} ints in [{low}, {MAX_SIZE[name]}] "
                                f"({meaning}), got {v!r}")
        elif not is_int(v) or not low <= v <= MAX_SIZE[name]:
            raise UserError(f"{name} must be an int in [{low}, {MAX_SIZE[name]}], got {v!r}")
    if config.arch == "mlp" and any((config.res_blocks,) if is_int(config.res_blocks) else config.res_blocks):
        raise UserError(f"res_blocks needs arch 'conv', got {config.res_blocks} with arch 'mlp'")
    if config.arch == "conv" and config.image_size % 4:
        raise UserError(f"the conv arch needs image_size % 4 == 0, got {config.image_size}")
    if config.flow_prior and config.latent_dim < 2:
        raise UserError(f"flow_prior needs latent_dim >= 2 (a coupling layer keeps half of z), got {config.latent_dim}")


def as_labels(labels, num_classes: int, n: int, device) -> torch.Tensor | None:
    """Labels (an int, a list or a tensor of class numbers) as a [n] long tensor on `device` (one label is repeated
    n times), or None for an unconditional model; UserError for labels the model cannot take."""
    if num_classes == 0:
        if labels is not None:
            raise UserError("this VAE is unconditional: it takes no labels")
        return None
    if labels is None:
        raise UserError("this VAE is conditional: pass labels (digit classes)")
    try:
        labels = torch.as_tensor(labels, device=device).reshape(-1)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # a str, 2**70, a ragged list...
        raise UserError(f"labels must be integer class numbers, got {labels!r:.60}") from None
    labels = labels.expand(n) if labels.numel() == 1 else labels
    if labels.shape[0] != n:
        raise UserError(f"got {labels.shape[0]} labels for a batch of {n}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"labels must be integer class numbers, got dtype {labels.dtype}")
    labels = labels.long()
    # Checked on the CPU only: on a GPU the comparison would stall the step on a host sync.
    if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"labels must be in [0, {num_classes - 1}]")
    return labels


def model_of(model) -> tuple:
    """(config, device) of the VAE an API call goes to; UserError unless its weights are float32."""
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise UserError(f"the model's weights are {dtype}: keep them float32 (vae.float()); torch.autocast runs bf16")
    return model.config, model.device


def check_input(model, x, labels, k: int = 1, chunk: int = 1, eps=None, reduction: str = "mean", beta: float = 1.0,
                priors=None, generator=None):
    """The arguments of VAE.encode, loss, log_likelihood and reconstruct (`model`: the VAE they go to): images x, a
    float32 tensor [B, C, H, W] (B >= 1) of pixels in [0, 1] on the model's device; labels as `as_labels` takes them;
    ints k, chunk >= 1; the noise eps, a float tensor [k, B, latent_dim] on that device, but not float64 (z is formed
    in fp32: float64 noise would only be rounded); a reduction; a finite beta >= 0; priors (one at least) whose
    log_prob maps [N, latent_dim] to [N]; a generator as `check_generator` takes it. Pixel values and finite noise
    are checked on the CPU only: on a GPU the test would stall the step on a host sync. Returns the labels as a
    tensor."""
    config, device = model_of(model)
    for name, v in (("k", k), ("chunk", chunk)):
        if not is_int(v) or v < 1:
            raise UserError(f"{name} must be an int >= 1, got {v!r}")
    if reduction not in ("mean", "sum", "none"):
        raise UserError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not is_number(beta) or beta < 0:
        raise UserError(f"beta must be a finite number >= 0, got {beta!r}")
    check_generator(generator, device)
    shape = (config.image_channels, config.image_size, config.image_size)
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
        raise UserError(f"x must be a float32 tensor of pixel values in [0, 1], got {got} "
                        "(torch.as_tensor(x).float(), divided by 255 for 0-255 grey levels)")
    if x.dim() != 4 or tuple(x.shape[1:]) != shape or not len(x):
        raise UserError(f"x must be [B, {', '.join(map(str, shape))}] with B >= 1, got {list(x.shape)}")
    check_device("x", x, device)
    if eps is not None and not (isinstance(eps, torch.Tensor) and eps.is_floating_point() and eps.dtype != torch.float64
                                and tuple(eps.shape) == (k, x.shape[0], config.latent_dim)):
        raise UserError(f"eps must be a float tensor, not float64, [{k}, {x.shape[0]}, {config.latent_dim}] (K, B, d), "
                        f"got {getattr(eps, 'dtype', type(eps).__name__)} {list(getattr(eps, 'shape', []))}")
    check_device("eps", eps, device)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():  # x holds one image at least (above)
        low, high = torch.aminmax(x)
        if not (low >= 0 and high <= 1):  # also catches NaN
            raise UserError(f"x must hold pixel values in [0, 1], got values in [{low.item():g}, "
                            f"{high.item():g}] (divide 0-255 grey levels by 255)")
        if eps is not None and not torch.isfinite(eps).all():
            raise UserError("eps must hold finite values (N(0, I) noise)")
    for p in [] if priors is None else priors or [None]:  # an empty list: refused as an object without log_prob
        try:
            out = p.log_prob(torch.zeros(2, config.latent_dim, device=device))
            why = "" if tuple(out.shape) == (2,) and not out.isnan().any() else f"; got {list(out.shape)} or NaN"
        except Exception as e:  # an object of the caller's: any failure of its log_prob means the same
            why = f"; it raised {type(e).__name__}: {first_line(e)}"
        if why:
            raise UserError(f"prior must be None, an object whose log_prob maps latent codes [N, {config.latent_dim}] "
                            f"on {device} to [N] log-densities, not NaN (a GaussianMixture), or a non-empty list of "
                            f"these{why}")
    return as_labels(labels, config.num_classes, x.shape[0], x.device)


def check_latent(model, z, labels, n=None, generator=None, prior: bool = False) -> torch.Tensor | None:
    """The arguments of VAE.decode (latent codes z, a float tensor [B, latent_dim] on the model's device) or of
    VAE.sample (a number of images n >= 1, a generator as `check_generator` takes it, prior a bool), and their labels
    as `as_labels` takes them; returns the labels."""
    config, device = model_of(model)
    if z is not None and not (isinstance(z, torch.Tensor) and z.is_floating_point() and z.dim() == 2
                              and z.shape[1] == config.latent_dim and len(z)):
        got = f"{getattr(z, 'dtype', type(z).__name__)} {list(getattr(z, 'shape', []))}"
        raise UserError(f"z must be a float tensor [B, {config.latent_dim}] with B >= 1, got {got}")
    check_device("z", z, device)
    if z is None and not (is_int(n) and n >= 1):
        raise UserError(f"n must be an int >= 1, got {n!r}")
    if not isinstance(prior, bool):
        raise UserError(f"prior must be True or False, got {prior!r}")
    means = getattr(None if z is not None or prior else model.latent_mixture, "means", None)  # a GaussianMixture's
    if isinstance(means, torch.Tensor) and tuple(means.shape[::2]) != (max(1, config.num_classes), config.latent_dim):
        want = f"{config.num_classes} (one per class)" if config.num_classes else "1"
        raise UserError(f"latent_mixture: {means.shape[0]} group{'s' if len(means) != 1 else ''} of {means.shape[2]}-d "
                        f"components; this model samples from {want} of {config.latent_dim}")
    check_generator(generator, device)
    return as_labels(labels, config.num_classes, len(z) if z is not None else n, None if z is None else z.device)


def check_group(group, groups: int) -> int:
    """The group of a GaussianMixture's `groups` that `group` names (None: the only one; an int, numpy or 0-d)."""
    if group is None and groups > 1:
        raise UserError("a mixture per class is p(z|y), not one p(z): pass group= (the class)")
    try:
        index = 0 if group is None else operator.index(group)
    except TypeError:
        index = None
    if isinstance(group, bool) or index is None or not 0 <= index < groups:
        raise UserError(f"group must be an int in [0, {groups - 1}], got {group!r}")
    return index


def unavailable(device: torch.device) -> str | None:
    """Why torch cannot use this cpu, cuda or mps device here, or None if it can."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available"
    return None


def check_device(name: str, t: torch.Tensor | None, device: torch.device) -> None:
    if t is not None and t.device != device:
        raise UserError(f"{name} is on {t.device}, the model on {device}: pass {name}.to(vae.device)")


def check_generator(generator, device: torch.device) -> None:
    """None, or a torch.Generator on the model's kind of device, where the draws are made."""
    if generator is not None and not (isinstance(generator, torch.Generator) and generator.device.type == device.type):
        got = f"one on {generator.device}" if isinstance(generator, torch.Generator) else type(generator).__name__
        raise UserError(f"generator must be None or a torch.Generator on {device.type} (the model's), got {got}")


def check_mixture(mixture, latent_dim: int, groups: int) -> None:
    """UserError unless `mixture` holds finite weights [G, M] (positive, summing to 1), means [G, M, d] and
    lower-triangular scale_tril [G, M, d, d] with a positive diagonal."""
    if not isinstance(mixture, dict) or set(mixture) != {"weights", "means", "scale_tril"}:
        raise UserError("latent mixture: expected the keys weights, means, scale_tril")
    w, m, L = mixture["weights"], mixture["means"], mixture["scale_tril"]
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (w, m, L)):
        raise UserError("latent mixture: weights, means and scale_tril must be float tensors")
    if w.dim() != 2 or w.shape[0] != groups or w.shape[1] < 1:
        raise UserError(f"latent mixture: weights must be [{groups}, M], got {list(w.shape)}")
    g, c, d = *w.shape, latent_dim  # groups, components, dimensions
    if tuple(m.shape) != (g, c, d) or tuple(L.shape) != (g, c, d, d):
        raise UserError(f"latent mixture: means and scale_tril must be [{g}, {c}, {d}(, {d})]")
    if not all(torch.isfinite(t).all() for t in (w, m, L)):
        raise UserError("latent mixture: holds non-finite values")
    if (w <= 0).any() or not torch.allclose(w.sum(1), torch.ones(g, dtype=w.dtype), atol=1e-4):
        raise UserError("latent mixture: weights must be positive and sum to 1 per group")
    if (torch.diagonal(L, dim1=-2, dim2=-1) <= 0).any() or not torch.equal(L, L.tril()):
        raise UserError("latent mixture: scale_tril must be lower-triangular with a positive diagonal")


# -- files ----------------------------------------------------------------------------------------

def as_path(path, what: str = "checkpoint") -> str:
    """A str, bytes or os.PathLike path as a str (for the messages too); UserError for anything else."""
    try:
        return os.fsdecode(path)
    except TypeError:
        raise UserError(f"a {what} path must be a str, bytes or an os.PathLike, got {type(path).__name__}") from None


def read_archive(path, map_location=None, what: str = "checkpoint") -> dict:
    """The dict in a torch.save file, read safely: a file that is not a torch.save (zip) archive is never unpickled,
    and torch.load(weights_only=True) admits tensors and plain data only. UserError, one line naming the file, for a
    missing, foreign, truncated or crafted file (whose payload never runs), or anything but a dict."""
    path = as_path(path, what)
    if not os.path.isfile(path):
        why = (f"no such {what}" + ("; `python train.py` writes one" if what == "checkpoint" else "")
               if not os.path.exists(path) else f"not a file; expected a {what}")
        raise UserError(f"{path or repr(path)}: {why}")
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        try:
            device = torch.device(map_location)
        except (RuntimeError, TypeError, ValueError):
            raise UserError(f"{path}: cannot load onto {map_location!r}: not a device") from None
        why = "not a device this code runs on" if device.type not in ("cpu", "cuda", "mps") else unavailable(device)
        if why:
            raise UserError(f"{path}: cannot load onto {device}: {why}")
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise UserError(f"{path}: refused to load: not a torch.save archive (truncated, corrupt "
                        "or a foreign file); nothing in it was run")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: our error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refused to load: it holds objects other than tensors and plain "
                        "data (not a checkpoint written by train.py); nothing in it was run") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError,
            TypeError, AttributeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise UserError(f"{path}: not a readable checkpoint, truncated or corrupt ({first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a {what} written by this project (holds a {type(ckpt).__name__})")
    return ckpt


def digest(obj) -> str:
    """SHA-256 over nested dicts, lists and tensors (keys sorted; each tensor's dtype, shape and bytes)."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=str):
                h.update(repr(k).encode())
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def with_checksums(ckpt: dict) -> dict:
    """The checkpoint with the SHA-256 of its SEALED parts stored under "sha256"."""
    ckpt["sha256"] = {k: digest(ckpt[k]) for k in SEALED if ckpt.get(k) is not None}
    return ckpt


def load_checkpoint(path, map_location=None) -> dict:
    """A checkpoint written by train.py, read (read_archive) and checked: format, checksums (so a flipped bit is
    reported, not used), and the type and range of every field. `load_model` builds the model from it."""
    path = as_path(path)
    ckpt = read_archive(path, map_location)

    def require(ok, name: str, why: str):
        if not ok:
            raise UserError(f"{path}: bad checkpoint field {name}: {why}")

    if "format" in ckpt and (ckpt["format"] != FORMAT or not is_int(ckpt["format"])):
        raise UserError(f"{path}: checkpoint format {ckpt['format']!r}, this code reads {FORMAT}: train it "
                        "again, or use the code it was written with (git log)")
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a checkpoint written by train.py (missing {', '.join(missing)})")
    sums = ckpt.get("sha256")
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise UserError(f"{path}: corrupt: no checksums, or they are not a dict of strings")
    for k in SEALED:
        if (ckpt[k] is None) != (k not in sums) or (k in sums and digest(ckpt[k]) != sums[k]):
            raise UserError(f"{path}: corrupt: the {k} state does not match its stored SHA-256 "
                            "(a damaged or edited file)")
    require(isinstance(ckpt["model_config"], dict) and None not in ckpt["model_config"].values(),
            "model_config", "not a dict of values")
    for key in ("model", "ema") if ckpt["ema"] is not None else ("model",):
        require(isinstance(ckpt[key], dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in ckpt[key].items()), key, "not a dict of named tensors")
        for name, t in ckpt[key].items():
            require(t.is_floating_point() and torch.isfinite(t).all(), f"{key}[{name!r}]",
                    f"expected finite floating point values, got a {t.dtype} tensor")
    require(ckpt["ema"] is None or ckpt["ema"].keys() == ckpt["model"].keys(), "ema", "not the model's weights")
    epoch, step, partial, seconds, metrics = (ckpt[k] for k in ("epoch", "step", "partial", "partial_seconds", "metrics"))
    require(is_int(epoch) and 0 <= epoch <= MAX_EPOCHS, "epoch", f"expected an int in [0, {MAX_EPOCHS}], got {epoch!r}")
    require(is_int(step) and step >= 0, "step", f"expected an int >= 0, got {step!r}")
    require(is_number(seconds) and seconds >= 0, "partial_seconds", f"expected a number >= 0, got {seconds!r}")
    require(not step or isinstance(partial, torch.Tensor) and partial.is_floating_point()
            and tuple(partial.shape) == (step, 3), "partial", f"expected a float tensor [{step}, 3] (the steps' sums)")
    require(partial is None or step, "partial", "present at an epoch boundary (step 0)")
    require(isinstance(metrics, list) and len(metrics) == epoch, "metrics", f"expected one entry per epoch ({epoch})")
    for i, row in enumerate(metrics):
        require(isinstance(row, dict) and all(isinstance(k, str) and is_number(v) for k, v in row.items())
                and row.get("epoch") == i + 1 and set(METRIC_FIELDS) <= set(row), f"metrics[{i}]",
                f"expected a dict of finite numbers for epoch {i + 1}, with {', '.join(METRIC_FIELDS)} at least")
    require(isinstance(ckpt["args"], dict), "args", "not a dict")
    require(not is_int(ckpt["args"].get("epochs")) or ckpt["args"]["epochs"] >= epoch + (step > 0), "args['epochs']",
            f"{ckpt['args'].get('epochs')!r}, below the epochs done ({epoch}, and {step} steps)")
    for key in ("optimizer", "rng", "latent_mixture"):
        require(ckpt[key] is None or isinstance(ckpt[key], dict), key, "not a dict")
    for k, state in (ckpt["rng"] or {}).items():
        require(isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1,
                f"rng[{k!r}]", "expected a generator state (a 1-d uint8 tensor)")
    return ckpt


def defaulted_fields(config: dict, config_class) -> list[str]:
    """The fields of config_class that a stored config lacks, which loading gives their defaults."""
    return sorted({f.name for f in fields(config_class)} - set(config))


def load_model(path, model_class, config_class, mixture_class, map_location=None):
    """(model in eval mode on map_location, else on the CPU (checkpoints store CPU tensors), checkpoint dict) from a
    checkpoint: the config, the weights (their moving average, where the run kept one) and the latent mixture, each
    checked; UserError naming the file."""
    path = as_path(path)
    ckpt = load_checkpoint(path, map_location)
    config = ckpt["model_config"]  # a field it lacks (added to the config after it was written) takes its default
    unknown, defaulted = set(config) - {f.name for f in fields(config_class)}, defaulted_fields(config, config_class)
    if unknown:
        raise UserError(f"{path}: bad model config: unknown keys {', '.join(sorted(map(repr, unknown)))}")
    try:
        with torch.device("meta"):  # shapes only: a config far larger than the weights stored allocates nothing
            shapes = {k: v.shape for k, v in model_class(config_class(**config)).state_dict().items()}
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad model config ({first_line(e)})") from None
    kept = ("model", "ema") if ckpt["ema"] is not None else ("model",)  # loaded in turn: the average, if any, stays
    for key in kept:
        for name in sorted(set(shapes) | set(ckpt[key])):
            got, want = getattr(ckpt[key].get(name), "shape", None), shapes.get(name)
            if got != want:
                raise UserError(f"{path}: weights do not fit the stored model config: {key}[{name!r}] is "
                                f"{'missing' if got is None else list(got)}, the config makes "
                                f"{'none' if want is None else list(want)}"
                                + (f" (it lacks {', '.join(defaulted)}: taken as the defaults)" if defaulted else ""))
    model = model_class(config_class(**config))
    for key in kept:
        model.load_state_dict(ckpt[key])
    if ckpt["latent_mixture"] is not None:
        try:
            check_mixture(ckpt["latent_mixture"], model.config.latent_dim, max(1, model.config.num_classes))
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        model.latent_mixture = mixture_class(**ckpt["latent_mixture"])
    weights = next(iter(ckpt["model"].values()), None)
    return model.to(weights.device if weights is not None else "cpu").eval(), ckpt


def check_resumable(ckpt: dict, path, params: list) -> None:
    """What --resume reads beyond the model: the RNG states and an Adam state dict for exactly these parameters (one
    group, sane hyper-parameters; per parameter a finite step, exp_avg and exp_avg_sq of its shape).
    Optimizer.load_state_dict checks the group sizes only; anything else would fail, or mislead, at the first step."""
    def require(ok, why: str, name: str = "optimizer"):
        if not ok:
            raise UserError(f"{path}: bad checkpoint field {name}: {why}")

    if ckpt["optimizer"] is None or ckpt["rng"] is None or set(ckpt["rng"]) != {"torch", "noise"}:
        raise UserError(f"{path}: cannot resume: no optimizer state or RNG state (a model saved to be used, by "
                        "lib.training.save_model, say; --overwrite starts a new run there)")
    require((ckpt["args"]["ema"] > 0) == (ckpt["ema"] is not None), "disagrees with args['ema']", "ema")
    try:
        torch.Generator().set_state(ckpt["rng"]["torch"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"{path}: bad checkpoint field rng['torch']: not a CPU generator state "
                        f"({first_line(e)})") from None
    groups, per_param, n = ckpt["optimizer"].get("param_groups"), ckpt["optimizer"].get("state"), len(params)
    g = groups[0] if isinstance(groups, list) and len(groups) == 1 else None
    require(isinstance(g, dict), "expected one parameter group")
    require(g.get("params") == list(range(n)), f"its group does not list this model's {n} parameters")
    betas = g.get("betas")
    require(isinstance(betas, (list, tuple)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas),
            f"betas must be two numbers in [0, 1), got {betas!r}")
    for name in ("lr", "eps", "weight_decay"):
        require(is_number(g.get(name)) and g[name] >= 0, f"{name} must be a finite number >= 0, got {g.get(name)!r}")
    require(isinstance(per_param, dict) and set(per_param) <= set(range(n)),
            "its state is not keyed by this model's parameters")
    for i, s in per_param.items():
        require(isinstance(s, dict) and set(s) == {"step", "exp_avg", "exp_avg_sq"},
                f"parameter {i}: expected step, exp_avg and exp_avg_sq")
        step = s["step"]
        require(isinstance(step, torch.Tensor) and step.numel() == 1 and step.is_floating_point()
                and torch.isfinite(step).all() and step.item() >= 0, f"parameter {i}: step must be a finite float >= 0")
        for name in ("exp_avg", "exp_avg_sq"):
            t, p = s[name], params[i]
            require(isinstance(t, torch.Tensor) and t.dtype == p.dtype and t.shape == p.shape,
                    f"parameter {i}: {name} must be a {p.dtype} tensor of shape {list(p.shape)}")
            require(torch.isfinite(t).all() and not (name == "exp_avg_sq" and (t < 0).any()),
                    f"parameter {i}: {name} holds non-finite or negative values")
