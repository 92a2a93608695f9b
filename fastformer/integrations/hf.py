"""Patch an existing Hugging Face BERT / RoBERTa / T5 model in place with fastformer's fused ops.

    import fastformer as ff
    model = ff.integrations.patch_hf_model(model)

What the patch changes (weights, module tree and state_dict stay exactly as they were):

1. Attention. transformers 5.x dispatches attention through its attention-interface registry
   (``config._attn_implementation``). The patch registers fastformer's attention and mask functions
   under the name ``"fastformer"`` and sets every config in the model to it (see _hf_attention.py):
   BERT/RoBERTa self-attention -> ``ff.scaled_dot_product_attention`` with a (B, 1, 1, Lk) bool
   key-padding mask (optionally unpadded through ``ff.varlen_attention``); T5 self-attention ->
   ``ff.t5_attention`` with the stack's own ``relative_attention_bias`` table; T5 cross-attention ->
   ``ff.scaled_dot_product_attention`` (scale 1.0).
2. Losses of the LM heads (BertForMaskedLM, BertForPreTraining, RobertaForMaskedLM,
   T5ForConditionalGeneration) go through ``ff.linear_cross_entropy`` / ``ff.cross_entropy`` on the
   labelled rows only (see _hf_loss.py). In training mode with labels, ``logits`` is None unless the
   model was patched with ``keep_logits=True`` or the call asks for ``return_dict=False`` (Hugging
   Face's tuples drop None fields, so the logits are kept to keep the tuple's layout).
"""

from __future__ import annotations

import sys
import types
import warnings

from ..ops.t5_attention import check_bucket_config
from . import _hf_attention as attn
from ._hf_loss import ensure_projection, make_loss_forward

# class name -> (family, loss kind or None). Subclasses of these are patched like their base.
SUPPORTED = {
    "BertModel": ("bert", None),
    "BertForMaskedLM": ("bert", "mlm"),
    "BertForSequenceClassification": ("bert", None),
    "BertForPreTraining": ("bert", "pretraining"),
    "RobertaModel": ("bert", None),
    "RobertaForMaskedLM": ("bert", "mlm"),
    "RobertaForSequenceClassification": ("bert", None),
    "T5Model": ("t5", None),
    "T5ForConditionalGeneration": ("t5", "seq2seq"),
    "T5EncoderModel": ("t5", None),
}
_MODULES = {
    "bert": "transformers.models.bert.modeling_bert",
    "roberta": "transformers.models.roberta.modeling_roberta",
    "t5": "transformers.models.t5.modeling_t5",
}


def _supported_base(model):
    """The first class in type(model)'s MRO that is a supported transformers class, else None."""
    for cls in type(model).__mro__:
        if SUPPORTED.get(cls.__name__) and cls.__module__ in _MODULES.values():
            return cls
    return None


def _unsupported(model, why: str) -> ValueError:
    return ValueError(
        f"patch_hf_model: {why}. Supported: {', '.join(SUPPORTED)} (transformers 5.x, encoder BERT/RoBERTa configs)."
    )


def _check_interface(model) -> None:
    """The modeling file must dispatch through transformers' attention-interface registry (5.x)."""
    for module in model.modules():
        if type(module).__name__.endswith(("SelfAttention", "T5Attention")):
            namespace = sys.modules[type(module).__module__].__dict__
            if "ALL_ATTENTION_FUNCTIONS" not in namespace:
                import transformers

                raise _unsupported(
                    model,
                    f"{type(module).__name__} in transformers {transformers.__version__} does "
                    "not dispatch through the attention-interface registry",
                )
            return


def _set_attn_implementation(model) -> None:
    """Point every config in the model (top-level, sub-configs, T5's per-stack copies) at NAME."""
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation"):
            continue
        seen.add(id(config))
        try:
            config._attn_implementation = attn.NAME  # 5.x setter; recurses into sub-configs
        except AttributeError:
            config._attn_implementation_internal = attn.NAME


def _tag_bert(model, varlen: bool) -> None:
    for module in model.modules():
        if type(module).__name__ in ("BertSelfAttention", "RobertaSelfAttention"):
            module.__dict__[attn.ROLE] = "bert_self"
            module.__dict__[attn.VARLEN] = bool(varlen)


def _t5_stacks(model):
    """(stack, its first self-attention, which owns the position-bias table) for each T5Stack of
    `model`; a stack laid out otherwise is skipped (left untagged: the generic, correct path)."""
    for stack in model.modules():
        if type(stack).__name__ != "T5Stack":
            continue
        first = stack.block[0].layer[0].SelfAttention
        if getattr(first, "relative_attention_bias", None) is not None:
            yield stack, first


def _check_t5_buckets(model) -> None:
    """Refuse, before anything is patched, a bucket config that ff.t5_attention refuses at the first
    forward (Hugging Face's own buckets leave the table's range there)."""
    for stack, first in _t5_stacks(model):
        try:
            check_bucket_config(
                not stack.is_decoder, first.relative_attention_num_buckets, first.relative_attention_max_distance
            )
        except ValueError as exc:
            raise ValueError(
                f"patch_hf_model: {type(model).__name__}'s relative_attention_num_buckets / "
                f"relative_attention_max_distance: {exc}"
            ) from None


def _tag_t5(model) -> None:
    """Tag each T5 stack's attentions; self-attentions point at the first layer, which owns the table."""
    for stack, first in _t5_stacks(model):
        for block in stack.block:
            self_attn = block.layer[0].SelfAttention
            self_attn.__dict__[attn.ROLE] = "t5_self"
            self_attn.__dict__[attn.BIAS_SOURCE] = first  # plain reference: not a registered submodule
            if stack.is_decoder and len(block.layer) > 2:
                block.layer[1].EncDecAttention.__dict__[attn.ROLE] = "t5_cross"


def patch_hf_model(model, *, keep_logits: bool = False, varlen: bool = False):
    """Route a Hugging Face model's attention and LM loss through fastformer, in place. Returns `model`.

    model: one of SUPPORTED (or a subclass), transformers 5.x. Idempotent: patching again changes
        nothing (a second call with other options updates the options).
    keep_logits: LM heads in training mode with labels also compute and return the full (B, L, V)
        logits (costs the full vocabulary projection). Default False: ``logits`` is None then, and
        only the labelled rows are projected. Eval mode always returns full logits.
    varlen: BERT/RoBERTa self-attention runs on the unpadded tokens through ``ff.varlen_attention``.
        Outputs at padded positions are then zero-attention rows instead of Hugging Face's values
        (outputs at real tokens, losses over real tokens and gradients agree).
    Raises ValueError for an unsupported model, listing what is supported, or an option that is not a
    bool; warns when an option has nothing to act on (varlen for T5, keep_logits without an LM head).
    """
    for name, value in (("keep_logits", keep_logits), ("varlen", varlen)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    try:
        import transformers  # noqa: F401 - the ImportError below names the missing extra
        from transformers import PreTrainedModel
    except ImportError as exc:  # pragma: no cover - transformers is a test extra
        raise ValueError("patch_hf_model needs transformers (pip install transformers)") from exc
    if not isinstance(model, PreTrainedModel):
        raise _unsupported(model, f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    base = _supported_base(model)
    if base is None:
        raise _unsupported(model, f"{type(model).__name__} is not supported")
    family, loss_kind = SUPPORTED[base.__name__]
    if family == "bert" and (
        getattr(model.config, "is_decoder", False) or getattr(model.config, "add_cross_attention", False)
    ):
        raise _unsupported(model, "BERT/RoBERTa decoder configs (is_decoder / add_cross_attention) are not supported")
    _check_interface(model)
    if family == "t5":
        _check_t5_buckets(model)

    if varlen and family != "bert":
        warnings.warn("varlen=True has no effect on T5 models: it applies to BERT/RoBERTa self-attention", stacklevel=2)
    if keep_logits and loss_kind is None:
        warnings.warn(f"keep_logits=True has no effect on {type(model).__name__}: it has no LM head", stacklevel=2)
    model._ff_registration = attn.registered()
    _set_attn_implementation(model)
    if family == "bert":
        _tag_bert(model, varlen)
        model._ff_varlen = varlen  # the loss forward keeps a batch with labels on padding padded
    else:
        _tag_t5(model)
    if loss_kind is not None and type(model).forward is not base.forward:
        # a subclass with its own forward (its own loss, or labels edited before super().forward):
        # taking the labels out of its call would replace its objective with plain cross-entropy
        warnings.warn(
            f"patch_hf_model: {type(model).__name__} overrides {base.__name__}.forward, so only its attention "
            "is patched; its loss stays its own (the fused linear cross-entropy is not used)",
            stacklevel=2,
        )
        loss_kind = None
    if loss_kind is not None:
        model._ff_keep_logits = keep_logits
        ensure_projection(model)
        # Instance attribute: the class (and its name in saved configs) is unchanged; deepcopy rebinds it,
        # and so does nn.DataParallel's replicate (which copies the instance's __dict__ as it is)
        model.forward = types.MethodType(make_loss_forward(type(model), loss_kind), model)
    model._replicate_for_data_parallel = types.MethodType(_replicate_for_data_parallel, model)
    model._ff_patched = True
    return model


def _replicate_for_data_parallel(self):
    """nn.Module's replica (nn.DataParallel), with the patched forward bound to the replica instead of
    to the model it was copied from (whose weights it would otherwise run). A patched T5 is refused:
    its self-attentions hold a plain reference to their stack's first layer (the position-bias
    table), which replicate copies as it is, so a replica would read the original's table."""
    if any(attn.BIAS_SOURCE in m.__dict__ for m in self.modules()):
        raise ValueError(
            "patch_hf_model: a patched T5 model cannot run under nn.DataParallel (its replicas would read "
            "the original's position-bias table); use DistributedDataParallel (torchrun), one process per GPU"
        )
    replica = type(self)._replicate_for_data_parallel(self)
    for name in ("forward", "_replicate_for_data_parallel"):
        bound = replica.__dict__.get(name)
        if isinstance(bound, types.MethodType) and bound.__self__ is self:
            replica.__dict__[name] = types.MethodType(bound.__func__, replica)
    return replica
