"""Accuracy versus epsilon on digits: our DP-SGD (Trainer) and Opacus's, at the same (Z, C, q, steps),
on the same Poisson batches, beside non-private training (bench/notes_dp.md).

    PYTHONPATH=. python bench/bench_dp_accuracy.py [--epochs 40] [--batch 64] [--seeds 0 1]

The `lepton train` MLP (64-256-256-10, dropout 0.1) in fp32, AdamW (lr 3e-3, weight decay 1e-2) with
the cosine schedule, no augmentation, one process. For each target epsilon the noise multiplier Z is
solved once (our accountant) for q = batch / N and the planned steps; both implementations get that Z,
clip C = 1 and the batches of lepton_core.train.dp (Opacus through GradSampleModule + DPOptimizer, its
default hooks mode; its RDP accountant then reports its own epsilon).

--same-noise feeds Opacus our noise draws (DPSGD.add_noise's vector of each step, cut per parameter in
the same order) instead of its own: with the same initial weights, batches and noise, the two runs
should then end at the same accuracy, which separates an implementation difference from the spread
of the random draws (bench/notes_dp.md, session 7).
"""
import argparse
import math
import warnings

import torch
from torch import nn

import lepton_core.nn as lnn
from lepton_core.privacy import noise_for_epsilon
from lepton_core.train import TrainConfig, Trainer, digits
from lepton_core.train.dp import DPSGD


def ours(train, test, cfg):
    torch.manual_seed(cfg.seed)
    with Trainer(digits.build_model(train), train, test, cfg) as t:
        s = t.fit()
        return s["eval_accuracy"], s["history"][-1].get("epsilon")


class _OurNoise:
    """Stands in for opacus.optimizers.optimizer._generate_noise: per call, the next parameter's slice
    of the vector DPSGD.add_noise draws for the current step (Opacus asks parameter by parameter, in
    the optimizer's order, which is model.parameters(): DPSGD's order too)."""

    def __init__(self, engine):
        self.engine, self.sizes = engine, [p.numel() for p in engine.params]
        self.step, self.k, self.flat = 0, 0, None  # step: set by the training loop before each step

    def __call__(self, std, reference, generator=None, secure_mode=False):
        assert abs(std - self.engine.noise_multiplier * self.engine.clip) < 1e-9 and reference.numel() == self.sizes[self.k]
        if self.k == 0:
            self.flat = torch.zeros(sum(self.sizes))
            self.engine.add_noise(self.flat, self.step)
        off = sum(self.sizes[:self.k])
        out = self.flat[off:off + reference.numel()].view_as(reference).clone()
        self.k = (self.k + 1) % len(self.sizes)
        return out


def opacus_run(train, test, cfg, z, same_noise=False):
    from opacus import GradSampleModule
    from opacus.optimizers import optimizer as opacus_optimizer
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(cfg.seed)
    model = digits.build_model(train)
    plain = nn.Sequential(*[nn.Linear(m.in_features, m.out_features) if isinstance(m, lnn.Linear) else m
                            for m in model])
    plain.load_state_dict(model.state_dict())  # the same initial weights as ours
    engine = DPSGD(model, cfg, len(train), 1)  # only for its Poisson batches and q (and noise with same_noise)
    gsm = GradSampleModule(plain)
    base = torch.optim.AdamW(gsm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt = DPOptimizer(base, noise_multiplier=z, max_grad_norm=cfg.dp_clip, expected_batch_size=round(engine.expected_batch))
    acc = RDPAccountant()
    x, y = train.tensors
    total = cfg.epochs * engine.steps_per_epoch
    step = 0
    saved_noise, noise = opacus_optimizer._generate_noise, _OurNoise(engine)
    if same_noise:  # DPOptimizer.add_noise looks the function up in its module at each call
        opacus_optimizer._generate_noise = noise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for epoch in range(cfg.epochs):
                gsm.train()
                for idx in engine.epoch_batches(epoch, 0, 1):
                    for pg in base.param_groups:
                        pg["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                    if idx:
                        nn.functional.cross_entropy(gsm(x[idx]), y[idx]).backward()
                        noise.step = step  # our trainer's noise of this step (its global step)
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    acc.step(noise_multiplier=z, sample_rate=engine.q)
                    step += 1
    finally:
        opacus_optimizer._generate_noise = saved_noise
    gsm.eval()
    with torch.no_grad():
        xt, yt = test.tensors
        accuracy = float((gsm(xt).argmax(1) == yt).float().mean())
    return accuracy, acc.get_epsilon(cfg.dp_delta)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--same-noise", action="store_true", help="Opacus gets our noise draws (see the top)")
    a = ap.parse_args()
    train, test = digits.load()
    common = dict(epochs=a.epochs, batch_size=a.batch, lr=a.lr, precision="fp32", compression="none",
                  progress=False)
    print("| epsilon target | Z | seed | ours acc | ours eps | opacus acc | opacus eps |")
    print("|---|---|---|---|---|---|---|")
    for seed in a.seeds:
        acc, _ = ours(train, test, TrainConfig(seed=seed, **common))
        print(f"| non-private | - | {seed} | {100 * acc:.2f}% | - | - | - |", flush=True)
        for eps in a.eps:
            cfg = TrainConfig(seed=seed, dp_clip=1.0, dp_target_epsilon=eps, **common).validate()
            probe = DPSGD(digits.build_model(train), cfg, len(train), 1)
            z = noise_for_epsilon(eps, probe.q, a.epochs * probe.steps_per_epoch, cfg.dp_delta)
            cfg_z = TrainConfig(seed=seed, dp_clip=1.0, dp_noise_multiplier=z, **common).validate()
            acc, e = ours(train, test, cfg_z)
            try:
                oacc, oe = opacus_run(train, test, cfg_z, z, a.same_noise)
                otxt = f"{100 * oacc:.2f}% | {oe:.3f}"
            except ImportError:
                otxt = "not installed | -"
            print(f"| {eps:g} | {z:.3f} | {seed} | {100 * acc:.2f}% | {e:.3f} | {otxt} |", flush=True)


if __name__ == "__main__":
    main()
