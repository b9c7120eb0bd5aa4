"""Test-set likelihoods of a model, shared by train.py (per-epoch test loss) and evaluate.py.

- `evaluate_elbo`: the negative ELBO (beta = 1) with one seeded posterior sample per image.
- `importance_nll`: -log p(x) by importance sampling with the encoder as proposal (Burda, Grosse
  & Salakhutdinov 2015, eq. 8), a bound that tightens with K and converges to -log p(x).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from data import TensorDataset
from model import VAE


@torch.inference_mode()
def evaluate_elbo(model: VAE, data: TensorDataset, batch_size: int, seed: int,
                  conditional: bool, bf16: bool = False) -> dict:
    """Test negative ELBO (beta = 1) in nats per image: {"loss", "recon", "kl"}.

    bf16: under bf16 autocast, as training runs; on the trained default model this moved the test
    loss by 0.001 nats and took about 6% of an epoch instead of 9% in fp32 (benchmarks/README.md).
    evaluate.py always uses fp32.
    """
    was_training = model.training
    model.eval()
    device = data.images.device
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(2, device=device)
    for x, y in data.batches(batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = model.draw_eps(len(x), gen, torch.bfloat16 if bf16 else torch.float32)
            p = model.loss(x, y if conditional else None, reduction="sum", eps=eps)
        sums += torch.stack([p.recon, p.kl])
    model.train(was_training)
    recon, kl = (sums / len(data)).tolist()
    return {"loss": recon + kl, "recon": recon, "kl": kl}


@torch.inference_mode()
def importance_nll(model: VAE, data: TensorDataset, k: int, chunk: int, batch_size: int, seed: int,
                   conditional: bool, prior: dict | None = None) -> float:
    """Mean of -log p(x) over `data`, in nats per image, K importance samples per image; `prior`:
    p(z) as in VAE.importance_terms (None: N(0, I))."""
    return importance_nlls(model, data, k, chunk, batch_size, seed, conditional, (prior,))[0]


@torch.inference_mode()
def importance_nlls(model: VAE, data: TensorDataset, k: int, chunk: int, batch_size: int, seed: int,
                    conditional: bool, priors=(None,)) -> list[float]:
    """importance_nll under each of `priors`, from one set of samples (one pass of the decoder)."""
    gen = torch.Generator(device=data.images.device).manual_seed(seed)
    total = torch.zeros(len(priors), dtype=torch.float64, device=data.images.device)
    bar = tqdm(total=len(data), desc=f"log p(x), K={k}", unit="img", disable=None, leave=False)
    for x, y in data.batches(batch_size):
        ll = model.log_likelihoods(x, y if conditional else None, k=k, chunk=chunk, generator=gen, priors=priors)
        total += ll.double().sum(1)
        bar.update(len(x))
    bar.close()
    return (-total / len(data)).tolist()
