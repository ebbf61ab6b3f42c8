"""Training: the default model's recipe lives in models/; the reusable pieces live here.

- `diffusion_loss`: noise schedule sampling, the eps/v target and the (Min-SNR weighted) loss.
- `shapes_dataset`: the coloured-shapes training set, captions with dropped parts, token ids.

LoRA, DreamBooth and textual-inversion trainers import these rather than copying them.
"""
