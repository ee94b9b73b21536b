"""The CUDA device spellings that --device accepts, shared by training and the app's settings
(which must not import PyTorch: `python -m app --help` stays fast)."""

# What torch.device takes: it raises a RuntimeError on 'cuda:01', non-ASCII digits and very
# large indices, which a looser pattern let through to a traceback.
CUDA_DEVICE = r"cuda(:(0|[1-9][0-9]{0,3}))?"
