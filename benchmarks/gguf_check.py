"""Check `loradem export --gguf` with a real client: llama.cpp (through llama-cpp-python) against transformers.

    make gguf-check                                             # installs llama-cpp-python into .venv once, then this
    flock /tmp/loradem-heavy.lock .venv/bin/python benchmarks/gguf_check.py [--model runs/demo/model]

1. Exports the model (default: the demo's merged SmolLM2-135M, ``runs/demo/model``)
   to f32, f16 and q8_0 GGUF files, each in a fresh subprocess that reports its
   wall time and peak RSS (``VmHWM``) and its RSS after the imports alone
   (torch, transformers, safetensors, gguf).
2. Loads each file with ``llama_cpp.Llama(logits_all=True)`` and runs the same
   token ids as transformers (float32, the folder as saved) on 24 prompts: plain
   text, the demo's tasks and general questions through the chat template, code,
   numbers, other languages. Per type: next-token top-1 agreement at the last
   position and at every position, and the largest and the mean absolute logit
   difference (over every position and vocabulary entry).
   f32 shows the conversion alone (names, query/key reordering, settings);
   f16 and q8_0 add their rounding.
3. Reads each file back with transformers' own GGUF loader (an independent
   reader: it de-quantizes and puts the query/key rows back) and compares its
   logits with the folder's: exact for f32, and for q8_0 the weights' rounding
   alone (llama.cpp also rounds activations to 8 bits).
4. Checks that llama.cpp's own tokenizer (from the file's vocabulary, merges,
   pre-tokenizer and BOS setting) gives transformers' token ids for every
   prompt, and that the file carries the folder's chat template.
5. The same f32 comparison on four tiny random models built here: a Llama with
   grouped-query attention, the same with attention biases, a Qwen2 with
   attention biases, and a Llama with Llama 3.1 rope scaling (rope_freqs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PLAIN = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "1, 2, 3, 5, 8, 13,",
    "Once upon a time, in a small village by the sea,",
    "Der schnelle braune Fuchs springt über den",
    "The derivative of x^2 with respect to x is",
    "import numpy as np\narr = np.array([3, 1, 2])\nprint(np.sort(arr))  # prints",
    "Q: What is 123 + 456?\nA:",
]
CHAT = [
    "What is 4821 + 377? Answer with the number only.",
    "Reverse the letters of the word 'planet'.",
    "Sort these numbers in ascending order: 42, 7, 19, 3, 88.",
    "What is 90 + 15? Answer with the number only.",
    "Reverse the letters of the word 'keyboard'.",
    "Sort these numbers in ascending order: 5, 300, 12.",
    "Give me three tips for sleeping better.",
    "What is the boiling point of water at sea level?",
    "Write a haiku about autumn.",
    "Translate 'good morning' into Spanish.",
    "Explain what a prime number is in one sentence.",
    "Who wrote Romeo and Juliet?",
    "List the days of the week.",
    "How many legs does a spider have?",
    "¿Cuál es la capital de Italia?",
    "Summarize: The cat sat on the mat. It was warm. The cat fell asleep.",
]

EXPORT_CHILD = """
import json, sys, time
from pathlib import Path

def hwm():
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(('VmHWM', 'VmRSS')):
            yield line.split(':')[0], int(line.split()[1]) * 1024

import loradem.export.gguf, safetensors, gguf, torch, transformers  # what an export imports
after_imports = dict(hwm())['VmRSS']
from loradem.export.gguf import export_gguf
started = time.perf_counter()
export_gguf(sys.argv[1], sys.argv[2], out_type=sys.argv[3], log=lambda *_: None)
seconds = time.perf_counter() - started
print(json.dumps({'seconds': seconds, 'peak_rss': dict(hwm())['VmHWM'], 'imports_rss': after_imports}))
"""


def export_in_child(model: Path, out: Path, out_type: str) -> dict:
    env = {**os.environ, "LORADEM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(model), str(out), out_type],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def prompts(tokenizer) -> list[tuple[str, str]]:
    """(label, text) pairs; chat prompts rendered by the folder's own chat template with the generation prompt."""
    out = [("plain", p) for p in PLAIN]
    if tokenizer.chat_template:
        for p in CHAT:
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            out.append(("chat", text))
    return out


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def compare(gguf_path: Path, model, tokenizer, texts: list[tuple[str, str]], threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=512, logits_all=True, n_threads=threads, n_batch=512, verbose=False)
    last_agree = all_agree = all_positions = tokens_agree = 0
    max_diff = sum_diff = 0.0
    for _, text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        tokens_agree += llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == ids
        hf, cpp = hf_logits(model, ids), cpp_logits(llm, ids)
        diff = np.abs(hf - cpp)
        max_diff, sum_diff = max(max_diff, float(diff.max())), sum_diff + float(diff.mean()) * len(ids)
        last_agree += int(hf[-1].argmax() == cpp[-1].argmax())
        all_agree += int((hf.argmax(-1) == cpp.argmax(-1)).sum())
        all_positions += len(ids)
    template = llm.metadata.get("tokenizer.chat_template")
    result = {"prompts": len(texts), "top1_last": last_agree, "top1_all": all_agree, "positions": all_positions,
              "max_abs_logit_diff": max_diff, "mean_abs_logit_diff": sum_diff / all_positions,
              "tokenization_agrees": tokens_agree,
              "chat_template_equal": template == tokenizer.chat_template if tokenizer.chat_template else None}
    del llm
    return result


def transformers_reads_back(gguf_path: Path, model, tokenizer, texts: list[tuple[str, str]]) -> dict:
    """The file read by transformers' own GGUF loader (de-quantized to float32, query/key rows put back) against the
    folder: for q8_0, the rounding of the weights alone, without llama.cpp's 8-bit activations."""
    import torch
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    agree = positions = 0
    max_diff = 0.0
    for _, text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        a, b = hf_logits(model, ids), hf_logits(back, ids)
        max_diff = max(max_diff, float(np.abs(a - b).max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += len(ids)
    return {"hf_read_back_top1_all": agree, "hf_read_back_max_abs_logit_diff": max_diff}


def tiny_models(root: Path) -> list[tuple[str, Path]]:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from tiny import build_tiny_llama, build_tokenizer
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = [("tiny llama (GQA 4/2 heads)", build_tiny_llama(root / "llama", seed=0))]
    from transformers import LlamaConfig, LlamaForCausalLM

    biased = LlamaConfig.from_pretrained(out[0][1])
    biased.attention_bias = True
    torch.manual_seed(1)
    model = LlamaForCausalLM(biased)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(root / "llama-bias")
    build_tokenizer().save_pretrained(root / "llama-bias")
    out.append(("tiny llama (attention biases)", root / "llama-bias"))
    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # random biases: transformers initialises them at zero, which would test nothing
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(root / "qwen2")
    tok.save_pretrained(root / "qwen2")
    AutoTokenizer.from_pretrained(root / "qwen2").save_pretrained(root / "qwen2")  # with Qwen2's own split pattern
    out.append(("tiny qwen2 (attention biases)", root / "qwen2"))
    llama3 = build_tiny_llama(root / "llama3", seed=2, hidden_size=64)
    config_path = llama3 / "config.json"
    cfg = json.loads(config_path.read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config_path.write_text(json.dumps(cfg))
    out.append(("tiny llama (llama3 rope scaling)", llama3))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo/model", help="model folder to export (default: %(default)s)")
    parser.add_argument("--types", default="f32,f16,q8_0", help="GGUF types to check (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp and torch threads (default: %(default)s)")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny Llama / Qwen2 / llama3-rope models")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: run `make gguf-check` (it installs it into .venv once)", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"{model_dir}: no model folder; run `make demo` first (or pass --model)", file=sys.stderr)
        return 2
    results: dict = {"date": time.strftime("%Y-%m-%d"), "model": str(model_dir), "llama_cpp_python": llama_cpp.__version__,
                     "threads": args.threads, "types": {}, "tiny": {}}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = prompts(tokenizer)
    with tempfile.TemporaryDirectory(prefix="gguf-check-") as tmp:
        for out_type in args.types.split(","):
            path = Path(tmp) / f"model-{out_type}.gguf"
            export = export_in_child(model_dir, path, out_type)
            check = compare(path, model, tokenizer, texts, args.threads)
            back = transformers_reads_back(path, model, tokenizer, texts)
            results["types"][out_type] = {**export, "bytes": path.stat().st_size, **check, **back}
            path.unlink()
            r = results["types"][out_type]
            print(f"{out_type:>5}: export {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB "
                  f"({r['imports_rss'] / 2**20:.0f} MiB after imports), {r['bytes'] / 1e6:.1f} MB; "
                  f"top-1 {r['top1_last']}/{r['prompts']} last, {r['top1_all']}/{r['positions']} all positions; "
                  f"|logit diff| max {r['max_abs_logit_diff']:.4g}, mean {r['mean_abs_logit_diff']:.3g}; tokenization {r['tokenization_agrees']}/{r['prompts']}; "
                  f"chat template equal: {r['chat_template_equal']}; read back by transformers: top-1 "
                  f"{r['hf_read_back_top1_all']}/{r['positions']}, |logit diff| max {r['hf_read_back_max_abs_logit_diff']:.4g}",
                  flush=True)
        if not args.no_tiny:
            for label, folder in tiny_models(Path(tmp) / "tiny"):
                tok = AutoTokenizer.from_pretrained(folder)
                tiny = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                path = Path(tmp) / "tiny.gguf"
                export_in_child(folder, path, "f32")
                check = compare(path, tiny, tok, prompts(tok), args.threads)
                results["tiny"][label] = check
                print(f"{label}: f32 top-1 {check['top1_all']}/{check['positions']} all positions, "
                      f"|logit diff| max {check['max_abs_logit_diff']:.3g}, mean {check['mean_abs_logit_diff']:.2g}, tokenization "
                      f"{check['tokenization_agrees']}/{check['prompts']}", flush=True)
                path.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
