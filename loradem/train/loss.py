"""SFT loss on the scored positions only: TRL's SFT trainer, with the vocabulary projection skipped where no label is.

    from loradem.train.loss import LossPositionsSFTTrainer
    trainer = LossPositionsSFTTrainer(model=model, args=sft_config, train_dataset=rows, peft_config=lora)
    trainer.train()                  # same loss, gradients and logged metrics as SFTTrainer

TRL's `SFTTrainer.compute_loss` runs its fused LM head, which on a device without Triton (a CPU) projects every
position of the batch onto the vocabulary, forward and backward, and computes log-probabilities, entropy and top-1
there, then zeroes the positions whose label is -100. With completion-only loss on short answers after long
prompts, most of that is thrown away (SmolLM2's head is about a fifth of its forward). Here the model is called
through its wrappers (PEFT, DDP, TRL's patched forward) with ``logits_to_keep`` set to a boolean (batch, seq) mask
of the positions whose next-token label is scored, so transformers applies the head to those positions only and
returns their logits flattened; the loss is the same token-weighted cross-entropy as TRL's (summed, divided by
``num_items_in_batch`` when the Trainer passes it, else by the batch's scored positions), and the logged
``entropy``, ``mean_token_accuracy`` and ``num_tokens`` are computed as TRL computes them, on the same positions.
Evaluation inside training (``prediction_step`` -> ``compute_loss``) takes the same path.

TRL's own path is used, unchanged, wherever this one would not save work or cannot match it: on devices where
TRL's head already scores only the labelled positions (Triton: CUDA, XPU), with ``completion_only_loss: false``
and no assistant-only loss (every token is scored), padding-free or packed batches (no attention mask), pre-shifted
``shift_labels``, a custom ``compute_loss_func``, label smoothing, a loss type other than ``nll``, MoE auxiliary
losses, sequence parallelism, ``return_outputs=True``, and models whose forward has no ``logits_to_keep``.
`scored_path_refusal` says which applies.

KL anchoring (``anchor.loss: kl``): rows tagged ``loradem_anchor`` (the Trainer keeps that column and the collator
turns it into a bool per row) are scored by KL(base ‖ model) of the next-token distributions at their scored
positions instead of by the cross-entropy of their labels; the base's distributions come from the same model under
PEFT's ``disable_adapter()``, without gradient, on the anchor rows only. The KL terms are summed with the
cross-entropy terms and divided by the same token count, so a KL anchor weighs what an SFT anchor row weighs. Such
a batch always takes the scored path (TRL's own has no KL term): where that path cannot apply for a reason other
than speed, training stops with one line.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from trl import SFTTrainer

from loradem.data.anchors import TAG as ANCHOR_TAG  # marks the anchor rows scored by KL to the base
from loradem.errors import LorademError

IGNORE = -100
_TRITON = "TRL's head already scores only the labelled positions on this device"  # a speed reason, not a limit


def _triton_scores_compactly(device: torch.device) -> bool:
    """Whether TRL's fused head already projects only the labelled positions on `device`."""
    try:
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:  # a TRL without that helper: decide as TRL 1.16 does
        from transformers.utils import is_triton_available

        return is_triton_available() and device.type in ("cuda", "xpu")
    return bool(_use_triton(device))


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under `model`'s wrappers (accelerate, PEFT) takes a ``logits_to_keep`` argument."""
    inner = model
    for _ in range(8):  # DDP / FSDP .module, PEFT .get_base_model()
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
            inner = inner.module
        else:
            break
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def scored_loss(model, inputs: dict[str, Any], num_items_in_batch=None, *, anchor: torch.Tensor | None = None,
                base_off=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, per-batch sums) of a padded, labelled batch, projecting only the positions whose next label is scored.

    The loss is TRL's: the summed cross-entropy of the scored tokens over ``num_items_in_batch`` (the Trainer's
    count of scored tokens in the whole accumulated step) or, without it, over this batch's scored tokens (at
    least 1). The sums are detached: scored positions, summed entropy, correct top-1 predictions.

    With `anchor` (a bool per row) and `base_off` (a context manager under which `model` computes the base, e.g.
    a PeftModel's ``disable_adapter``), the scored tokens of the anchor rows count KL(base ‖ model) instead of
    their cross-entropy; the sums then also hold ``anchor_kl`` (summed, detached) and ``anchor_scored``.
    """
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][keep[:, :-1]]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**model_inputs, logits_to_keep=keep).logits
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise RuntimeError(f"the model ignored logits_to_keep: logits of shape {tuple(logits.shape)} for "
                           f"{targets.shape[0]} scored positions")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 logits folded in float32, as TRL does
    log_probs = z.log_softmax(-1)
    per_token = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    extra: dict[str, torch.Tensor] = {}
    if anchor is not None and bool(anchor.any()):
        rows = anchor.nonzero().squeeze(1)
        on_anchor = anchor[keep.nonzero()[:, 0]]  # the logits are the scored positions, row-major, as the targets
        batch = labels.shape[0]
        sub = {k: v[rows] if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v
               for k, v in model_inputs.items()}
        with torch.no_grad(), base_off():
            teacher = model(**sub, logits_to_keep=keep[rows]).logits
        t = teacher.to(z.dtype).log_softmax(-1)
        kl = (t.exp() * (t - log_probs[on_anchor])).sum(-1)
        per_token = per_token.index_put((on_anchor.nonzero().squeeze(1),), kl)
        extra = {"anchor_kl": kl.detach().sum().float(), "anchor_scored": on_anchor.sum()}
    n_scored = keep.sum()
    denominator = n_scored if num_items_in_batch is None else num_items_in_batch
    # clamped like TRL's, so a batch without scored tokens gives a finite zero still connected to the model
    loss = per_token.sum() / torch.as_tensor(denominator, device=per_token.device).clamp(min=1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        correct = z.argmax(-1) == targets  # the first maximum, as TRL's top-1 counts ties with earlier tokens
    return loss, {"scored": n_scored, "entropy_sum": entropy.sum(), "correct": correct.sum(), **extra}


class LossPositionsSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose loss projects only the scored positions onto the vocabulary (see the module doc).

    With ``anchor_kl=True``, rows whose ``loradem_anchor`` tag is True are scored by KL to the base (module doc).
    """

    def __init__(self, *args, anchor_kl: bool = False, **kwargs):
        self.anchor_kl = anchor_kl  # before TRL's init, which may ask for the signature columns
        super().__init__(*args, **kwargs)
        if anchor_kl:
            self.data_collator = _AnchorTagCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.anchor_kl and ANCHOR_TAG not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ANCHOR_TAG]  # kept for the collator

    def scored_path_refusal(self, model, inputs: dict[str, Any], return_outputs: bool = False) -> str | None:
        """Why this batch takes TRL's own path, or None when the scored-positions path applies."""
        args = self.args
        if return_outputs:
            return "the caller asks for the full outputs"
        if args.completion_only_loss is False and not args.assistant_only_loss:
            return "completion_only_loss is off: every token is scored"
        if "labels" not in inputs or "attention_mask" not in inputs:
            return "padding-free or packed batch (no attention_mask)"
        if "shift_labels" in inputs:
            return "pre-shifted labels"
        if self.compute_loss_func is not None or self.label_smoother is not None or args.loss_type != "nll":
            return "a custom loss (compute_loss_func, label smoothing or loss_type)"
        if self.aux_loss_enabled:
            return "MoE auxiliary loss"
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "sp_enabled", False):
            return "sequence parallelism"
        if _triton_scores_compactly(inputs["labels"].device):
            return _TRITON
        if not accepts_logits_to_keep(model):
            return "the model's forward has no logits_to_keep"
        return None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        anchor = inputs.pop(ANCHOR_TAG, None)
        if anchor is not None and not bool(anchor.any()):
            anchor = None
        refusal = self.scored_path_refusal(model, inputs, return_outputs)
        if anchor is not None and refusal not in (None, _TRITON):
            raise LorademError(f"anchor.loss: kl needs loradem's scored-positions loss, and this batch cannot take "
                               f"it: {refusal}; use anchor.loss: sft")
        # with KL anchoring every batch takes this path where it can, so that data-parallel ranks, with or without
        # anchor rows in their batch, run the same metric gathers
        if refusal is not None and anchor is None and not (self.anchor_kl and refusal == _TRITON):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False  # as TRL: no cache to build, and none allowed with gradient checkpointing
        base_off = self.accelerator.unwrap_model(model).disable_adapter if anchor is not None else None
        loss, sums = scored_loss(model, inputs, num_items_in_batch, anchor=anchor, base_off=base_off)
        # as TRL: num_items_in_batch counts every rank's tokens, and DDP averages the gradients across ranks
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        gather = self.accelerator.gather_for_metrics
        num_valid = gather(sums["scored"]).sum()
        entropy_sum = gather(sums["entropy_sum"]).sum()
        num_correct = gather(sums["correct"]).sum()
        metrics = self._metrics[mode]
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.anchor_kl:  # KL(base ‖ model) per anchor token, averaged over the steps that had anchor rows
            zero = sums["scored"].new_zeros(())
            count = gather(sums.get("anchor_scored", zero)).sum()
            kl_sum = gather(sums.get("anchor_kl", zero.float())).sum()
            if count > 0:
                metrics["anchor_kl"].append((kl_sum / count).item())
        return loss


class _AnchorTagCollator:
    """TRL's collator, plus the ``loradem_anchor`` tag of each row as a bool tensor (False where a row has none,
    e.g. validation rows)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        tags = torch.tensor([bool(e.get(ANCHOR_TAG)) for e in examples])
        batch = self.inner([{k: v for k, v in e.items() if k != ANCHOR_TAG} for e in examples])
        batch[ANCHOR_TAG] = tags
        return batch
