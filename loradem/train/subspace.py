"""Subspace adapters (LoRI-style): every LoRA A a frozen shared random projection, each source's B sparse.

    from loradem.train.subspace import KeepMasked, constrain
    masks = constrain(peft_model, lora, seed=0, source="addition")  # after peft built the model, before training
    trainer.add_callback(KeepMasked(masks))

With ``lora.subspace: lori`` every source's adapter is ΔWᵢ = s·(Bᵢ ⊙ Mᵢ)·A:

- **A** of a module is the same for every source: drawn from the distribution
  peft gives a fresh A (uniform in ±1/√in_features, what kaiming_uniform(a=√5)
  gives), seeded by the recipe's seed and the module's name (never the
  source's), and frozen (``requires_grad=False``, so no optimizer sees it).
- **Mᵢ** keeps ``round(density · numel)`` entries of B (at least one), a random
  choice seeded by the recipe's seed, the source's name and the module's name;
  two sources' masks share about density² of B's entries.
- **B** starts at zero (peft's init) and trains only where its mask is set: a
  gradient hook zeroes the masked entries' gradient, so gradient clipping and
  the optimizer's moments never see them (AdamW, weight decay included, then
  leaves them exactly zero); `KeepMasked` re-zeroes them after every optimizer
  step, for optimizers whose update of an entry is not a function of that
  entry's gradient alone (GaLore's projected updates).

The saved adapter is an ordinary PEFT LoRA (full A and B tensors), so every
later stage reads it unchanged. Modules are named as in the base model
(``model.layers.0.self_attn.q_proj``), so a module's A does not depend on how
peft wraps the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from transformers import TrainerCallback

from loradem.errors import LorademError
from loradem.files import stable_hash
from loradem.recipe import LoraSettings

PEFT_PREFIX = "base_model.model."


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(int(stable_hash(["loradem-lori", *parts], length=15), 16))


def projection(seed: int, module: str, shape: tuple[int, int]) -> torch.Tensor:
    """The frozen A (float32, CPU) of `module` for every source of a recipe with this seed; `shape` = (r, in)."""
    bound = 1 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=_generator("A", seed, module), dtype=torch.float32) * 2 - 1) * bound


def mask(seed: int, source: str, module: str, shape: tuple[int, int], density: float) -> torch.Tensor:
    """The boolean mask of the entries `source` trains in `module`'s B; `shape` = (out, r)."""
    numel = math.prod(shape)
    keep = torch.randperm(numel, generator=_generator("B", seed, source, module))[: max(1, round(density * numel))]
    out = torch.zeros(numel, dtype=torch.bool)
    out[keep] = True
    return out.reshape(shape)


def lora_layers(model, adapter: str = "default") -> Iterator[tuple[str, object]]:
    """(module name as in the base model, peft LoraLayer) for every layer holding `adapter`."""
    from peft.tuners.lora import LoraLayer

    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and (adapter in layer.lora_A or adapter in layer.lora_embedding_A):
            yield name.removeprefix(PEFT_PREFIX), layer


def constrain(model, lora: LoraSettings, *, seed: int, source: str, adapter: str = "default") -> dict:
    """Set every A of `adapter` in the peft `model` to its projection and freeze it; zero B outside `source`'s
    mask and keep its gradient there zero. Returns {module: (B parameter, mask)} for `KeepMasked`."""
    masks = {}
    for name, layer in lora_layers(model, adapter):
        if adapter not in layer.lora_A:
            raise LorademError(f"lora.subspace: 'lori' covers linear layers only; target_modules includes the "
                               f"embedding {name!r}; leave it out or set subspace: none")
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        keep = mask(seed, source, name, tuple(b.shape), lora.density).to(device=b.device, dtype=b.dtype)
        with torch.no_grad():
            a.copy_(projection(seed, name, tuple(a.shape)))
            b.mul_(keep)
        a.requires_grad_(False)
        b.register_hook(lambda grad, keep=keep: grad * keep)
        masks[name] = (b, keep)
    if not masks:
        raise LorademError("lora.subspace: 'lori' found no LoRA layer to constrain; check lora.target_modules")
    return masks


class KeepMasked(TrainerCallback):
    """Re-zero every B outside its mask after each optimizer step."""

    def __init__(self, masks: dict):
        self.masks = masks

    def on_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            for b, keep in self.masks.values():
                b.mul_(keep)
