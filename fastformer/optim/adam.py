"""Placeholder: filled in by the issue that builds it."""


class FusedAdam:  # placeholder
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("FusedAdam is not implemented yet")


class FusedAdamW:  # placeholder
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("FusedAdamW is not implemented yet")


def extension_available() -> bool:  # placeholder
    return False


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):  # placeholder
    raise NotImplementedError("clip_grad_norm_ is not implemented yet")
