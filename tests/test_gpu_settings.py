"""GPU training settings: bf16 autocast and channels_last on by default where the
device supports them, ``torch.compile`` an execution-only option that ``fit`` applies."""

from __future__ import annotations

import torch
from torch import nn

from supersub.epoch import OptimConfig, amp_dtype, use_channels_last
from supersub.fit import fit
from supersub.tasks.base import TaskContext, optim_identity


class _Loader:
    def __init__(self, n: int = 2) -> None:
        self.n = n

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.n):
            yield torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)


def test_defaults_are_the_gpu_settings_and_compile_is_execution_only() -> None:
    cfg = OptimConfig()
    assert cfg.amp == "auto" and cfg.channels_last == "auto" and cfg.compile is False
    assert use_channels_last(cfg, torch.device("cpu"))
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert amp_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    # Compiling changes how a task runs, not what it computes: the same fingerprint.
    assert optim_identity(OptimConfig(compile=True)) == optim_identity(cfg)


def test_fit_compiles_the_model_when_asked(tmp_path, monkeypatch) -> None:
    compiled = []

    def fake_compile(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    ctx = TaskContext(log=lambda _: None)
    opt = OptimConfig(epochs=1, batch_size=4, warmup_epochs=0.0, compile=True)
    history = fit(model, _Loader(), _Loader(1), opt, ctx, tmp_path, "t")
    assert len(compiled) == 1 and len(history) == 1
    fit(model, _Loader(), _Loader(1), OptimConfig(epochs=1, batch_size=4, warmup_epochs=0.0), ctx, tmp_path / "b", "t")
    assert len(compiled) == 1
