"""FID and CLIP-FD of generated images against a folder of reference images, computed by torchmetrics.

    distar eval --prompts parti ... --fid-ref /data/coco30k --fid-weights /w/weights-inception-2015-12-05-6726825d.pth \
        --clip-fd ViT-B-32:openai

FID: torchmetrics' `FrechetInceptionDistance` (torch-fidelity's Inception-v3 port, 2048-d pool features, uint8
images resized to 299 inside the metric). `--fid-weights` is that Inception's weights file; without it
torch-fidelity downloads it from GitHub (a cluster with network). The file is loaded with
`torch.load(weights_only=True)` and re-saved as plain tensors, and torch-fidelity reads that copy: a pickle
that carries code is refused and never reaches its `weights_only=False` load. CLIP-FD: the same torchmetrics
metric with an open_clip image encoder as the feature extractor (its L2-normalised image embedding), any open_clip
spec the clip_score reward takes.

Reference images are read lazily, one batch of same-size images at a time (RGB, their own size: the metric
resizes), so a 30k-image folder never sits in memory; their statistics are computed once and kept while each
model's images replace the previous model's. The Frechet distance of a few hundred images is biased upwards
and only comparable at equal counts: papers use 10k-30k.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..images import read_rgb_u8, to_uint8
from ..progress import progress

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def reference_files(folder: str | Path, limit: int | None = None) -> list[Path]:
    """The image files under `folder` (sorted, recursive), the first `limit` only; at least 2."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--fid-ref {str(folder)!r}: not a directory (expected a folder of reference images)")
    if limit is not None and limit < 2:
        raise UserError(f"--fid-limit {limit}: a Frechet distance needs at least 2 reference images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if len(files) < 2:
        raise UserError(f"--fid-ref {str(folder)!r}: found {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); "
                        f"a Frechet distance needs at least 2")
    return files


def _checked_inception_weights(path: str | None, tmp: Path) -> str | None:
    """A copy in `tmp` of the weights at `path`, loaded without unpickling code (weights_only=True, or
    safetensors) and re-saved as plain tensors: the file torch-fidelity then reads. None stays None."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--fid-weights {path!r}: no such file (expected torch-fidelity's Inception-v3 weights, "
                        "weights-inception-2015-12-05-6726825d.pth, or the same as .safetensors)")
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means we will not hand the file on
        raise UserError(f"--fid-weights {path!r}: not a plain tensor file, refused without running it "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--fid-weights {path!r}: expected a state dict (names -> tensors)")
    torch.save(state, tmp / "inception.pth")
    return str(tmp / "inception.pth")


class OpenCLIPImageFeatures(nn.Module):
    """uint8 [B, 3, H, W] -> L2-normalised open_clip image embeddings [B, D] (the CLIP-FD features)."""

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
        return self.embedder.image_features(images.float() / 255.0).float()


def _batches(images: Iterable[torch.Tensor], batch: int) -> Iterator[torch.Tensor]:
    """Stacked batches of same-size images, consumed lazily (a reference folder may mix sizes)."""
    run: list[torch.Tensor] = []
    for x in images:
        if run and (x.shape != run[0].shape or len(run) == batch):
            yield torch.stack(run)
            run = []
        run.append(x)
    if run:
        yield torch.stack(run)


def _inception_fid(weights: str | None):
    from torchmetrics.image.fid import FrechetInceptionDistance

    with tempfile.TemporaryDirectory() as tmp:
        checked = _checked_inception_weights(weights, Path(tmp))
        try:
            return FrechetInceptionDistance(feature=2048, normalize=False, reset_real_features=False,
                                            feature_extractor_weights_path=checked)
        except (OSError, RuntimeError) as err:
            reason = str(err).splitlines()[0][:200]
            if weights is not None:  # the file was read: it is not this network's weights
                raise UserError(f"--fid-weights {weights!r}: not torch-fidelity's Inception-v3 state dict "
                                f"({reason})") from None
            raise UserError(f"FID needs the Inception-v3 weights and they could not be downloaded ({reason}); "
                            "pass --fid-weights PATH") from None


class FolderDistances:
    """FID (and CLIP-FD when a spec is given) of image sets against one reference folder's statistics.

    Built before anything is generated, so a bad folder, weights file or spec fails at once."""

    def __init__(self, files: Sequence[Path], inception_weights: str | None, clip_spec: str | None,
                 device: str | torch.device = "cpu", batch: int = 32):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.device, self.batch, self.n_ref = torch.device(device), batch, len(files)
        self.metrics = {"FID": _inception_fid(inception_weights)}
        if clip_spec:
            self.metrics["CLIP-FD"] = FrechetInceptionDistance(
                feature=OpenCLIPImageFeatures(clip_spec), normalize=False, reset_real_features=False)
        for m in self.metrics.values():
            m.to(self.device)
        for x in progress(_batches((read_rgb_u8(p) for p in files), batch), desc="reference features",
                          unit="batch", total=-(-len(files) // batch)):  # exact when the sizes agree
            for m in self.metrics.values():
                m.update(x.to(self.device), real=True)

    def __call__(self, images: torch.Tensor, label: str = "") -> dict[str, float]:
        """{'FID': ..., 'CLIP-FD': ...} of images [N, 3, H, W] in [0, 1] against the reference."""
        if len(images) < 2:
            raise UserError(f"FID of {label or 'a model'}: {len(images)} image(s); a Frechet distance needs >= 2")
        if min(len(images), self.n_ref) < 2048:
            log.info("FID of %s from %d images vs %d reference images: biased upwards, compare only at equal "
                     "counts (papers use 10k-30k)", label or "a model", len(images), self.n_ref)
        for m in self.metrics.values():
            m.reset()  # the model's features only: reset_real_features=False keeps the reference's
        for x in progress(_batches(to_uint8(images), self.batch), desc=f"FID {label}", unit="batch",
                          total=-(-len(images) // self.batch)):
            for m in self.metrics.values():
                m.update(x.to(self.device), real=False)
        return {name: float(m.compute()) for name, m in self.metrics.items()}
