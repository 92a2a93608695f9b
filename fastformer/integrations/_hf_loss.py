"""Language-model losses of patched Hugging Face models through fastformer's cross-entropy.

Two pieces, both leaving the model's parameters and state_dict untouched:

- ``VocabProjection``: the model's output embedding (``model.get_output_embeddings()``: BERT's
  ``cls.predictions.decoder``, RoBERTa's ``lm_head.decoder``, T5's ``lm_head``) has its class swapped
  from ``nn.Linear`` to this subclass. Normally it is the same Linear. While a patched forward has
  labels pending on it, it gathers the rows whose label is not -100 and computes the loss on them:
  ``ff.linear_cross_entropy`` in training mode (only the labelled rows reach the vocabulary
  projection and the (N, V) logits are never materialised; it returns None for the logits unless
  ``keep_logits``), otherwise full logits as Hugging Face computes them and ``ff.cross_entropy`` on
  the labelled rows. Intercepting at the projection keeps everything Hugging Face does before it
  (the head's transform, T5's output rescaling) exactly as in the installed version.
- ``make_loss_forward(cls, kind)``: a forward installed on the model *instance* (the class is not
  changed). It takes the labels out of the call, puts them on the projection, calls the class's own
  forward without labels, and returns the same output type with ``loss`` filled in. Its signature
  is the original's (``inspect.signature(model.forward)``, which the HF Trainer reads, is unchanged).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading

import torch
from torch import nn

from ..ops import cross_entropy, linear_cross_entropy
from ._hf_attention import mark_padded

IGNORE_INDEX = -100


def _autocast_dtype(device: torch.device):
    """The autocast dtype in force for this device type, or None."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


_calls = threading.local()  # per thread: {id(head): [pending or None, loss or None]}


def _slots() -> dict:
    """This thread's pending calls. Per thread, not on the module: a model called from several threads
    at once (nn.DataParallel's replicas, a server) must not see another call's labels or loss."""
    slots = getattr(_calls, "slots", None)
    if slots is None:
        slots = _calls.slots = {}
    return slots


class VocabProjection(nn.Linear):
    """nn.Linear (same parameters) that computes the LM loss on labelled rows while labels are pending.

    Pending state ``(labels (B, L) long, keep_logits: bool)`` is set by the patched forward for one
    call (in this thread's `_slots`, under the head's id); the loss is left beside it.
    """

    def forward(self, hidden: torch.Tensor):
        slot = _slots().get(id(self))
        if slot is None or slot[0] is None:
            return super().forward(hidden)
        pending, slot[0] = slot[0], None  # consumed by exactly one call
        labels, keep_logits = pending
        slot[1], logits = self._loss(hidden, labels, keep_logits)
        return logits

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor, keep_logits: bool):
        """(loss, logits or None) for `labels` on the output positions of `hidden`."""
        if labels.numel() * hidden.shape[-1] != hidden.numel():
            # Hugging Face raises here too (its cross_entropy sees two batch sizes); the row gather
            # below would otherwise pair labels with the wrong positions, or index past the end
            raise ValueError(
                f"labels {tuple(labels.shape)} must have one label per output position "
                f"{tuple(hidden.shape[:-1])}: {labels.numel()} labels for {hidden.numel() // hidden.shape[-1]}"
            )
        target = labels.reshape(-1).to(hidden.device)
        rows = (target != IGNORE_INDEX).nonzero().squeeze(1)
        target = target.index_select(0, rows)
        if rows.numel() == 0:
            # Every label ignored: loss 0 with zero gradients (fastformer's documented choice; torch
            # gives NaN). Skips launching the kernels on an empty input.
            logits = super().forward(hidden) if keep_logits or not self.training else None
            zero = hidden.sum() * 0.0 + self.weight.sum() * 0.0
            return (zero + self.bias.sum() * 0.0 if self.bias is not None else zero), logits
        if keep_logits or not self.training:
            logits = super().forward(hidden)
            flat = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)
            return cross_entropy(flat, target), logits
        # (N, d) labelled rows only; cast like F.linear would under autocast so the fused op sees
        # the low-precision operands.
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        w, b = self.weight, self.bias
        dtype = _autocast_dtype(hidden.device)
        if dtype is not None:
            h, w = h.to(dtype), w.to(dtype)
            b = b.to(dtype) if b is not None else None
        return linear_cross_entropy(h, w, target, bias=b), None


def ensure_projection(model) -> VocabProjection | None:
    """Class-swap the model's output embedding to VocabProjection (again, if it was replaced, e.g. by
    resize_token_embeddings). None when it is not a plain nn.Linear."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        head.__class__ = VocabProjection
    return head if isinstance(head, VocabProjection) else None


def _bind(sig: inspect.Signature, self, args, kwargs) -> dict:
    """All arguments of a call as keywords (VAR_KEYWORD flattened)."""
    bound = sig.bind(self, *args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if name == "self":
            continue
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"unexpected positional arguments {value!r}")
        else:
            out[name] = value
    return out


def _with_loss(output, loss):
    """The same ModelOutput type with `loss` set (field order kept, so to_tuple() stays HF's)."""
    fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    fields["loss"] = loss
    return type(output)(**fields)


def _labels_on_padding(labels: torch.Tensor, attention_mask) -> bool:
    """True when a label other than -100 sits where a 2-D attention_mask is 0 (a padded position)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return False
    if labels.shape != attention_mask.shape:
        return False
    return bool(((labels.to(attention_mask.device) != IGNORE_INDEX) & (attention_mask == 0)).any())


_FORWARDS: dict = {}


def make_loss_forward(cls, kind: str):
    """A forward for instances of `cls` (kind: "mlm", "pretraining" or "seq2seq"); cached per class."""
    key = (cls, kind)
    if key in _FORWARDS:
        return _FORWARDS[key]
    original = cls.forward
    sig = inspect.signature(original)

    def forward(self, *args, **kwargs):
        call = _bind(sig, self, args, kwargs)
        labels = call.get("labels")
        head = ensure_projection(self) if labels is not None else None
        nsp_label = call.get("next_sentence_label")
        if head is None or (kind == "pretraining" and nsp_label is None):
            return original(self, *args, **kwargs)  # nothing to take over: Hugging Face's own path
        call["labels"] = None
        if kind == "pretraining":
            call["next_sentence_label"] = None
        if kind == "seq2seq" and call.get("decoder_input_ids") is None and call.get("decoder_inputs_embeds") is None:
            call["decoder_input_ids"] = self._shift_right(labels)
        return_dict = call.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)

        # return_dict=False: Hugging Face's tuple drops None fields, so without logits it would be shorter
        # than the caller unpacks; keep them then
        keep_logits = bool(getattr(self, "_ff_keep_logits", False)) or not return_dict
        slots = _slots()
        slot = slots[id(head)] = [(labels, keep_logits), None]
        if getattr(self, "_ff_varlen", False) and _labels_on_padding(labels, call.get("attention_mask")):
            call["attention_mask"] = mark_padded(call["attention_mask"])
        try:
            output = original(self, **call, return_dict=True)
            loss = slot[1]
        finally:
            slots.pop(id(head), None)
        if loss is None:
            raise RuntimeError(f"{cls.__name__}.forward did not call its output embedding; cannot compute the loss")
        if kind == "pretraining":
            nsp = output.seq_relationship_logits
            loss = loss + cross_entropy(nsp.reshape(-1, nsp.shape[-1]), nsp_label.reshape(-1).to(nsp.device))
        output = _with_loss(output, loss)
        return output if return_dict else output.to_tuple()

    functools.update_wrapper(forward, original)  # name, docstring and signature of the original
    forward.__ff_patched__ = True
    _FORWARDS[key] = forward
    return forward
