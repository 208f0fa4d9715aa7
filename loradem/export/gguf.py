"""One GGUF file from a Hugging Face model folder, for llama.cpp, Ollama and LM Studio.

    from loradem.export.gguf import export_gguf
    export_gguf("runs/demo/model", "demo-q8_0.gguf", out_type="q8_0")

    loradem export runs/demo/model --gguf demo-q8_0.gguf --type q8_0

What goes in: a folder with ``config.json``, safetensors weights (one file or
shards with an index) and ``tokenizer.json``, as `loradem assemble` writes it
(a run folder ``runs/<name>`` stands for its ``model/``); any Hugging Face
folder of a supported architecture works too.

- Architectures: ``LlamaForCausalLM`` (SmolLM2, Llama 3) and
  ``MistralForCausalLM`` as llama.cpp's ``llama``, ``Qwen2ForCausalLM`` as
  its ``qwen2``. Anything else is refused in one line.
- Tensors are renamed with gguf's own name map (``gguf.get_tensor_name_map``).
  For ``llama``, each head's rows of the query and key weights are
  reordered: transformers rotates the two halves of a head's dimensions,
  llama.cpp rotates adjacent pairs, and the reordering makes the two compute
  the same attention. A tied ``lm_head`` is not written (llama.cpp reuses
  ``token_embd`` when ``output`` is absent).
- Types (``out_type``): ``f32``, ``f16``, ``bf16`` or ``q8_0``, by gguf's own
  quantizers (``gguf.quants.quantize``). As in llama.cpp's converter, norms and
  other 1-D tensors stay f32, and a q8_0 tensor whose rows are not whole
  32-value blocks is written f16.
- Metadata: what llama.cpp reads to build the model (block count, context and
  embedding lengths, head counts, RMS epsilon, rope base, dimensions and
  scaling: ``linear`` as a factor, ``llama3`` as a ``rope_freqs`` tensor).
- Tokenizer: byte-level BPE (GPT-2 style: SmolLM, Llama 3, Qwen2), as
  transformers loads it from ``tokenizer.json`` (the tokenizer loradem trains
  and evaluates with; some tokenizer classes replace the file's pre-tokenizer
  with their own): every token with its type (control, user-defined,
  normal; ids the tokenizer lacks become unused ``[PADn]``), the merges, the
  special token ids, whether a BOS/EOS is added, and the chat template.
  ``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer: found, as llama.cpp's
  converter finds it, from the sha256 of the token ids of a check text, else
  from the pre-tokenizer's structure (GPT-2's byte-level split, or Llama 3's
  or Qwen2's split pattern: a tokenizer whose vocabulary changed). Any other
  is refused, and so are SentencePiece-style tokenizers (byte-fallback BPE:
  Llama 2, Mistral 7B); llama.cpp's ``convert_hf_to_gguf.py`` converts them.
- Streamed: tensor infos are declared first, then each tensor is read from
  safetensors, converted (16 MB of float32 rows at a time) and written before
  the next is read, so memory holds one converted tensor and one chunk.
- Safe: the file is written aside and renamed into place; an existing file is
  replaced only with ``overwrite=True``, and only if it is a GGUF file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np

from loradem.errors import LorademError, first_line
from loradem.files import atomic_file, read_json
from loradem.progress import progress
from loradem.vectors.checkpoint import ST_DTYPES, BaseCheckpoint, read_base

OUT_TYPES = ("f16", "bf16", "f32", "q8_0")


@dataclass(frozen=True)
class Architecture:
    gguf_arch: str  # a gguf.MODEL_ARCH member's name
    rope_pairs: bool  # llama.cpp rotates adjacent pairs: reorder the query/key rows of each head


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("LLAMA", rope_pairs=True),
    "MistralForCausalLM": Architecture("LLAMA", rope_pairs=True),
    "Qwen2ForCausalLM": Architecture("QWEN2", rope_pairs=False),
}

# llama.cpp's converter identifies a BPE pre-tokenizer by the sha256 of the ids the tokenizer gives this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); the same text and hash find the same name here.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {  # hash -> llama.cpp's name, for the byte-level BPE families exported here
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 embedding's
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}
SPLIT_PATTERNS = {  # the split patterns of Llama 3's and Qwen2's tokenizer.json, by llama.cpp's names
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
ROPE_TYPES = ("default", "linear", "llama3")
SKIPPED = (".rotary_emb.inv_freq",)
CHUNK_BYTES = 16 << 20  # float32 rows converted at once  # buffers some checkpoints carry; llama.cpp computes them


@dataclass(frozen=True)
class TensorJob:
    """One GGUF tensor: read `source` from the folder (or take `data`), reorder rows for `heads` heads, store as `qtype`."""

    source: str
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    heads: int | None = None
    data: np.ndarray | None = None


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    types: list[int]
    pre: str
    add_bos: bool
    add_eos: bool


# ---- inputs -------------------------------------------------------------------

def model_folder(path: str | Path) -> Path:
    """The model folder behind `path`: the folder itself, or a run folder's ``model/``."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if not path.exists():
        raise LorademError(f"{path}: not found; expected a model folder (e.g. runs/demo/model) or a run folder (runs/demo)")
    raise LorademError(f"{path}: expected a model folder with config.json, or a run folder holding model/")


def default_output(folder: Path, out_type: str) -> Path:
    """``<name>-<type>.gguf`` beside the model folder (a run's ``model/`` is named after its run)."""
    return folder.parent / f"{_model_name(folder)}-{out_type}.gguf"


def _model_name(folder: Path) -> str:
    folder = folder.resolve()
    return folder.parent.name if folder.name == "model" and (folder / "loradem.json").is_file() else folder.name


def architecture(config: dict, folder: Path) -> Architecture:
    archs = config.get("architectures") or []
    arch = archs[0] if len(archs) == 1 else None
    if arch not in ARCHITECTURES:
        given = ", ".join(archs) or "none"
        raise LorademError(f"{folder / 'config.json'}: architectures: {given} cannot be exported to GGUF by loradem "
                           f"(supported: {', '.join(ARCHITECTURES)})")
    if config.get("quantization_config"):
        raise LorademError(f"{folder / 'config.json'}: a quantized checkpoint (quantization_config); export a "
                           "full-precision folder")
    if arch == "LlamaForCausalLM" and config.get("mlp_bias"):
        raise LorademError(f"{folder / 'config.json'}: mlp_bias: true is not exported (llama.cpp's llama has no MLP biases)")
    if arch == "Qwen2ForCausalLM" and config.get("use_sliding_window"):
        raise LorademError(f"{folder / 'config.json'}: use_sliding_window: true is not exported (llama.cpp's qwen2 "
                           "attends to the whole context)")
    return ARCHITECTURES[arch]


def _config_int(config: dict, key: str, folder: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LorademError(f"{folder / 'config.json'}: {key}: expected a positive whole number, got {value!r}")
    return value


def rope_settings(config: dict, folder: Path) -> tuple[float, str, dict]:
    """(rope base, rope type, its parameters), from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` / ``rope_scaling``."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise LorademError(f"{folder / 'config.json'}: rope type {kind!r} is not exported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "linear" and not isinstance(params.get("factor"), (int, float)):
        raise LorademError(f"{folder / 'config.json'}: linear rope scaling without a numeric factor")
    return float(theta), kind, params


def llama3_rope_factors(theta: float, dim: int, params: dict, config: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling as the per-frequency divisors llama.cpp reads from ``rope_freqs``:
    1 for short wavelengths, `factor` for long ones, and a smooth blend between."""
    factor = float(params.get("factor", 8.0))
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    context = float(params.get("original_max_position_embeddings", config.get("original_max_position_embeddings", 8192)))
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    wavelength = 2 * math.pi / inv_freq
    blend = (context / wavelength - low) / (high - low)
    factors = np.where(wavelength < context / high, 1.0,
                       np.where(wavelength > context / low, factor, 1.0 / ((1 - blend) / factor + blend)))
    return factors.astype(np.float32)


# ---- the tokenizer ------------------------------------------------------------

def read_vocabulary(folder: Path, n_vocab: int) -> Vocabulary:
    """Tokens, their types and llama.cpp's pre-tokenizer name from ``tokenizer.json``, `n_vocab` entries long
    (the embedding's rows)."""
    import gguf
    from transformers import AutoTokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise LorademError(f"{folder}: no tokenizer.json; a GGUF file carries its tokenizer, so export needs the "
                           "folder's Hugging Face (fast) tokenizer")
    read_json(path)  # a damaged file is named in one line
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a tokenizer it cannot build
        raise LorademError(f"{path}: transformers cannot load this tokenizer ({first_line(exc)})") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise LorademError(f"{path}: transformers loads this tokenizer without a tokenizers backend; cannot export it")
    # the tokenizer as transformers runs it (what loradem trained and evaluated with): some tokenizer classes
    # rebuild tokenizer.json's pre-tokenizer from their own pattern when they load
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model") or {}
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        kind = "SentencePiece-style (byte-fallback BPE)" if model.get("byte_fallback") else f"{model.get('type')} / {decoder}"
        raise LorademError(f"{path}: a {kind} tokenizer; loradem exports byte-level BPE tokenizers only (SmolLM, "
                           "Llama 3, Qwen2); llama.cpp's convert_hf_to_gguf.py converts the others")

    vocab: dict[str, int] = model.get("vocab") or {}
    added = {int(t["id"]): t for t in data.get("added_tokens") or []}
    by_id: dict[int, tuple[str, int]] = {i: (text, gguf.TokenType.NORMAL) for text, i in vocab.items()}
    for i, token in added.items():
        special = token.get("special") or _looks_special(token["content"])
        by_id[i] = (token["content"], gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    beyond = [i for i in by_id if i >= n_vocab]
    if beyond:
        raise LorademError(f"{path}: token id {max(beyond)} is beyond the model's {n_vocab} embedding rows")
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))

    ids = tokenizer.encode(CHECK_TEXT)
    pre = KNOWN_PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest()) or _pre_by_structure(data)
    if pre is None:
        raise LorademError(f"{path}: its pre-tokenizer ({_pre_name(data)}) is none of those loradem can name for llama.cpp "
                           "(by hash or structure); llama.cpp's convert_hf_to_gguf.py knows more")
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    return Vocabulary(tokens, types, pre, add_bos=full[:1] != plain[:1], add_eos=full[-1:] != plain[-1:])


def _looks_special(text: str) -> bool:
    """Added tokens some tokenizers forget to mark special, which llama.cpp must still treat as control tokens."""
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<unused") and text.endswith(">"))


def _pre_by_structure(data: dict) -> str | None:
    """llama.cpp's pre-tokenizer that splits text exactly as this tokenizer.json does, read from its structure: GPT-2's
    byte-level split alone is ``gpt-2``; a split by Llama 3's or Qwen2's pattern before a byte-level step without
    its own regex is ``llama-bpe`` or ``qwen2``. For tokenizers no known model hashes to (a changed vocabulary)."""
    pre = data.get("pre_tokenizer") or {}
    normalizer = (data.get("normalizer") or {}).get("type")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2" if normalizer is None else None
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return None
    split, byte_level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert") \
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True) \
            or byte_level.get("add_prefix_space", False):
        return None
    name = SPLIT_PATTERNS.get((split.get("pattern") or {}).get("Regex"))
    # Qwen2's own tokenizer.json normalizes to NFC, which llama.cpp's qwen2 leaves out just as its converter does
    return name if normalizer is None or (normalizer == "NFC" and name == "qwen2") else None


def _pre_name(data: dict) -> str:
    pre = data.get("pre_tokenizer") or {}
    inner = [p.get("type") for p in pre.get("pretokenizers", [])] if pre.get("type") == "Sequence" else []
    return f"{pre.get('type')}" + (f" of {', '.join(map(str, inner))}" if inner else "")


# ---- the plan -----------------------------------------------------------------

def plan_tensors(checkpoint: BaseCheckpoint, arch: Architecture, out_type: str) -> list[TensorJob]:
    """Every GGUF tensor with its name, shape and stored type; refuses a tensor llama.cpp would not know."""
    import gguf

    config, folder = checkpoint.config, checkpoint.folder
    layers = _config_int(config, "num_hidden_layers", folder)
    heads = _config_int(config, "num_attention_heads", folder)
    kv_heads = _config_int(config, "num_key_value_heads", folder, heads)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), layers)
    wanted = _qtype(out_type)
    jobs: list[TensorJob] = []
    for source, (shape, dtype) in checkpoint.tensors.items():
        if source.endswith(SKIPPED):
            continue
        if not dtype.is_floating_point:
            raise LorademError(f"{checkpoint.files[source]}: tensor {source} is {dtype}; expected floating-point weights")
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LorademError(f"{checkpoint.files[source]}: tensor {source} has no GGUF name for llama.cpp's "
                               f"{arch.gguf_arch.lower()} (a module that architecture does not have)")
        rows = None
        if arch.rope_pairs and source.endswith(("q_proj.weight", "q_proj.bias")):
            rows = heads
        elif arch.rope_pairs and source.endswith(("k_proj.weight", "k_proj.bias")):
            rows = kv_heads
        jobs.append(TensorJob(source, name, tuple(shape), _stored_type(name, tuple(shape), wanted), rows))
    if "token_embd.weight" not in {j.name for j in jobs}:
        raise LorademError(f"{folder}: no input embedding (model.embed_tokens.weight) among the weights")
    if "output.weight" not in {j.name for j in jobs} and config.get("tie_word_embeddings") is False:
        raise LorademError(f"{folder}: lm_head.weight is missing and tie_word_embeddings is false")
    theta, kind, params = rope_settings(config, folder)
    if kind == "llama3":
        if arch.gguf_arch != "LLAMA":
            raise LorademError(f"{folder / 'config.json'}: llama3 rope scaling on {arch.gguf_arch.lower()} is not exported")
        factors = llama3_rope_factors(theta, _head_dim(config, folder), params, config)
        rope_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        jobs.append(TensorJob("", rope_name, factors.shape, gguf.GGMLQuantizationType.F32, data=factors))
    return jobs


def _qtype(out_type: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if out_type not in OUT_TYPES:
        raise LorademError(f"type: expected one of {', '.join(OUT_TYPES)}, got {out_type!r}")
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]


def _file_type(out_type: str):
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[out_type]


def _stored_type(name: str, shape: tuple[int, ...], wanted):
    """f32 for what llama.cpp keeps f32 (1-D tensors, norms, biases); f16 for a q8_0 row that is not whole blocks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return Q.F16
    return wanted


def _head_dim(config: dict, folder: Path) -> int:
    if config.get("head_dim"):
        return _config_int(config, "head_dim", folder)
    return _config_int(config, "hidden_size", folder) // _config_int(config, "num_attention_heads", folder)


def _nbytes(job: TensorJob) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[job.qtype]
    return math.prod(job.shape) // block * size


# ---- metadata -----------------------------------------------------------------

def add_metadata(writer, checkpoint: BaseCheckpoint, arch: Architecture, out_type: str, n_vocab: int, name: str) -> None:
    """What llama.cpp reads to build the model: general.*, <arch>.* hyperparameters and rope settings."""
    import gguf

    config, folder = checkpoint.config, checkpoint.folder
    heads = _config_int(config, "num_attention_heads", folder)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(_config_int(config, "num_hidden_layers", folder))
    writer.add_context_length(_config_int(config, "max_position_embeddings", folder))
    writer.add_embedding_length(_config_int(config, "hidden_size", folder))
    writer.add_feed_forward_length(_config_int(config, "intermediate_size", folder))
    writer.add_head_count(heads)
    writer.add_head_count_kv(_config_int(config, "num_key_value_heads", folder, heads))
    eps = config.get("rms_norm_eps")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise LorademError(f"{folder / 'config.json'}: rms_norm_eps: expected a positive number, got {eps!r}")
    writer.add_layer_norm_rms_eps(float(eps))
    theta, kind, params = rope_settings(config, folder)
    writer.add_rope_freq_base(theta)
    head_dim = _head_dim(config, folder)
    writer.add_rope_dimension_count(head_dim)
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(_file_type(out_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer(writer, folder: Path, vocab: Vocabulary, n_vocab: int) -> bool:
    """Tokens, types, merges, special ids, BOS/EOS handling and the chat template; returns whether there was a template."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise LorademError(f"{folder / 'tokenizer.json'}: no BPE merges; llama.cpp cannot tokenize without them")
    # what the tokenizer itself does wins over what SpecialVocab could not decide
    special.add_special_token.setdefault("bos", vocab.add_bos)
    special.add_special_token.setdefault("eos", vocab.add_eos)
    special.add_to_gguf(writer, quiet=True)
    return special.chat_template is not None


# ---- writing ------------------------------------------------------------------

def interleave_rope_rows(weight, heads: int):
    """Reorder each head's rows from transformers' halves layout (x₀…x_{d/2-1}, y₀…y_{d/2-1}) to llama.cpp's
    adjacent pairs (x₀, y₀, x₁, y₁, …): the rotation each pair gets is then the same in both."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def convert(read, job: TensorJob) -> np.ndarray:
    """The bytes GGUF stores for `job`; ``read(a, b)`` gives rows a to b of the folder's tensor.

    Rows are read and converted a chunk at a time (float32 first: exact for f16, bf16 and f32 inputs), in whole
    heads when rows are reordered, so memory holds the output and one chunk, never the tensor in float32.
    """
    import gguf
    import torch

    rows = job.shape[0] if job.shape else 1
    if len(job.shape) < 2:
        x = read(0, rows).to(torch.float32).reshape(job.shape)
        if job.heads is not None:  # a query or key bias
            x = interleave_rope_rows(x, job.heads)
        return gguf.quants.quantize(x.numpy(), job.qtype)
    unit = rows // job.heads if job.heads else 1  # a head's rows: reordering never crosses a head
    step = max(unit, CHUNK_BYTES // (4 * math.prod(job.shape[1:])) // unit * unit)
    out = None
    for start in range(0, rows, step):
        x = read(start, min(start + step, rows)).to(torch.float32)
        if job.heads is not None:
            x = interleave_rope_rows(x, x.shape[0] // unit)
        data = gguf.quants.quantize(np.ascontiguousarray(x.numpy()), job.qtype)
        if out is None:
            out = np.empty((rows, *data.shape[1:]), dtype=data.dtype)
        out[start:start + len(data)] = data
    return out


def export_gguf(
    model: str | Path,
    out: str | Path | None = None,
    *,
    out_type: str = "f16",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write `model` (a model folder, or a run folder holding ``model/``) to one GGUF file; returns its path.

    `out` defaults to ``<name>-<type>.gguf`` beside the model folder.
    """
    import gguf

    started = time.perf_counter()
    _qtype(out_type)
    folder = model_folder(model)
    out = Path(out) if out else default_output(folder, out_type)
    _check_output(out, overwrite)
    if not any(folder.glob("*.safetensors")):
        found = [p.name for p in folder.glob("*.bin")]
        hint = f" (found {', '.join(found)}: loradem reads safetensors only, never pickles)" if found else ""
        raise LorademError(f"{folder}: no *.safetensors weights{hint}")
    checkpoint = read_base(folder)
    arch = architecture(checkpoint.config, folder)
    jobs = plan_tensors(checkpoint, arch, out_type)
    n_vocab = next(j.shape[0] for j in jobs if j.name == "token_embd.weight")
    vocab = read_vocabulary(folder, n_vocab)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
    add_metadata(writer, checkpoint, arch, out_type, n_vocab, _model_name(folder))
    if not add_tokenizer(writer, folder, vocab, n_vocab):
        log(f"note: {folder} has no chat template; the GGUF file carries none")
    for job in jobs:
        if job.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if job.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(job.name, job.shape, np.dtype(dtype), _nbytes(job))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(job.shape, job.qtype)
            writer.add_tensor_info(job.name, byte_shape, np.dtype(np.uint8), _nbytes(job), raw_dtype=job.qtype)

    total = sum(_nbytes(j) for j in jobs)
    log(f"exporting {folder} -> {out} ({out_type}, {len(jobs)} tensors, {total / 1e6:,.1f} MB, "
        f"{arch.gguf_arch.lower()}, pre-tokenizer {vocab.pre})")
    with atomic_file(out, overwrite, needed_bytes=total, fix="choose another output") as tmp:
        write_tensors(writer, checkpoint, jobs, tmp)
    log(f"wrote {out} ({out.stat().st_size / 1e6:,.1f} MB) in {time.perf_counter() - started:.1f} s")
    return out


def write_tensors(writer, checkpoint: BaseCheckpoint, jobs: list[TensorJob], path: Path) -> None:
    """Header, metadata and tensor infos, then each tensor read, converted and written before the next is read."""
    import gguf

    with ExitStack() as stack:
        stack.callback(writer.close)
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        ranges: dict[Path, dict] = {}  # each file's tensors as byte ranges, from gguf's own safetensors index
        files: dict[Path, object] = {}
        bar = stack.enter_context(progress(sum(_nbytes(j) for j in jobs), "export", bytes=True))
        for job in jobs:
            if job.data is not None:
                data = job.data
            else:
                file = checkpoint.files[job.source]
                if file not in ranges:
                    ranges[file] = gguf.utility.SafetensorsLocal(file).tensors
                    files[file] = stack.enter_context(open(file, "rb"))
                data = convert(RowReader(files[file], ranges[file][job.source], job.source), job)
            writer.write_tensor_data(data)
            del data
            bar.update(_nbytes(job))


class RowReader:
    """Rows of one tensor read straight from its byte range in the safetensors file: ``reader(a, b)`` is rows a to b,
    costing only their bytes (the safetensors library reads a whole tensor to slice it)."""

    def __init__(self, file, tensor, name: str) -> None:
        self.file, self.tensor, self.name = file, tensor, name
        self.dtype = ST_DTYPES[tensor.dtype]
        self.row_bytes = math.prod(tensor.shape[1:]) * self.dtype.itemsize

    def __call__(self, start: int, end: int):
        import torch

        if not self.tensor.shape:
            start, end = 0, 1
        buffer = bytearray((end - start) * self.row_bytes)
        self.file.seek(self.tensor.data_range.offset + start * self.row_bytes)
        if self.file.readinto(buffer) != len(buffer):
            raise LorademError(f"{self.tensor.data_range.filename}: tensor {self.name} is cut short (truncated file?)")
        return torch.frombuffer(buffer, dtype=self.dtype).reshape(end - start, *self.tensor.shape[1:])


def _check_output(out: Path, overwrite: bool) -> None:
    """An existing output is replaced only with `overwrite`, and only if it is a GGUF file (never a folder or another file)."""
    if out.is_dir():
        raise LorademError(f"{out}: is a folder; give the path of the .gguf file to write")
    if not out.exists():
        return
    if not overwrite:
        raise LorademError(f"{out}: already exists (pass --overwrite to replace it)")
    with open(out, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LorademError(f"{out}: --overwrite replaces only a GGUF file, and this is not one; choose another output")
