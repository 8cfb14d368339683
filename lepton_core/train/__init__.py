"""Data-parallel training on torch.distributed with lc.nn layers and compressed gradient all-reduce.

    from lepton_core.train import Trainer, TrainConfig
    cfg = TrainConfig(epochs=10, precision="bf16", compression="int8", checkpoint_dir="ckpt")
    summary = Trainer(model, train_set, test_set, cfg).fit()   # in every worker (torchrun, lepton train)

`lepton train` (lepton_core.train.cli) runs the default job; see its module docstring.
"""
from .config import TrainConfig
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
