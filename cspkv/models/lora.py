"""A small LoRA for the default model's language model: trained by scripts/train_projector.py,
merged into the Linear weights at load time (W += B @ A), so the model stays a plain LLaVA for
export and every runtime.

The file stores, per adapted Linear ``<module path>``, ``<path>.lora_A`` [r, in] and
``<path>.lora_B`` [out, r] with the scale alpha/r already folded into B.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


class LoRALinear(nn.Module):
    """``base(x) + scale * (x A^T) B^T`` with ``base`` frozen; B starts at zero (no change at init)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / base.in_features ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T) @ (self.lora_B.T * self.scale)


def attach(language_model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS,
           seed: int = 0) -> list[nn.Parameter]:
    """Wrap every target Linear in ``language_model`` with a LoRALinear; returns the new parameters."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for name, module in list(language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                wrapped = LoRALinear(child, rank, alpha, generator)
                setattr(module, child_name, wrapped)
                params += [wrapped.lora_A, wrapped.lora_B]
    if not params:
        raise ValueError(f"no Linear named one of {targets} in the language model")
    return params


def adapter_state(language_model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as ``{path.lora_A, path.lora_B (scale folded in)}``, paths without the wrapper."""
    state = {}
    for name, module in language_model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.lora_A"] = module.lora_A.detach().float().contiguous().clone()
            state[f"{name}.lora_B"] = (module.lora_B.detach().float() * module.scale).contiguous().clone()
    return state


def adapted_paths(state: dict[str, torch.Tensor]) -> set[str]:
    """The module paths a stored adapter file names (its keys less ``.lora_A`` / ``.lora_B``)."""
    return {key.rsplit(".", 1)[0] for key in state}


def load_adapter_state(language_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`adapter_state`: copy a stored file back into the attached LoRALinears
    (to continue training). The file must adapt exactly the wrapped Linears."""
    modules = dict(language_model.named_modules())
    wrapped = {name for name, m in modules.items() if isinstance(m, LoRALinear)}
    stored = adapted_paths(state)
    if stored != wrapped:
        raise ValueError(f"the LoRA file adapts {len(stored)} Linears, the attached adapters {len(wrapped)}: "
                         "attach with the same rank and targets to load it")
    with torch.no_grad():
        for name in wrapped:
            module = modules[name]
            module.lora_A.copy_(state[f"{name}.lora_A"])
            module.lora_B.copy_(state[f"{name}.lora_B"] / module.scale)   # the file folds the scale in


def detach_adapters(language_model: nn.Module) -> None:
    """Merge every LoRALinear into its base Linear and put the plain Linear back."""
    state = adapter_state(language_model)
    for name, module in list(language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.base)
    merge(language_model, state)


def merge(language_model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Add ``B @ A`` to each named Linear's weight; returns how many were merged.

    Every adapter must name an existing Linear of matching shape: a file for another model is
    refused with the offending name rather than merged partly.
    """
    modules = dict(language_model.named_modules())
    paths = sorted(adapted_paths(state))
    updates = []
    for path in paths:
        a, b = state.get(f"{path}.lora_A"), state.get(f"{path}.lora_B")
        linear = modules.get(path)
        if a is None or b is None:
            raise ValueError(f"LoRA file: {path} lacks lora_A or lora_B")
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"LoRA file names {path!r}, which is not a Linear of this language model")
        if (b.shape[0], a.shape[1]) != tuple(linear.weight.shape) or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA {path}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not fit weight "
                             f"{tuple(linear.weight.shape)}")
        updates.append((linear, b @ a))
    with torch.no_grad():
        for linear, delta in updates:
            linear.weight += delta.to(linear.weight.dtype)
    return len(updates)


def load_and_merge(language_model: nn.Module, path: Path) -> bool:
    """Merge the adapter file at ``path`` if it exists; returns whether it did."""
    if not Path(path).is_file():
        return False
    from safetensors.torch import load_file

    merge(language_model, load_file(str(path)))
    return True
