"""The base weights a QLoRA adapter was trained against: NF4-quantized, then de-quantized, with bitsandbytes.

    from loradem.merge.nf4 import quantized_tensors, round_trip
    names = quantized_tensors(base_folder)        # the .weight tensors transformers loads as 4-bit
    w_dq = round_trip(w, torch.float32)           # dequantize_4bit(quantize_4bit(w.to(float32)))

An adapter trained by ``loradem train`` with ``quantization: nf4`` saw each
quantized Linear weight as ``dequantize_4bit(quantize_4bit(W))``, not W. The
settings are the ones training uses (transformers' ``BitsAndBytesConfig(
load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``):
NF4, blocks of 64, absmax statistics quantized again (double quant). The
weight is cast to the dtype the model was loaded in before it is quantized
(float32 on a CPU, bfloat16 on a GPU with bf16 in loradem's training), and
that cast changes the result, so it is part of the round trip.

Which tensors: transformers' own bitsandbytes quantizer is run on a skeleton
of the base built on the meta device (no weight is read or allocated), so the
set is exactly the modules it replaces by ``Linear4bit`` — every nn.Linear /
Conv1D except the output embedding, tied weights and the last module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from loradem.errors import LorademError, first_line

BLOCKSIZE = 64
QUANT_TYPE = "nf4"
DOUBLE_QUANT = True
LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def settings() -> dict:
    """The quantization settings, as recorded in loradem.json."""
    return {"quant_type": QUANT_TYPE, "blocksize": BLOCKSIZE, "double_quant": DOUBLE_QUANT, "library": _bnb_version()}


def quantized_tensors(folder: str | Path) -> set[str]:
    """Names of the weight tensors transformers quantizes to 4 bits when it loads `folder` with NF4."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any failure to build the skeleton is one line
        raise LorademError(f"{folder}: cannot build the model skeleton to find its 4-bit layers ({first_line(exc)})") from None
    quantizer = AutoHfQuantizer.from_config(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QUANT_TYPE, bnb_4bit_use_double_quant=DOUBLE_QUANT),
        pre_quantized=False,
    )
    quantizer.preprocess_model(model, device_map={"": "cpu"})
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def round_trip(weight: torch.Tensor, load_dtype: torch.dtype) -> torch.Tensor:
    """dequantize_4bit(quantize_4bit(weight cast to `load_dtype`)): what the 4-bit model holds, in `load_dtype`."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(
        weight.to(load_dtype).contiguous(), blocksize=BLOCKSIZE, compress_statistics=DOUBLE_QUANT, quant_type=QUANT_TYPE,
    )
    return F.dequantize_4bit(packed, state)


def load_dtype_of(record: Mapping | None) -> torch.dtype | None:
    """The dtype an adapter's training loaded the base in, from its loradem-train.json (None if unknown).

    ``base_dtype`` when the record has it; otherwise loradem's training rule: bfloat16 on a CUDA
    device (the GPUs it targets support bf16), float32 on a CPU.
    """
    if not isinstance(record, Mapping):
        return None
    named = record.get("base_dtype")
    if isinstance(named, str):
        if named not in LOAD_DTYPES:
            raise LorademError(f"loradem-train.json: base_dtype: expected one of {', '.join(LOAD_DTYPES)}, got {named!r}")
        return LOAD_DTYPES[named]
    device = record.get("device")
    if isinstance(device, str):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return None


def _bnb_version() -> str:
    import bitsandbytes

    return f"bitsandbytes {bitsandbytes.__version__}"

