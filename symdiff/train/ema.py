"""Exponential moving average of *all* weights (eps-net and gamma alike; SPEC §2.6), under every ZeRO stage.

Every rank keeps a full fp32 copy, so the EMA never depends on how parameters are partitioned: it survives a
change of world size or ZeRO stage unchanged, and rank 0 can save it in one file. The source of each update is
the fp32 master weight: under ZeRO-3 the parameters are gathered first (a collective: all ranks call update),
under bf16 DeepSpeed's fp32 master copy is read rather than the rounded bf16 weights.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float, *, stage3: bool, bf16: bool):
        self.decay = float(decay)
        self.stage3 = stage3
        self.bf16 = bf16
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow: dict[str, torch.Tensor] = {}
        with self._full_fp32() as full:
            for name, value in zip(self.names, full):
                self.shadow[name] = value.detach().clone()

    @contextlib.contextmanager
    def _full_fp32(self) -> Iterator[list[torch.Tensor]]:
        if self.bf16:
            from deepspeed.utils import safe_get_full_fp32_param

            vals = []
            for p in self.params:
                hp = safe_get_full_fp32_param(p)  # a collective under ZeRO-3
                vals.append((hp if hp is not None else p.detach()).float())
            yield vals
        elif self.stage3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(self.params, modifier_rank=None):
                yield [p.detach().float() for p in self.params]
        else:
            yield [p.detach().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """theta_ema <- decay * theta_ema + (1 - decay) * theta. Call on every rank after each applied step."""
        with self._full_fp32() as full:
            for name, value in zip(self.names, full):
                s = self.shadow[name]
                s.mul_(self.decay).add_(value.to(s.device), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from symdiff.errors import CheckpointError

        missing = sorted(set(self.shadow) - set(state))
        extra = sorted(set(state) - set(self.shadow))
        bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
               for k, v in self.shadow.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if missing or extra or bad:
            raise CheckpointError("EMA state does not match the model: "
                                  + "; ".join(filter(None, [
                                      f"missing {missing[:10]}" if missing else "",
                                      f"unexpected {extra[:10]}" if extra else "",
                                      f"shape mismatch {bad[:10]}" if bad else ""])))
        for k, v in self.shadow.items():
            v.copy_(state[k].to(v.device, v.dtype))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.shadow.items())
