"""loradem.export.gguf: every tensor, value and setting of an assembled folder read back from the GGUF file; refusals leave nothing.

    pytest tests/test_export_gguf.py
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_lora import make_adapter
from tiny import build_tokenizer

from loradem.cli import main
from loradem.errors import LorademError
from loradem.export import gguf as export
from loradem.export.gguf import export_gguf
from loradem.merge.fold import assemble

Q = gguf.GGMLQuantizationType


def quiet(*_args) -> None:
    pass


@pytest.fixture(scope="module")
def assembled(tiny_base_tied, tmp_path_factory) -> Path:
    """A folder loradem assembled from the tied tiny Llama (like SmolLM2) and one adapter, in several shards."""
    root = tmp_path_factory.mktemp("gguf")
    adapter = make_adapter(tiny_base_tied, root / "adapter", seed=5, r=4, lora_alpha=8,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return assemble(tiny_base_tied, [(adapter, 0.7)], root / "runs" / "tiny" / "model", max_shard_size_mb=0.02, log=quiet)


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open is not a dict
    return tensors


def gguf_name(name: str) -> str:
    """The GGUF name of a Llama tensor, written out by hand (not through gguf's map)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")  # model.layers.<i>.<block>.<module>.weight
    module = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}[parts[-2]]
    return f"blk.{parts[2]}.{module}.{parts[-1]}"


def pairs_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head taken as x₀, y₀, x₁, y₁, … from transformers' x₀…x_{d/2-1}, y₀…y_{d/2-1}, by index."""
    d = weight.shape[0] // heads
    out = torch.empty_like(weight)
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = weight[h * d + i]
            out[h * d + 2 * i + 1] = weight[h * d + d // 2 + i]
    return out


def expected_f32(name: str, tensor: torch.Tensor, config: dict) -> torch.Tensor:
    t = tensor.to(torch.float32)
    if name.endswith("q_proj.weight"):
        return pairs_order(t, config["num_attention_heads"])
    if name.endswith("k_proj.weight"):
        return pairs_order(t, config["num_key_value_heads"])
    return t


def read(path: Path) -> tuple[gguf.GGUFReader, dict]:
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader: gguf.GGUFReader, key: str):
    return reader.get_field(key).contents()


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_every_tensor_read_back_within_the_types_rounding(assembled, tmp_path, out_type):
    out = export_gguf(assembled, tmp_path / "m.gguf", out_type=out_type, log=quiet)
    config = json.loads((assembled / "config.json").read_text())
    source = folder_tensors(assembled)
    reader, tensors = read(out)
    assert "lm_head.weight" not in source and "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert sorted(tensors) == sorted(gguf_name(n) for n in source)
    for name, tensor in source.items():
        t = tensors[gguf_name(name)]
        assert [int(n) for n in t.shape] == list(reversed(tensor.shape)), name  # GGUF lists dimensions innermost first
        want = expected_f32(name, tensor, config)
        if tensor.dim() == 1:  # norms stay f32 in every type
            assert t.tensor_type == Q.F32
            assert torch.equal(torch.from_numpy(np.array(t.data)), want), name
            continue
        if out_type == "f32":
            assert t.tensor_type == Q.F32
            assert torch.equal(torch.from_numpy(np.array(t.data)), want), name
        elif out_type == "f16":
            assert t.tensor_type == Q.F16
            assert torch.equal(torch.from_numpy(np.array(t.data)), want.to(torch.float16)), name
        elif out_type == "bf16":
            assert t.tensor_type == Q.BF16
            got = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), Q.BF16))
            assert torch.equal(got, want.to(torch.bfloat16).to(torch.float32)), name
        else:
            assert t.tensor_type == Q.Q8_0
            got = gguf.quants.dequantize(np.array(t.data), Q.Q8_0)
            ours = gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), Q.Q8_0), Q.Q8_0)
            assert np.array_equal(got, ours), name
            blocks = want.numpy().reshape(-1, 32)
            error = np.abs(got.reshape(-1, 32) - blocks).max(axis=1)
            assert (error <= np.abs(blocks).max(axis=1) / 127).all(), name
    assert field(reader, "general.file_type") == int(export._file_type(out_type))


def test_metadata_and_tokenizer_complete(assembled, tmp_path):
    out = export_gguf(assembled, tmp_path / "m.gguf", log=quiet)
    config = json.loads((assembled / "config.json").read_text())
    tokenizer = json.loads((assembled / "tokenizer.json").read_text())
    reader, _ = read(out)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.name") == "tiny"  # a run's model/ is named after its run
    for key, value in {"block_count": 2, "context_length": 256, "embedding_length": 32, "feed_forward_length": 64,
                       "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 8,
                       "vocab_size": config["vocab_size"]}.items():
        assert field(reader, f"llama.{key}") == value, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])

    tok = build_tokenizer()
    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"  # a plain GPT-2 byte-level split
    assert field(reader, "tokenizer.ggml.tokens") == [by_id[i] for i in range(config["vocab_size"])]
    types = field(reader, "tokenizer.ggml.token_type")
    specials = {t["id"] for t in tokenizer["added_tokens"]}
    assert specials == {0, 1, 2}
    assert all(types[i] == (gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL) for i in range(len(types)))
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in tokenizer["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # the tokenizer adds none
    assert field(reader, "tokenizer.chat_template") == tok.chat_template


def test_reordered_query_key_rows_give_the_same_attention(assembled, tmp_path):
    """transformers rotates (x_i, x_{i+d/2}) pairs; llama.cpp's llama rope rotates (x_{2i}, x_{2i+1}). With the
    exported weights, llama.cpp's rotation gives the same query-key products as transformers' on the folder's."""
    out = export_gguf(assembled, tmp_path / "m.gguf", out_type="f32", log=quiet)
    config = json.loads((assembled / "config.json").read_text())
    source = folder_tensors(assembled)
    _, tensors = read(out)
    heads, kv_heads, d = config["num_attention_heads"], config["num_key_value_heads"], 8
    inv_freq = 1.0 / config["rope_parameters"]["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    x = torch.randn(5, config["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    angles = torch.arange(5, dtype=torch.float64)[:, None] * inv_freq  # (positions, d/2)
    cos, sin = angles.cos(), angles.sin()

    def halves(v):  # transformers: rotate_half on (first half, second half)
        a, b = v[..., : d // 2], v[..., d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def pairs(v):  # llama.cpp's llama: adjacent pairs
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)

    for layer in range(2):
        hf_q = (x @ source[f"model.layers.{layer}.self_attn.q_proj.weight"].double().T).view(5, heads, d)
        hf_k = (x @ source[f"model.layers.{layer}.self_attn.k_proj.weight"].double().T).view(5, kv_heads, d)
        cpp_q = (x @ torch.from_numpy(np.array(tensors[f"blk.{layer}.attn_q.weight"].data)).double().T).view(5, heads, d)
        cpp_k = (x @ torch.from_numpy(np.array(tensors[f"blk.{layer}.attn_k.weight"].data)).double().T).view(5, kv_heads, d)
        for h in range(heads):
            g = h // (heads // kv_heads)
            hf = halves(hf_q[:, h]) @ halves(hf_k[:, g]).T
            cpp = pairs(cpp_q[:, h]) @ pairs(cpp_k[:, g]).T
            torch.testing.assert_close(cpp, hf, rtol=1e-9, atol=1e-9)


def test_llama_query_and_key_biases_reordered_like_their_weights(tiny_base, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_base)
    config.attention_bias = True
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    folder = tmp_path / "biased"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_base / name).is_file():
            shutil.copy(tiny_base / name, folder / name)
    _, tensors = read(export_gguf(folder, tmp_path / "b.gguf", out_type="f32", log=quiet))
    source = folder_tensors(folder)

    def bias(gguf_name: str) -> torch.Tensor:
        assert tensors[gguf_name].tensor_type == Q.F32
        return torch.from_numpy(np.array(tensors[gguf_name].data))

    attn = "model.layers.1.self_attn"
    assert torch.equal(bias("blk.1.attn_q.bias"), pairs_order(source[f"{attn}.q_proj.bias"], 4))
    assert torch.equal(bias("blk.1.attn_k.bias"), pairs_order(source[f"{attn}.k_proj.bias"], 2))
    assert torch.equal(bias("blk.1.attn_v.bias"), source[f"{attn}.v_proj.bias"])
    assert torch.equal(bias("blk.1.attn_output.bias"), source[f"{attn}.o_proj.bias"])


def test_untied_folder_writes_output(tiny_base, tmp_path):
    """Any Hugging Face Llama folder, not only loradem's: an untied lm_head becomes output.weight."""
    out = export_gguf(tiny_base, tmp_path / "base.gguf", log=quiet)
    reader, tensors = read(out)
    lm_head = folder_tensors(tiny_base)["lm_head.weight"]
    assert torch.equal(torch.from_numpy(np.array(tensors["output.weight"].data)), lm_head.to(torch.float16))
    assert field(reader, "general.name") == "base"


def test_qwen2_with_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path / "qwen"
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)  # tokenizer.json splits as GPT-2; transformers' Qwen2 tokenizer splits as Qwen2
    assert json.loads((folder / "tokenizer.json").read_text())["pre_tokenizer"]["type"] == "ByteLevel"
    out = export_gguf(folder, tmp_path / "q.gguf", out_type="f32", log=quiet)
    reader, tensors = read(out)
    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "qwen2.context_length") == 128
    # the tokenizer transformers runs (what loradem trains with), named by its split pattern: no Qwen2 hashes to this vocabulary
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"
    source = folder_tensors(folder)
    for name in ("q_proj", "k_proj", "v_proj"):  # qwen2's rope rotates halves, like transformers: nothing reordered
        for kind in ("weight", "bias"):
            t = tensors[f"blk.0.attn_{name[0]}.{kind}"]
            assert torch.equal(torch.from_numpy(np.array(t.data)), source[f"model.layers.0.self_attn.{name}.{kind}"])
    assert tensors["blk.0.attn_q.bias"].tensor_type == Q.F32


def test_llama3_rope_scaling_as_rope_freqs(tiny_base, tmp_path):
    """llama.cpp divides each rope frequency by rope_freqs; the divisors equal transformers' own llama3 scaling."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = tmp_path / "llama3"
    shutil.copytree(tiny_base, folder)
    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    edit_model_config(folder, rope_parameters=params)
    out = export_gguf(folder, tmp_path / "l3.gguf", log=quiet)
    reader, tensors = read(out)
    config = LlamaConfig.from_pretrained(folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data))
    torch.testing.assert_close(factors, plain / scaled, rtol=1e-6, atol=0)
    assert tensors["rope_freqs.weight"].tensor_type == Q.F32
    assert field(reader, "llama.rope.freq_base") == 500000.0


def test_cli_default_name_and_overwrite(assembled, tmp_path, capsys):
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(assembled, run / "model")
    assert main(["export", str(run), "--gguf", "--type", "q8_0"]) == 0
    out = run / "tiny-q8_0.gguf"
    before = out.read_bytes()
    out.write_bytes(before[:-1] + b"x")  # marks the file: a refused export must leave it as it is
    assert main(["export", str(run / "model"), "--gguf", str(out), "--type", "q8_0"]) == 2
    assert "already exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert out.read_bytes() == before[:-1] + b"x"
    assert main(["export", str(run / "model"), "--gguf", str(out), "--type", "q8_0", "--overwrite"]) == 0
    assert out.read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["model", "tiny-q8_0.gguf"]


def test_overwrite_replaces_only_a_gguf_file(assembled, tmp_path):
    out = tmp_path / "notes.gguf"
    out.write_text("my notes")
    with pytest.raises(LorademError, match="replaces only a GGUF file"):
        export_gguf(assembled, out, overwrite=True, log=quiet)
    assert out.read_text() == "my notes"
    with pytest.raises(LorademError, match="is a folder"):
        export_gguf(assembled, tmp_path, log=quiet)


def edit_model_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


@pytest.mark.parametrize("change, message", [
    (lambda f: edit_model_config(f, architectures=["GPT2LMHeadModel"]),
     "architectures: GPT2LMHeadModel cannot be exported to GGUF by loradem (supported: LlamaForCausalLM, "),
    (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json; a GGUF file carries its tokenizer"),
    (lambda f: [p.unlink() for p in f.glob("*.safetensors")], "no *.safetensors weights"),
    (lambda f: edit_model_config(f, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope type 'yarn' is not exported"),
    (lambda f: edit_tokenizer(f, byte_fallback=True), "a SentencePiece-style (byte-fallback BPE) tokenizer"),
    (lambda f: edit_pre_tokenizer(f, r"\p{L}+|\p{N}"), "its pre-tokenizer (Sequence of Split, ByteLevel) is none of"),
])
def test_refusals_are_one_line_and_leave_no_file(assembled, tmp_path, capsys, change, message):
    folder = copy_of(assembled, tmp_path)
    change(folder)
    out = tmp_path / "out" / "m.gguf"
    assert main(["export", str(folder), "--gguf", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def edit_tokenizer(folder: Path, **model_changes) -> None:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"].update(model_changes)
    path.write_text(json.dumps(data))


def edit_pre_tokenizer(folder: Path, pattern: str) -> None:
    """Split by `pattern`, then byte-level without its own regex (how Llama 3's and Qwen2's tokenizers are built)."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    path.write_text(json.dumps(data))


def test_llama3_split_named_llama_bpe(assembled, tmp_path):
    folder = copy_of(assembled, tmp_path)
    edit_pre_tokenizer(folder, next(p for p, name in export.SPLIT_PATTERNS.items() if name == "llama-bpe"))
    reader, _ = read(export_gguf(folder, tmp_path / "m.gguf", log=quiet))
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_conversion_in_row_chunks_writes_the_same_bytes(assembled, tmp_path, monkeypatch, out_type):
    whole = export_gguf(assembled, tmp_path / "whole.gguf", out_type=out_type, log=quiet)
    monkeypatch.setattr(export, "CHUNK_BYTES", 4 * 32 * 3)  # 3 rows of 32 floats; a head's 8 rows when reordered
    chunked = export_gguf(assembled, tmp_path / "chunked.gguf", out_type=out_type, log=quiet)
    assert chunked.read_bytes() == whole.read_bytes()


def test_failure_while_writing_leaves_no_file(assembled, tmp_path, monkeypatch):
    calls = []

    def failing(part, job):
        calls.append(job.name)
        if len(calls) == 3:
            raise RuntimeError("disk went away")
        return original(part, job)

    original = export.convert
    monkeypatch.setattr(export, "convert", failing)
    out = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError, match="disk went away"):
        export_gguf(assembled, out, log=quiet)
    assert list(tmp_path.iterdir()) == []



def test_a_full_disk_in_a_library_s_words_is_one_line_and_leaves_no_file(assembled, tmp_path, monkeypatch):
    def full(part, job):  # safetensors and friends report a full disk only in their message
        raise RuntimeError("Error while writing: No space left on device (os error 28)")

    monkeypatch.setattr(export, "convert", full)
    out = tmp_path / "m.gguf"
    with pytest.raises(LorademError, match=rf"^{out}: the disk is full .*; the output needs about [\d,]+ MB; nothing was "
                                           r"written, free space and re-run$"):
        export_gguf(assembled, out, log=quiet)
    assert list(tmp_path.iterdir()) == []

def test_q8_0_rows_that_are_not_whole_blocks_stay_f16(tiny_base, tmp_path):
    from tiny import build_tiny_llama

    folder = build_tiny_llama(tmp_path / "odd", hidden_size=48)  # intermediate 96: rows of 48 and 96 values
    out = export_gguf(folder, tmp_path / "odd.gguf", out_type="q8_0", log=quiet)
    _, tensors = read(out)
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.Q8_0  # rows of 96 = 3 blocks
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.F16  # rows of 48
    assert math.prod(int(n) for n in tensors["blk.0.attn_q.weight"].shape) == 48 * 48
