"""CLArena 1.1.0 EWC on task-incremental Split MNIST, driven the way CLArena's own
experiment loop (clarena/pipelines/cl_main_expr.py, CLMainExperiment.run) drives it.

CLArena's Hydra entry point needs experiment configs that its wheel does not ship,
so this script does by hand what CLMainExperiment.run does with the instantiated
objects:

    L.seed_everything(seed, workers=True)
    backbone = CLMLP(...); heads = HeadsTIL(input_dim=backbone.output_dim)
    model = EWC(backbone, heads, parameter_change_reg_factor, "train_end")
    for task_id in 1..5:
        optimizer_t = partial(torch.optim.Adam, lr=1e-3)   # fresh per task
        trainer_t = lightning.Trainer(max_epochs=epochs, ...)  # new Trainer per task
        datamodule.setup_task_id(task_id)
        model.setup_task_id(task_id, num_classes, optimizer_t, lr_scheduler=None)
        trainer_t.fit(model, datamodule=datamodule)
        trainer_t.test(model, datamodule=datamodule)  # all seen tasks

Differences from a stock CLArena Split MNIST run, all to follow the shared protocol:

* Data: a small LightningDataModule (below) over the raw IDX tensors instead of
  CLArena's torchvision-backed CLSplitMNIST (which downloads, carves a validation
  split out of train and uses drop_last=True). It exposes what the EWC class reads
  from ``trainer.datamodule``: ``train_dataloader()`` (batch 128, shuffle, last
  partial batch kept) and ``dataset_test`` (dict task_id -> dataset, consulted by
  ``get_test_task_id_from_dataloader_idx``). No validation loader.
* Accuracy: counted exactly from ``test_step``'s ``preds`` by a tiny callback.
  (CLArena's CLAccuracy callback weights each batch mean by ``len(batch)``, which
  is 2 for an (x, y) tuple, i.e. an unweighted mean over batches.)
* Backbone: ``CLMLP(784, hidden_dims=[400], output_dim=400)`` = Linear(784,400)+ReLU,
  Linear(400,400)+ReLU (CLMLP applies the activation after its output layer too),
  then HeadsTIL's Linear(400, 2) per task. ``--backbone=cnn``: CLArena 1.1.0 ships MLP and
  ResNet backbones only, so ``CLCNN`` below is a custom ``CLBackbone`` (CLArena's documented
  extension point: ``output_dim``, ``weighted_layer_names``, ``forward`` returning the
  feature and the per-layer activations) around common.cnn_backbone, the CNN of
  flax/examples/mnist (256 features), with HeadsTIL's Linear(256, 2) per task.

The EWC objective in clarena 1.1.0 (cl_algorithms/ewc.py, regularizers/parameter_change.py),
verified in the installed source:

    loss = CE + sum_{t' < t} 0.5 * factor * sum_i F_{t',i} (theta_i - theta*_{t',i})**2
    F_{t'} = sum_b |b| * g_b**2 / num_data      (g_b = grad of the batch-mean CE,
                                                 one pass over the train loader,
                                                 backbone parameters only)

where ``num_data`` is incremented in *every* training step of the task, i.e. it
ends at epochs * N, not N. So CLArena's Fisher is the common batch Fisher divided by
the number of epochs, and the common-convention lambda (loss + lam/2 * sum F d**2)
maps to ``parameter_change_reg_factor = lam * epochs``. ``--lam`` takes the common
lambda and converts it.

Timing: ``fisher`` is EWC.on_train_end (Fisher pass + averaging + deepcopy of the
backbone), measured inside Trainer.fit; ``train`` is the rest of Trainer
construction + fit; ``eval`` is Trainer.test.
"""

import time

_T0 = time.perf_counter()
import logging  # noqa: E402
import warnings  # noqa: E402
from functools import partial  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from clarena.backbones import CLBackbone, CLMLP  # noqa: E402
from clarena.cl_algorithms import EWC  # noqa: E402
from clarena.heads import HeadsTIL  # noqa: E402

import common as C  # noqa: E402

_IMPORTS_S = time.perf_counter() - _T0

DEFAULT_LAM = 1e6  # common-convention lambda, same as plain_torch_ewc.py


class SplitMNISTTIL(L.LightningDataModule):
    """Task-incremental Split MNIST over in-memory tensors; task ids 1..5 as in CLArena."""

    def __init__(self, train_tasks, test_tasks, batch_size: int, eval_batch_size: int,
                 generator: torch.Generator):
        super().__init__()
        self.train_sets = {t + 1: TensorDataset(*xy) for t, xy in enumerate(train_tasks)}
        self.test_sets = {t + 1: TensorDataset(*xy) for t, xy in enumerate(test_tasks)}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.generator = generator
        self.task_id = None
        self.dataset_test: dict[int, TensorDataset] = {}

    def setup_task_id(self, task_id: int) -> None:
        self.task_id = task_id
        self.dataset_test = {t: self.test_sets[t] for t in range(1, task_id + 1)}

    def train_dataloader(self):
        return DataLoader(self.train_sets[self.task_id], batch_size=self.batch_size,
                          shuffle=True, drop_last=False, generator=self.generator)

    def test_dataloader(self):
        return {t: DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False)
                for t, ds in self.dataset_test.items()}


class CLCNN(CLBackbone):
    """common.cnn_backbone as a CLArena continual-learning backbone (same for all tasks)."""

    def __init__(self):
        super().__init__(output_dim=C.CNN_DENSE)
        self.net = C.cnn_backbone(nn)
        self.weighted_layer_names = [f"net/{name}" for name, layer in self.net.named_children()
                                     if isinstance(layer, (nn.Conv2d, nn.Linear))]

    def forward(self, input, stage: str = None, task_id: int | None = None):
        x = input.view(input.size(0), -1)
        activations, layer_name = {}, None
        for name, layer in self.net.named_children():
            x = layer(x)
            if f"net/{name}" in self.weighted_layer_names:
                layer_name = f"net/{name}"
            elif isinstance(layer, nn.ReLU):  # the hidden feature after activation, as CLMLP
                activations[layer_name] = x
        return x, activations


class TimedEWC(EWC):
    """clarena's EWC, unchanged, with the Fisher phase (on_train_end) timed."""

    fisher_seconds = 0.0

    def on_train_end(self) -> None:
        t0 = time.perf_counter()
        super().on_train_end()
        self.fisher_seconds += time.perf_counter() - t0


class ExactTestAccuracy(L.Callback):
    def __init__(self):
        self.correct: dict[int, int] = {}
        self.count: dict[int, int] = {}

    def on_test_start(self, trainer, pl_module):
        self.correct, self.count = {}, {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                          dataloader_idx=0):
        t = pl_module.get_test_task_id_from_dataloader_idx(dataloader_idx)
        y = batch[1]
        self.correct[t] = self.correct.get(t, 0) + int((outputs["preds"] == y).sum())
        self.count[t] = self.count.get(t, 0) + len(y)

    def row(self, seen: int):
        return [self.correct[t] / self.count[t] for t in range(1, seen + 1)]


def make_trainer(epochs: int, callbacks) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )


def main():
    args = C.parse_args(__doc__.splitlines()[0], DEFAULT_LAM)
    timer = C.Timer()
    timer.add("imports", _IMPORTS_S)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "clarena"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    C.setup_torch(torch, args)
    L.seed_everything(args.seed, workers=True, verbose=False)

    with timer("data"):
        train_np, test_np = C.load_split_mnist(args.data_dir)
        to_t = lambda xy: (torch.from_numpy(xy[0]), torch.from_numpy(xy[1]))  # noqa: E731
        datamodule = SplitMNISTTIL([to_t(p) for p in train_np], [to_t(p) for p in test_np],
                                   C.BATCH_SIZE, C.EVAL_BATCH_SIZE,
                                   torch.Generator().manual_seed(args.seed))

    factor = args.lam * args.epochs  # see module docstring
    if args.backbone == "cnn":
        backbone = CLCNN()
    else:
        backbone = CLMLP(input_dim=C.INPUT_DIM, hidden_dims=[C.HIDDEN], output_dim=C.HIDDEN)
    heads = HeadsTIL(input_dim=backbone.output_dim)
    model = TimedEWC(backbone=backbone, heads=heads, parameter_change_reg_factor=factor,
                     when_calculate_fisher_information="train_end")
    acc_cb = ExactTestAccuracy()
    acc_matrix = []

    for task_id in range(1, C.NUM_TASKS + 1):
        t0 = time.perf_counter()
        fisher_before = model.fisher_seconds
        trainer_t = make_trainer(args.epochs, [acc_cb])
        datamodule.setup_task_id(task_id)
        model.setup_task_id(task_id=task_id, num_classes=C.CLASSES_PER_TASK,
                            optimizer=partial(torch.optim.Adam, lr=C.LR),
                            lr_scheduler=None)
        trainer_t.fit(model=model, datamodule=datamodule)
        fisher_s = model.fisher_seconds - fisher_before
        timer.add("fisher", fisher_s)
        timer.add("train", time.perf_counter() - t0 - fisher_s)
        assert model.num_data == args.epochs * len(datamodule.train_sets[task_id]), \
            "clarena's num_data convention changed; revisit the factor conversion"
        with timer("eval"):
            trainer_t.test(model=model, datamodule=datamodule, verbose=False)
        acc_matrix.append(acc_cb.row(task_id))

    import clarena
    C.emit("clarena", acc_matrix, timer, lam=args.lam, parameter_change_reg_factor=factor,
           seed=args.seed, epochs=args.epochs, threads=args.threads, backbone=args.backbone,
           torch=torch.__version__, clarena=getattr(clarena, "__version__", "1.1.0"),
           lightning=L.__version__)


if __name__ == "__main__":
    main()
