"""Placeholder until the issue that builds this op lands."""


def scaled_dot_product_attention(*args, **kwargs):
    raise NotImplementedError("scaled_dot_product_attention is not implemented yet")


def varlen_attention(*args, **kwargs):
    raise NotImplementedError("varlen_attention is not implemented yet")
