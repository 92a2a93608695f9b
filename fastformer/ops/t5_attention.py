"""Placeholder until the issue that builds this op lands."""


def t5_attention(*args, **kwargs):
    raise NotImplementedError("t5_attention is not implemented yet")
