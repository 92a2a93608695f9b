

def patch_hf_model(model):  # placeholder
    raise NotImplementedError("patch_hf_model is not implemented yet")
