"""The configuration of one continual-learning run: :class:`Config`, checked at the boundary
(:meth:`Config.validate`), and what it names (:func:`make_algorithm`, :func:`hyper_of`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ewc_jax import algorithms
from ewc_jax import augment as augment_lib
from ewc_jax import backbones
from ewc_jax import errors
from ewc_jax import fisher as fisher_lib
from ewc_jax import heads
from ewc_jax import initializers
from ewc_jax.continual import step as step_lib

# The numeric settings the programs take as arrays (algorithms.Hyper): a sweep's lists.
HYPER_FIELDS = algorithms.Hyper._fields
SWEEPABLE = HYPER_FIELDS + ("seed",)  # the fields that may differ between a sweep's configs
ALGOS = algorithms.NAMES
PENALTIES = algorithms.PENALTIES
BACKBONES = backbones.NAMES


def _setting(default: Any, help_text: str) -> Any:
  """A :class:`Config` field with its description (``metadata["help"]``: command lines generate
  their flags, and their help, from the fields)."""
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class Config:
  """Plain-data configuration of one continual-learning run (defaults: the peers' protocol).

  Each field's ``metadata["help"]`` says what it means (the experiment command lines turn every
  field into a flag of the same name, e.g. ``lam`` -> ``--lam``).
  """
  algo: str = _setting("ewc", f"Algorithm: {'|'.join(algorithms.NAMES)}.")
  scenario: str = _setting(
      "task", "task (a head per task, task id known) | domain (one shared head) | class (one "
      "head over all classes seen so far).")
  penalty: str = _setting(
      "standard", "EWC penalty (with algo=ewc): standard = (lam/2)*sum F|theta-theta*|^p "
      "(Kirkpatrick 2017); seed = the seed reference's per-tensor p-norm / task id; clarena = "
      "CLArena 1.1.0's 0.5*lam*sum F (theta-theta*)^2.")
  lam: float = _setting(
      1000.0, "Regularisation strength lambda (> 0). Convention: the loss adds (lam/2) * "
      "sum_k sum_i F_ki |theta_i - theta*_ki|^p, with F the mean per-example Fisher (no "
      "1/num_params).")
  p: float = _setting(2.0, "Exponent p of |theta - theta*| (> 0).")
  gamma: float = _setting(1.0, "Online EWC decay of the accumulated importance, (0, 1].")
  fisher: str = _setting("empirical", f"Importance estimator: {'|'.join(fisher_lib.KINDS)}.")
  fisher_batch_size: int = _setting(
      256, "Examples per Fisher scan step (changes the result only for batch_squared).")
  fisher_normalize: bool = _setting(
      False, "Divide the importance by the number of backbone parameters (seed parity).")
  fisher_examples: int | None = _setting(
      None, "Estimate each task's Fisher on N of its training examples, drawn at random "
      "without replacement from the run's Fisher key (ewc_jax.subset; van de Ven 2025's "
      "EXACT(n=500) is fisher=true with 500); default: all of them.")
  consolidate: str | None = _setting(
      None, "What EWC consolidates (ewc_jax.heads.consolidated): shared (the backbone and "
      "every head used by more than one task: domain-IL's shared head, class-IL's single head; "
      "task-IL's per-task heads stay free) | backbone | all. Default: shared, or backbone for "
      "penalty=seed|clarena (the reference's behaviour).")
  epochs: int | None = _setting(
      2, "Training length per task in epochs (>= 1); exclusive with steps_per_task.")
  steps_per_task: int | None = _setting(
      None, "Training length per task in iterations (>= 1; van de Ven & Tolias count "
      "iterations); exclusive with epochs.")
  reset_optimizer: bool = _setting(
      True, "Restart the optimizer at every task (as CLArena and Avalanche); false keeps its "
      "state across tasks (as Hsu et al. 2018 and van de Ven & Tolias 2019).")
  optimizer: str = _setting(
      "adam", "adam | sgd (plain SGD, no momentum: Avalanche's baseline); lr is its learning "
      "rate.")
  batch_size: int = _setting(128, "Training batch size (>= 1).")
  lr: float = _setting(1e-3, "Learning rate of the optimizer (> 0).")
  seed: int = _setting(
      0, "PRNG seed: initialisation, shuffling, permutations, sampled labels.")
  hidden: tuple[int, ...] = _setting((400, 400), "Layer widths of the mlp backbone.")
  backbone: str = _setting(
      "mlp", f"The shared network (ewc_jax.backbones): {'|'.join(backbones.NAMES)} (mlp: hidden "
      "widths; cnn: flax/examples/mnist's CNN; resnet18: the reduced ResNet-18 of GEM / Mammoth "
      "/ Avalanche, width 20, BatchNorm; resnet18_full: width 64).")
  width: int | None = _setting(
      None, "ResNet width (channels of stage 1); default: the backbone's own (20, or 64 for "
      "resnet18_full).")
  init: str = _setting(
      "flax", "Parameter initialisation (ewc_jax.initializers): flax (LeCun-normal kernels, zero "
      "biases) | pytorch (PyTorch's nn.Linear/nn.Conv2d default: kernels and biases uniform in "
      "±1/sqrt(fan_in)), for parity with papers' PyTorch code.")
  augment: str = _setting(
      "none", "Training-batch augmentation (ewc_jax.augment), drawn on device from the run's "
      "key: none | crop_flip (random crop after 4 pixels of zero padding, horizontal flip: the "
      "CIFAR convention). Needs image inputs [B, H, W, C]; evaluation and Fisher see the images "
      "as they are.")
  validation_fraction: float = _setting(
      0.0, "Hold out this fraction of each task's training data as a validation split, scored "
      "like the test set (val_acc_matrix), in [0, 1); 0: none. The held-out rows depend on "
      "validation_seed only (ewc_jax.continual.holdout).")
  validation_seed: int = _setting(
      0, "Which rows the validation split holds out (the same for every seed and sweep config).")
  chunk_steps: int = _setting(
      64, "Train steps per compiled chunk (a lax.fori_loop): progress, checkpoints and the NaN "
      "check act between chunks. Does not change the results.")

  @property
  def consolidated(self) -> str:
    """The consolidated set in force (``consolidate`` with its default resolved)."""
    if self.consolidate is not None:
      return self.consolidate
    return "backbone" if self.penalty in ("seed", "clarena") else "shared"

  def schedule(self, count: int) -> tuple[int, int, int]:
    """``(epochs, steps per epoch, steps of the last epoch)`` of a task of ``count`` examples:
    with ``steps_per_task`` S, the task runs ceil(S / steps) epochs, the last one cut short."""
    steps = -(-int(count) // self.batch_size)
    if self.steps_per_task is None:
      return self.epochs, steps, steps
    epochs = -(-self.steps_per_task // steps)
    return epochs, steps, self.steps_per_task - (epochs - 1) * steps

  def validate(self) -> None:
    """Raises ``ValueError`` naming the first bad field (flag), its value and what is allowed."""
    def bad(name, value, allowed):
      raise errors.SettingError.invalid(name, value, allowed)
    algorithms.make(self.algo, penalty=self.penalty, p=self.p)  # algo, penalty, p together
    if self.scenario not in heads.SCENARIOS:
      bad("scenario", self.scenario, "one of " + ", ".join(heads.SCENARIOS))
    if not (0 < self.gamma <= 1):
      bad("gamma", self.gamma, "a number in (0, 1]")
    if self.consolidate is not None and self.consolidate not in heads.CONSOLIDATE:
      bad("consolidate", self.consolidate, "one of " + ", ".join(heads.CONSOLIDATE))
    if self.fisher not in fisher_lib.KINDS:
      bad("fisher", self.fisher, "one of " + ", ".join(fisher_lib.KINDS))
    if not np.isfinite(self.lam) or self.lam <= 0:
      bad("lam", self.lam, "a finite number > 0")
    if not np.isfinite(self.p) or self.p <= 0:
      bad("p", self.p, "a finite number > 0")
    if not np.isfinite(self.lr) or self.lr <= 0:
      bad("lr", self.lr, "a finite number > 0")
    if (self.epochs is None) == (self.steps_per_task is None):
      epochs, steps = self.epochs, self.steps_per_task
      raise errors.SettingError(lambda n: (
          f"{n('epochs')}={epochs!r} and {n('steps_per_task')}={steps!r} are invalid together: "
          "expected exactly one of them (training length per task in epochs or in iterations)."))
    for name in ("epochs", "steps_per_task", "batch_size", "fisher_batch_size", "chunk_steps",
                 "fisher_examples"):
      value = getattr(self, name)
      if value is None and name in ("epochs", "steps_per_task", "fisher_examples"):
        continue
      if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        bad(name, value, "an integer >= 1")
    if self.optimizer not in step_lib.OPTIMIZERS:  # the names' one home: step.OPTIMIZERS
      bad("optimizer", self.optimizer, "one of " + ", ".join(step_lib.OPTIMIZERS))
    if self.init not in initializers.NAMES:
      bad("init", self.init, "one of " + ", ".join(initializers.NAMES))
    if self.augment not in augment_lib.NAMES:
      bad("augment", self.augment, "one of " + ", ".join(augment_lib.NAMES))
    if not isinstance(self.reset_optimizer, (bool, np.bool_)):
      bad("reset_optimizer", self.reset_optimizer, "true or false")
    if not (np.isfinite(self.validation_fraction) and 0 <= self.validation_fraction < 1):
      bad("validation_fraction", self.validation_fraction, "a number in [0, 1) (0: none)")
    if not self.hidden or any(h < 1 for h in self.hidden):
      bad("hidden", self.hidden, "positive layer widths")
    if self.backbone not in BACKBONES:
      bad("backbone", self.backbone, "one of " + ", ".join(BACKBONES))
    if self.width is not None:
      with_width = [n for n in BACKBONES if "width" in backbones.options(n)]
      if self.backbone not in with_width:
        backbone = self.backbone
        raise errors.SettingError(lambda n: (
            f"{n('width')}={self.width!r} is invalid with {n('backbone')}={backbone!r}: expected "
            f"no width (None) unless the backbone is one of {', '.join(with_width)}."))
      if (isinstance(self.width, bool) or not isinstance(self.width, (int, np.integer))
          or self.width < 1):
        bad("width", self.width, "an integer >= 1 (or None: the backbone's default)")


def make_algorithm(cfg: Config, dynamic_p: bool = False) -> algorithms.Algorithm:
  """``dynamic_p``: p is read from ``Hyper.p`` at run time (a sweep over p) instead of fixed."""
  return algorithms.make(cfg.algo, penalty=cfg.penalty, p=None if dynamic_p else float(cfg.p))


def hyper_of(cfg: Config) -> algorithms.Hyper:
  """The run's λ, p, γ and learning rate as float32 (NumPy: no device op, nothing compiled)."""
  return algorithms.Hyper(*(np.float32(getattr(cfg, name)) for name in HYPER_FIELDS))


def program_arguments(dynamic_p: bool = False) -> tuple[str, ...]:
  """The :class:`Config` fields the compiled programs take as arguments, not built in: the
  seed (its PRNG keys) and :func:`hyper_of`'s λ, γ and learning rate, and p when ``dynamic_p``
  (:func:`make_algorithm`); two runs differing only in these share their programs."""
  return ("seed",) + tuple(n for n in HYPER_FIELDS if dynamic_p or n != "p")

