"""Data-parallel training on torch.distributed with lc.nn layers and compressed gradient all-reduce.

    from lepton_core.train import Trainer, TrainConfig
    cfg = TrainConfig(epochs=10, precision="bf16", compression="int8", checkpoint_dir="ckpt")
    summary = Trainer(model, train_set, test_set, cfg).fit()   # in every worker (torchrun, lepton train)

Trainer(..., callbacks=[...]) runs user code after each step and epoch (train/callbacks.py).
`lepton train` (lepton_core.train.cli) runs the default job; see its module docstring. Trainer is
imported on first use, so building the `lepton` command line stays cheap.
"""
from .callbacks import Callback, StepInfo
from .config import TrainConfig

__all__ = ["Callback", "StepInfo", "TrainConfig", "Trainer"]


def __getattr__(name):
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
