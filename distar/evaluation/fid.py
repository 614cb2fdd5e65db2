"""FID and CLIP-FD of generated images against a folder of reference images, computed by torchmetrics.

    distar eval --prompts parti ... --fid-ref /data/coco30k --fid-weights /w/weights-inception-2015-12-05-6726825d.pth \
        --clip-fd ViT-B-32:openai

FID: torchmetrics' `FrechetInceptionDistance` (torch-fidelity's Inception-v3 port, 2048-d pool features,
images quantised to uint8 and resized to 299 inside the metric). `--fid-weights` is that Inception's weights
file; without it torch-fidelity downloads it from GitHub (a cluster with network). The file is opened with
`torch.load(weights_only=True)` first, so a pickle that carries code is refused before torch-fidelity reads it.
CLIP-FD: the same torchmetrics metric with an open_clip image encoder as the feature extractor (its
L2-normalised image embedding), any open_clip spec the clip_score reward takes.

Reference images are read once (RGB, their own size: the metric resizes); the reference statistics are
computed once and kept while each model's images replace the previous model's. The Frechet distance of a
few hundred images is biased upwards and only comparable at equal counts: papers use 10k-30k.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..progress import progress

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_reference_images(folder: str | Path, limit: int | None = None) -> list[torch.Tensor]:
    """Every image under `folder` (sorted, recursive) as float [3, H, W] in [0, 1]; the first `limit` only."""
    import numpy as np
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--fid-ref {str(folder)!r}: not a directory (expected a folder of reference images)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if len(files) < 2:
        raise UserError(f"--fid-ref {str(folder)!r}: found {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); "
                        f"a Frechet distance needs at least 2")
    out = []
    for p in files:
        with Image.open(p) as im:
            out.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0)
    return out


def _checked_inception_weights(path: str | None, tmp: Path) -> str | None:
    """The path torch-fidelity may read: the file after a weights_only load succeeded (a .safetensors file is
    converted to a plain state dict in `tmp`); None stays None (torch-fidelity downloads)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--fid-weights {path!r}: no such file (expected torch-fidelity's Inception-v3 weights, "
                        "weights-inception-2015-12-05-6726825d.pth, or the same as .safetensors)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
            torch.save(state, tmp / "inception.pth")
            return str(tmp / "inception.pth")
        torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means we will not hand the file on
        raise UserError(f"--fid-weights {path!r}: not a plain tensor file, refused without running it "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return str(p)


class OpenCLIPImageFeatures(nn.Module):
    """[B, 3, H, W] in [0, 1] -> L2-normalised open_clip image embeddings [B, D] (the CLIP-FD features)."""

    def __init__(self, spec: str):
        super().__init__()
        from ..rewards.clip_score import OpenCLIPEmbedder, load_open_clip

        try:
            model, tok, mean, std = load_open_clip(spec, arg="--clip-fd")
        except (ValueError, FileNotFoundError, OSError) as err:
            raise UserError(str(err).splitlines()[0]) from None
        self.embedder = OpenCLIPEmbedder(model, tok, mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder.image_features(images.float()).float()


def _batches(images: Sequence[torch.Tensor] | torch.Tensor, batch: int) -> Iterable[torch.Tensor]:
    """Stacked batches of same-size images (a reference folder may mix sizes)."""
    run: list[torch.Tensor] = []
    for x in images:
        if run and (x.shape != run[0].shape or len(run) == batch):
            yield torch.stack(run)
            run = []
        run.append(x)
    if run:
        yield torch.stack(run)


class FolderDistances:
    """FID (and CLIP-FD when a spec is given) of image sets against one reference folder's statistics."""

    def __init__(self, reference: list[torch.Tensor], inception_weights: str | None, clip_spec: str | None,
                 device: str | torch.device = "cpu", batch: int = 32):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.device, self.batch, self.n_ref = torch.device(device), batch, len(reference)
        with tempfile.TemporaryDirectory() as tmp:
            weights = _checked_inception_weights(inception_weights, Path(tmp))
            try:
                fid = FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                               feature_extractor_weights_path=weights)
            except (OSError, RuntimeError) as err:  # the download failed: no network, or no such release
                raise UserError(f"FID needs the Inception-v3 weights and they could not be loaded "
                                f"({str(err).splitlines()[0][:200]}); pass --fid-weights PATH") from None
        self.metrics = {"FID": fid}
        if clip_spec:
            self.metrics["CLIP-FD"] = FrechetInceptionDistance(
                feature=OpenCLIPImageFeatures(clip_spec), normalize=True, reset_real_features=False)
        for name, m in self.metrics.items():
            m.to(self.device)
            for x in progress(list(_batches(reference, batch)), desc=f"{name} reference", unit="batch"):
                m.update(x.to(self.device), real=True)

    def __call__(self, images: torch.Tensor, label: str = "") -> dict[str, float]:
        """{'FID': ..., 'CLIP-FD': ...} of images [N, 3, H, W] in [0, 1] against the reference."""
        if len(images) < 2:
            raise UserError(f"FID of {label or 'a model'}: {len(images)} image(s); a Frechet distance needs >= 2")
        if min(len(images), self.n_ref) < 2048:
            log.info("FID of %s from %d images vs %d reference images: biased upwards, compare only at equal "
                     "counts (papers use 10k-30k)", label or "a model", len(images), self.n_ref)
        out = {}
        for name, m in self.metrics.items():
            m.reset()  # the model's features only: reset_real_features=False keeps the reference's
            for x in progress(list(_batches(images, self.batch)), desc=f"{name} {label}", unit="batch"):
                m.update(x.to(self.device), real=False)
            out[name] = float(m.compute())
        return out
