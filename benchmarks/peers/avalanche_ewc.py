"""Avalanche 0.6.0 EWC strategy (mode="separate") on task-incremental Split MNIST.

Built the way Avalanche's own ``SplitMNIST(n_experiences=5, return_task_id=True,
fixed_class_order=range(10))`` builds it, but from the raw IDX tensors instead of
torchvision's downloader:

    nc_benchmark(train, test, n_experiences=5, task_labels=True, shuffle=False,
                 fixed_class_order=range(10), class_ids_from_zero_in_each_exp=True)

so experience t holds classes {2t, 2t+1} with task label t and targets 0/1.
The datasets handed to nc_benchmark are minimal torch Datasets over float tensors
(pixels/255, flattened) with a ``targets`` attribute, like torchvision's MNIST.

Model: an ``MTSimpleMLP``-style ``MultiTaskModule`` with the protocol's sizes:
Linear(784,400)+ReLU, Linear(400,400)+ReLU (no dropout), then
``MultiHeadClassifier(400, initial_out_features=2, masking=False)`` (one 2-way head per
task label, created by Avalanche's model adaptation). ``--backbone=cnn``: the same
``MultiTaskModule`` with common.cnn_backbone (the CNN of flax/examples/mnist, inputs viewed
as [B, 1, 28, 28], 256 features) as the feature extractor and
``MultiHeadClassifier(256, initial_out_features=2, masking=False)`` on top.

Strategy: ``avalanche.training.EWC(mode="separate", train_mb_size=128, train_epochs=2,
eval_mb_size=1000)`` with Adam(lr=1e-3). ``strategy.train(exp, reset_optimizer_state=True)``
resets Adam's state at every experience (Avalanche otherwise keeps the moments across
experiences), which with a constant lr is the protocol's fresh Adam per task.
Evaluation: ``strategy.eval(test_stream[:t+1])`` with an EvaluationPlugin computing
per-experience accuracy and no loggers.

EWC objective of Avalanche 0.6.0 (training/plugins/ewc.py), verified in the source:

    loss = CE + ewc_lambda * sum_{t' < t} sum_i F_{t',i} (theta_i - theta*_{t',i})**2
    F = (1/num_batches) * sum_b g_b**2      (g_b = grad of the batch-mean CE, eval mode,
                                             unshuffled loader, batch train_mb_size,
                                             all parameters incl. heads)

No 1/2 in the penalty, so the common-convention lambda (CE + lam/2 * sum F d**2)
maps to ``ewc_lambda = lam / 2``. Avalanche's F averages batch squares without
weighting by batch size; it equals the common sum_b |b| g_b**2 / N up to the weight
of the last partial batch. The penalty on old heads is inert (they get no gradient
from the current task's loss, so they stay at their anchor).

Timing: ``fisher`` is the EWC plugin's after_training_exp (importance pass + parameter
copy), measured inside strategy.train; ``train`` is the rest of strategy.train;
``eval`` is strategy.eval; ``data`` includes building the benchmark.
"""

import time

_T0 = time.perf_counter()
import random  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from avalanche.benchmarks import nc_benchmark  # noqa: E402
from avalanche.evaluation.metrics import accuracy_metrics  # noqa: E402
from avalanche.models import MultiHeadClassifier, MultiTaskModule  # noqa: E402
from avalanche.training import EWC  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402
from avalanche.training.plugins.ewc import EWCPlugin  # noqa: E402

import common as C  # noqa: E402

_IMPORTS_S = time.perf_counter() - _T0

DEFAULT_LAM = 1e6  # common-convention lambda, same as plain_torch_ewc.py


class TensorMNIST(torch.utils.data.Dataset):
    """(x, y) over in-memory tensors with a ``targets`` attribute, like torchvision MNIST."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = torch.from_numpy(x)
        self.y = torch.from_numpy(y)
        self.targets = self.y.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


class MTNet(MultiTaskModule):
    """avalanche.models.MTSimpleMLP with the protocol's sizes (two 400-unit layers), or with
    the cnn backbone as its feature extractor (``backbone="cnn"``)."""

    def __init__(self, backbone: str = "mlp"):
        super().__init__()
        if backbone == "cnn":
            self.features = C.cnn_backbone(nn)
        else:
            self.features = nn.Sequential(
                nn.Linear(C.INPUT_DIM, C.HIDDEN), nn.ReLU(inplace=True),
                nn.Linear(C.HIDDEN, C.HIDDEN), nn.ReLU(inplace=True),
            )
        self.classifier = MultiHeadClassifier(
            C.FEATURES[backbone], initial_out_features=C.CLASSES_PER_TASK, masking=False)

    def forward(self, x, task_labels):
        x = x.contiguous().view(x.size(0), C.INPUT_DIM)
        return self.classifier(self.features(x), task_labels)


def main():
    args = C.parse_args(__doc__.splitlines()[0], DEFAULT_LAM)
    timer = C.Timer()
    timer.add("imports", _IMPORTS_S)
    warnings.filterwarnings("ignore")
    C.setup_torch(torch, args)
    random.seed(args.seed)
    np.random.seed(args.seed)

    with timer("data"):
        xtr, ytr, xte, yte = C.load_mnist(args.data_dir)
        bm = nc_benchmark(
            train_dataset=TensorMNIST(xtr, ytr), test_dataset=TensorMNIST(xte, yte),
            n_experiences=C.NUM_TASKS, task_labels=True, shuffle=False,
            fixed_class_order=list(range(10)), class_ids_from_zero_in_each_exp=True,
        )

    model = MTNet(args.backbone)
    strategy = EWC(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=C.LR),
        criterion=nn.CrossEntropyLoss(),
        ewc_lambda=args.lam / 2.0,  # see module docstring
        mode="separate",
        train_mb_size=C.BATCH_SIZE,
        train_epochs=args.epochs,
        eval_mb_size=C.EVAL_BATCH_SIZE,
        device="cpu",
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )

    # Time the Fisher phase: wrap the EWC plugin's after_training_exp on the instance.
    ewc_plugin = next(p for p in strategy.plugins if isinstance(p, EWCPlugin))
    fisher_s = [0.0]
    inner = ewc_plugin.after_training_exp

    def timed_after_training_exp(strategy, **kwargs):
        t0 = time.perf_counter()
        inner(strategy, **kwargs)
        fisher_s[0] += time.perf_counter() - t0

    ewc_plugin.after_training_exp = timed_after_training_exp

    acc_matrix = []
    for t, exp in enumerate(bm.train_stream):
        assert exp.task_label == t and sorted(exp.classes_in_this_experience) == [0, 1]
        t0, f0 = time.perf_counter(), fisher_s[0]
        strategy.train(exp, reset_optimizer_state=True)
        timer.add("fisher", fisher_s[0] - f0)
        timer.add("train", time.perf_counter() - t0 - (fisher_s[0] - f0))
        with timer("eval"):
            res = strategy.eval(bm.test_stream[: t + 1])
        acc_matrix.append([
            res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{s:03d}/Exp{s:03d}"]
            for s in range(t + 1)
        ])

    import avalanche
    C.emit("avalanche", acc_matrix, timer, lam=args.lam, ewc_lambda=args.lam / 2.0,
           seed=args.seed, epochs=args.epochs, threads=args.threads, backbone=args.backbone,
           torch=torch.__version__, avalanche=avalanche.__version__)


if __name__ == "__main__":
    main()
