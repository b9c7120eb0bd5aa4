"""Train the MNIST classifier whose features score samples (`evaluate.py --sample-quality`):
`python tools/train_classifier.py` writes weights/mnist_classifier.pt and prints its SHA-256. The
project ships the file; a new one has another hash and needs evaluate.py --no-sha256-check.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib import cli  # noqa: E402
from lib.checks import UserError  # noqa: E402
from lib.evaluation import DEFAULT_WEIGHTS, DigitClassifier, load_classifier, sha256_of  # noqa: E402
from lib.data import TensorDataset, load_test_set  # noqa: E402
from lib.files import check_output_path, save_atomic  # noqa: E402
from lib.training import epoch_permutation  # noqa: E402


def build_parser() -> cli.Parser:
    p = cli.Parser("Train the MNIST classifier used to score samples.")
    p.add_argument("--epochs", type=cli.Number(int, 1, 1000), default=6, help="passes over the training set")
    p.add_argument("--batch-size", type=cli.Number(int, 1, cli.MAX_BATCH), default=128, help="images per step")
    p.add_argument("--lr", type=cli.POSITIVE_FLOAT, default=2e-3, help="Adam learning rate")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seeds init and shuffling")
    p.add_argument("--out", default=DEFAULT_WEIGHTS,
                   help="weights file to write (default: weights/mnist_classifier.pt)")
    cli.add_common(p, checkpoint=False)
    return p


@torch.inference_mode()
def accuracy(model: DigitClassifier, data: TensorDataset) -> float:
    model.eval()
    right = sum((model(x).argmax(1) == y).sum().item() for x, y in data.batches(1000))
    model.train()
    return right / len(data)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_output_path(args.out, "classifier weights")
    if os.path.isfile(args.out):  # replaced only if it holds a classifier: never a checkpoint by mistake
        try:
            load_classifier(args.out, check_sha256=False)
        except UserError:
            raise UserError(f"{args.out}: exists and holds no classifier weights; refused to replace it") from None
    device = cli.pick_device(args.device)
    print(cli.device_note(device, args.device))
    train_set = TensorDataset.load("train", args.data_dir, device)
    test_set = load_test_set(args.data_dir, device)
    torch.manual_seed(args.seed)
    model = DigitClassifier().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n, bs = len(train_set), args.batch_size
    for epoch in range(args.epochs):
        perm = epoch_permutation(args.seed, epoch, n).to(device)
        for g in opt.param_groups:  # halve the rate each epoch: a simple schedule that converges
            g["lr"] = args.lr * 0.5 ** epoch
        for i in tqdm(range(0, n, bs), desc=f"epoch {epoch + 1}/{args.epochs}", disable=None, leave=False):
            x, y = train_set.batch(perm[i:i + bs])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}/{args.epochs}: test accuracy {accuracy(model, test_set):.4f}", flush=True)
    save_atomic({"config": model.config, "model": model.cpu().state_dict()}, args.out)
    print(f"wrote {args.out}, SHA-256 {sha256_of(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
