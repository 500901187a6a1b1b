"""Hand-written PyTorch EWC on task-incremental Split MNIST (the loop a user would write).

Protocol: see common.py. Implementation choices, all the common ones:

* Data: torch.utils.data.DataLoader over a TensorDataset (shuffle=True, batch 128,
  drop_last=False) for training; the whole task is held as tensors in memory.
* Model: nn.Sequential(Linear(784,400), ReLU, Linear(400,400), ReLU) backbone
  (``--backbone=cnn``: common.cnn_backbone, the CNN of flax/examples/mnist, 256 features)
  and an nn.ModuleList of five Linear(features,2) heads; Adam(model.parameters(), lr=1e-3)
  is created anew at the start of every task. PyTorch's default initialisation.
* Fisher ("empirical Fisher, batch approximation", what most EWC code does): after
  a task, one pass over its train data in eval mode, unshuffled, batch 128; for each
  batch b the gradient g_b of the *mean* cross-entropy of the batch is taken and
      F = sum_b |b| * g_b**2 / N.
  (This is not the per-example Fisher E[g_i**2]; squaring a batch-mean gradient
  mostly measures the mean gradient, so F is much smaller than the per-example
  Fisher and lambda has to be correspondingly larger.)
  F and theta* are kept for the shared backbone only: each head is used by one task
  alone and receives no gradient while other tasks train.
* Penalty: one quadratic per finished task ("separate" EWC, as in the paper):
      loss = CE + (lam/2) * sum_{t' < t} sum_i F_{t',i} (theta_i - theta*_{t',i})**2.

Prints one JSON line (see common.emit).
"""

import time

_T0 = time.perf_counter()
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import common as C  # noqa: E402

_IMPORTS_S = time.perf_counter() - _T0

DEFAULT_LAM = 1e6  # chosen by a sweep, see README.md


class MultiHeadNet(nn.Module):
    def __init__(self, num_tasks: int, backbone: str = "mlp"):
        super().__init__()
        if backbone == "cnn":
            self.backbone = C.cnn_backbone(nn)
        else:
            self.backbone = nn.Sequential(
                nn.Linear(C.INPUT_DIM, C.HIDDEN), nn.ReLU(),
                nn.Linear(C.HIDDEN, C.HIDDEN), nn.ReLU(),
            )
        self.heads = nn.ModuleList(
            [nn.Linear(C.FEATURES[backbone], C.CLASSES_PER_TASK) for _ in range(num_tasks)]
        )

    def forward(self, x, task: int):
        return self.heads[task](self.backbone(x))


def ewc_penalty(model: MultiHeadNet, anchors) -> torch.Tensor:
    pen = 0.0
    for fisher, star in anchors:
        for name, p in model.backbone.named_parameters():
            pen = pen + (fisher[name] * (p - star[name]) ** 2).sum()
    return pen


def compute_fisher(model: MultiHeadNet, task: int, x, y, criterion):
    model.eval()
    fisher = {n: torch.zeros_like(p) for n, p in model.backbone.named_parameters()}
    n_total = len(y)
    for xb, yb in DataLoader(TensorDataset(x, y), batch_size=C.BATCH_SIZE, shuffle=False):
        model.zero_grad()
        criterion(model(xb, task), yb).backward()
        for n, p in model.backbone.named_parameters():
            fisher[n] += len(yb) * p.grad.detach() ** 2
    for n in fisher:
        fisher[n] /= n_total
    model.zero_grad()
    model.train()
    return fisher


@torch.no_grad()
def accuracy(model: MultiHeadNet, task: int, x, y) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), C.EVAL_BATCH_SIZE):
        pred = model(x[i:i + C.EVAL_BATCH_SIZE], task).argmax(1)
        correct += (pred == y[i:i + C.EVAL_BATCH_SIZE]).sum().item()
    model.train()
    return correct / len(y)


def main():
    args = C.parse_args(__doc__.splitlines()[0], DEFAULT_LAM)
    timer = C.Timer()
    timer.add("imports", _IMPORTS_S)
    C.setup_torch(torch, args)

    with timer("data"):
        train_np, test_np = C.load_split_mnist(args.data_dir)
        train = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in train_np]
        test = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in test_np]

    model = MultiHeadNet(C.NUM_TASKS, args.backbone)
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    anchors = []  # [(fisher, theta*)] per finished task
    acc_matrix = []

    for t in range(C.NUM_TASKS):
        x, y = train[t]
        with timer("train"):
            opt = torch.optim.Adam(model.parameters(), lr=C.LR)
            loader = DataLoader(TensorDataset(x, y), batch_size=C.BATCH_SIZE,
                                shuffle=True, drop_last=False, generator=gen)
            model.train()
            for _ in range(args.epochs):
                for xb, yb in loader:
                    opt.zero_grad()
                    loss = criterion(model(xb, t), yb)
                    if anchors and args.lam > 0:
                        loss = loss + 0.5 * args.lam * ewc_penalty(model, anchors)
                    loss.backward()
                    opt.step()
        with timer("fisher"):
            fisher = compute_fisher(model, t, x, y, criterion)
            star = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
            anchors.append((fisher, star))
        with timer("eval"):
            acc_matrix.append([accuracy(model, s, *test[s]) for s in range(t + 1)])

    C.emit("plain_torch", acc_matrix, timer, lam=args.lam, seed=args.seed,
           epochs=args.epochs, threads=args.threads, backbone=args.backbone,
           torch=torch.__version__)


if __name__ == "__main__":
    main()
