"""Offline stand-ins for FID's feature weights: torch-fidelity's Inception-v3 with random weights, saved as the
plain state-dict file `--fid-weights` takes (the real one is downloaded once on a machine with network)."""
from __future__ import annotations

from pathlib import Path

import torch


def save_random_inception(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's FeatureExtractorInceptionV3, random-init (its constructor's own weight load skipped)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    cls = fe.FeatureExtractorInceptionV3
    real_load, real_fetch = cls.load_state_dict, fe.load_state_dict_from_url
    cls.load_state_dict = lambda self, *a, **k: None
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(seed)
        model = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict, fe.load_state_dict_from_url = real_load, real_fetch
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def save_image_folder(folder: Path, images: torch.Tensor) -> Path:
    """images [N, 3, H, W] in [0, 1] as folder/img_000.png ..."""
    from distar.images import save_png

    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        save_png(x, folder / f"img_{i:03d}.png")
    return folder
