"""Privacy accounting shared by DP-SGD in the trainer (train/dp.py) and DP-FedAvg (federated/dp.py)."""
from .accountant import RDP_ORDERS, Accountant, noise_for_epsilon

__all__ = ["RDP_ORDERS", "Accountant", "noise_for_epsilon"]
