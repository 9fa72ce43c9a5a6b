import torch
def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    return torch.as_tensor(value, dtype=dtype, device=device)
