"""What loradem accepts as a distribution vector: the adapter_config.json rule, written once.

    check_config(config, "adapters/math/adapter_config.json")     # what the assembler folds
    check_weighable(config, ...)                                   # what a recipe's search can weight too

A vector must be a plain additive LoRA delta W + s·B·A on the original base.
Everything else is refused with one line that names the file and the field.
The assembler (`loradem.vectors.lora`) and the in-memory weighted model
(`loradem.model.soup`) both ask this module, so what the search accepts the
fold accepts, and a vector is refused before any work rather than after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from loradem.errors import LorademError

ADDITIVE_INITS = {True, False, "gaussian", "eva", "orthogonal"}

# config fields that, when set, make the adapter something other than W + s·B·A
NON_ADDITIVE = {
    "use_dora": "DoRA rescales by the base weight's column norms, so its delta is not additive",
    "trainable_token_indices": "trainable tokens store replacement embedding rows, not a low-rank delta",
    "lora_bias": "lora_bias adds a bias term to lora_B that loradem does not fold",
    "alora_invocation_tokens": "aLoRA applies only after its invocation tokens and cannot be merged",
    "use_qalora": "QALoRA pools inputs by group, so its delta is not s·B·A",
    "velora_config": "LoRA variants (VeLoRA) are not verified to be plain additive deltas",
    "monteclora_config": "LoRA variants (MonteCLoRA) are not plain additive deltas",
    "use_bdlora": "LoRA variants (BD-LoRA) are not verified to be plain additive deltas",
    "arrow_config": "Arrow routing mixes adapters per token and cannot be merged",
    "kasa_config": "KaSA rewrites the base weight and adds a diagonal between A and B",
    "layer_replication": "layer_replication changes the model's layer structure",
    "target_parameters": "LoRA on raw nn.Parameters (target_parameters) is not supported",
}

# What the in-memory weighted model (the search, learned weights, evaluation) cannot scale, though the
# assembler folds it: a full module copy is not a low-rank factor whose scale a trial can change.
NOT_WEIGHABLE = {
    "modules_to_save": "modules_to_save stores full module copies, which a recipe's search cannot weight "
    "(fold such an adapter with `loradem assemble --adapter PATH=W`)",
}


def check_weighable(config: Mapping[str, Any], where: Path | str) -> None:
    """The recipe rule: `check_config`, and nothing the in-memory weighted model cannot scale."""
    check_config(config, where)
    for field, why in NOT_WEIGHABLE.items():
        if config.get(field):
            raise LorademError(f"{where}: {field} is set; {why}")


def check_config(config: Mapping[str, Any], where: Path | str) -> None:
    """Refuse an adapter_config.json that does not describe plain additive LoRA deltas."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise LorademError(
            f"{where}: peft_type is {config.get('peft_type')!r}; loradem folds LoRA adapters only "
            "(LoHa, LoKr, IA3 and others are not sums of s·B·A)"
        )
    for field, why in NON_ADDITIVE.items():
        if config.get(field):
            raise LorademError(f"{where}: {field} is set; {why}")
    if config.get("bias", "none") != "none":
        raise LorademError(f"{where}: bias={config['bias']!r}; loradem folds adapters trained with bias='none' only")
    init = config.get("init_lora_weights", True)
    if init not in ADDITIVE_INITS:
        raise LorademError(
            f"{where}: init_lora_weights={init!r} rewrites the base weight at initialisation, so the adapter is not a "
            "delta on the original base (save it with path_initial_model_for_weight_conversion first)"
        )
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise LorademError(f"{where}: {field}: expected a number, got {value!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise LorademError(f"{where}: {field}: expected a mapping of regex to number")
