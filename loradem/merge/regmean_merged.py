"""RegMean on the merge's own activations (`regmean.activations: merged`), decoder block by decoder block.

    candidates, tokens, seconds = merge_blockwise(base_dir, factors, rows, alphas=[0.9, 0.99], max_length=128, batch_size=16)
    merged, ridged = candidates[0.9]          # module -> (Ã, B̃), as `regmean.solve_factors` returns

Plain RegMean takes every layer's inputs Xᵢ from the base model. But the merged model's block l does not see
the base's inputs: it sees what its own, already merged, blocks 0…l−1 make of the rows. RegMean++ (Nguyen et
al., arXiv 2508.03121) therefore merges one block at a time and takes block l's inputs from the merge so far.
Here, for each candidate alpha:

    h = the inputs of block 0 (embeddings), per source and batch
    for each block l:  Gram matrices of block l's LoRA layers on h, block l still at the base's weights
                       solve those layers; fold each delta into the block exactly as the assembler does
                       (float64 sum, rounded once), so later blocks see what the assembled model computes
                       h = block l (now merged) applied to h

The block's own layers stay at the base's weights while their Gram matrices are taken (RegMean++ uses each
fine-tuned model's layer there; plain RegMean measured 'base' inputs above 'own' ones on the demo, and this
choice inside a block has not been compared). Every candidate alpha gives other merged blocks, so each is its
own pass; one pass cost about 1.3× one collection on the base (benchmarks/RESULTS.md). LoRA layers outside the decoder blocks (e.g. an lm_head LoRA) are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from loradem.errors import LorademError
from loradem.merge.regmean import Factor, GramCollector, GramStatistics, empty_statistics, fold_delta, solve_factors
from loradem.model import soup
from loradem.model.generate import collate_right
from loradem.model.render import encode_for_loss
from loradem.progress import progress


class _Captured(Exception):
    """Raised by the block-0 hook: the rest of the forward pass is not needed."""


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The model's decoder blocks, in order (model.layers of Llama-style causal LMs)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    blocks = getattr(decoder, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
        raise LorademError(f"regmean.activations 'merged': cannot find the decoder blocks of {type(model).__name__}; "
                           "use activations 'base'")
    return blocks


def _block_inputs(model, blocks, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, dict]]:
    """Per batch: block 0's input hidden states and the keyword arguments the model passes every block (attention
    mask, position embeddings), caught by a hook that stops the forward pass there."""
    caught: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden.detach().clone(), kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids, mask in batches:
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
            except _Captured:
                pass
    finally:
        handle.remove()
    if len(caught) != len(batches):
        raise LorademError("regmean.activations 'merged': the model's forward pass did not reach its first decoder block")
    return caught


def merge_blockwise(base_dir: Path, factors: dict[str, dict[str, Factor]], rows: dict[str, list[dict]], *,
                    alphas: list[float], max_length: int, batch_size: int, weights: dict[str, float] | None = None,
                    log: Callable[[str], None] = print,
                    ) -> tuple[dict[float, tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]], dict[str, int], float]:
    """({alpha: (merged factors, ridged modules)}, non-padding tokens per source, seconds), each block's Gram
    matrices taken on the merge so far; `weights` scales a source's Gram matrix (default 1), and a key of `rows`
    without factors (the generic anchor rows) counts with a zero delta."""
    t0 = time.time()
    sources = list(rows)
    model = soup.load_base(base_dir).eval()
    tokenizer = soup.load_tokenizer(base_dir)
    blocks = decoder_blocks(model)
    position = {id(b): i for i, b in enumerate(blocks)}
    prefixes = {position[id(mod)]: name + "." for name, mod in model.named_modules() if id(mod) in position}
    by_block: dict[int, list[str]] = {}
    for m in factors:
        inside = [i for i, prefix in prefixes.items() if m.startswith(prefix)]
        if not inside:
            raise LorademError(f"regmean.activations 'merged': LoRA module {m} is outside the decoder blocks; "
                               "use activations 'base'")
        by_block.setdefault(inside[0], []).append(m)
    device = next(model.parameters()).device
    encoded = {s: sorted((ids for ids, _ in encode_for_loss(rows[s], tokenizer, max_length)), key=len) for s in sources}
    tokens = {s: sum(len(ids) for ids in encoded[s]) for s in sources}
    for s in sources:
        if tokens[s] == 0:
            raise LorademError(f"regmean: source {s!r}: its rows have no tokens")
    batches = {s: [collate_right([(x, x) for x in encoded[s][i:i + batch_size]], device)[:2]
                   for i in range(0, len(encoded[s]), batch_size)] for s in sources}
    modules = {m: model.get_submodule(m) for m in factors}
    originals = {m: mod.weight.detach().clone() for m, mod in modules.items()}
    candidates = {}
    with torch.inference_mode():
        start = {s: _block_inputs(model, blocks, batches[s]) for s in sources}
        with progress(len(alphas) * len(blocks), "regmean (merged activations)", unit="block") as bar:
            for alpha in alphas:
                hidden = {s: [h for h, _ in start[s]] for s in sources}
                merged, ridged = {}, []
                for index, block in enumerate(blocks):
                    if index in by_block:
                        block_factors = {m: factors[m] for m in by_block[index]}
                        stats = _block_statistics(block_factors, modules, sources, tokens, hidden, start, batches,
                                                  block, device, weights or {})
                        solved, singular = solve_factors(stats, block_factors, alpha)
                        for m, (a, b) in solved.items():
                            fold_delta(modules[m].weight, originals[m], a, b)
                        merged.update(solved)
                        ridged.extend(singular)
                    if index < len(blocks) - 1:
                        hidden = {s: [block(h, **kw) for h, (_, kw) in zip(hidden[s], start[s])] for s in sources}
                    bar.update(1)
                candidates[alpha] = ({m: merged[m] for m in factors}, ridged)
                for m, w in originals.items():
                    modules[m].weight.copy_(w)
    del model
    seconds = time.time() - t0
    log(f"regmean: Gram matrices of {len(factors)} LoRA layers on {', '.join(f'{s} {tokens[s]}' for s in sources)} tokens "
        f"(merged activations, block by block, {len(alphas)} alpha(s)) and their solves in {seconds:.1f} s")
    return candidates, tokens, seconds


def _block_statistics(factors: dict[str, dict[str, Factor]], modules: dict[str, torch.nn.Module], sources: list[str],
                      tokens: dict[str, int], hidden: dict[str, list[torch.Tensor]], start: dict[str, list],
                      batches: dict[str, list], block: torch.nn.Module, device, weights: dict[str, float]) -> GramStatistics:
    """One block's Gram statistics: every source's hidden states through the block, hooks on its LoRA layers."""
    stats = empty_statistics(sources, tokens, factors, device)
    collector = GramCollector(stats, factors, {m: modules[m] for m in factors}, device)
    try:
        for s in sources:
            collector.source, collector.weight = s, weights.get(s, 1.0) / tokens[s]
            for h, (_, kw), (_, mask) in zip(hidden[s], start[s], batches[s]):
                collector.batch(mask)
                block(h, **kw)
    finally:
        collector.close()
    return stats
