"""FID and CLIP-FD against a reference folder (distar.evaluation.fid): torchmetrics' metric fed by our loading,
on tiny images with random-init Inception and open_clip weights from local files (no network)."""
from __future__ import annotations

import pickle

import pytest
import torch

from distar.errors import UserError
from distar.evaluation.fid import FolderDistances, load_reference_images

from . import tiny_sd
from .fid_fixtures import save_image_folder, save_random_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid_weights")
    return {"inception": save_random_inception(root / "inception.pth"),
            "clip": tiny_sd.save_open_clip_dir(root / "clip")}


def _images(seed: int, n: int = 6, size: int = 32, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.5 + 0.25  # flat colours with a little texture
    return (base + 0.1 * torch.rand(n, 3, size, size, generator=g) + shift).clamp(0, 1)


def test_fid_and_clip_fd_rank_a_shifted_set_farther_than_a_resample(weights, tmp_path):
    ref = load_reference_images(save_image_folder(tmp_path / "ref", _images(0)))
    assert len(ref) == 6 and ref[0].shape == (3, 32, 32) and 0 <= float(ref[0].min()) <= float(ref[0].max()) <= 1
    dist = FolderDistances(ref, str(weights["inception"]), str(weights["clip"]), batch=5)
    same = dist(torch.stack(ref), "same")            # the folder's own images, read back
    near = dist(_images(1), "resample")              # the same distribution, other draws
    far = dist(_images(1, shift=0.4), "shifted")      # brighter: another distribution
    assert set(same) == {"FID", "CLIP-FD"}
    for k in same:
        assert abs(same[k]) < 1e-3 * max(far[k], 1e-6), (k, same, far)   # rounding only
        assert 0 < near[k] < far[k], (k, near, far)
    # (three models in a row against one reference: its statistics survive each model's reset)


def test_reference_folder_of_mixed_sizes_and_bad_inputs(weights, tmp_path):
    save_image_folder(tmp_path / "mixed", _images(0, n=3, size=32))
    save_image_folder(tmp_path / "mixed" / "big", _images(2, n=3, size=48))
    ref = load_reference_images(tmp_path / "mixed")
    assert sorted({tuple(x.shape) for x in ref}) == [(3, 32, 32), (3, 48, 48)]
    FolderDistances(ref, str(weights["inception"]), None, batch=4)  # batches never mix sizes

    with pytest.raises(UserError, match=r"--fid-ref .*not a directory"):
        load_reference_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"--fid-ref .*found 0 image"):
        load_reference_images(tmp_path / "empty")
    with pytest.raises(UserError, match=r"--fid-weights .*no such file"):
        FolderDistances(ref, str(tmp_path / "missing.pth"), None)


class _Boom:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['DISTAR_FID_MARK'], 'w').write('ran')",))


def test_pickled_code_as_inception_weights_is_refused_not_run(weights, tmp_path, monkeypatch):
    mark = tmp_path / "ran.txt"
    monkeypatch.setenv("DISTAR_FID_MARK", str(mark))
    bad = tmp_path / "weights-inception.pth"
    bad.write_bytes(pickle.dumps({"Conv2d_1a_3x3.conv.weight": _Boom()}))
    ref = load_reference_images(save_image_folder(tmp_path / "ref", _images(0, n=3)))
    with pytest.raises(UserError, match=r"--fid-weights .*refused without running it"):
        FolderDistances(ref, str(bad), None)
    assert not mark.exists()


def test_safetensors_inception_weights_give_the_same_fid(weights, tmp_path):
    from safetensors.torch import save_file

    st = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in torch.load(weights["inception"], weights_only=True).items()}, str(st))
    ref = load_reference_images(save_image_folder(tmp_path / "ref", _images(0, n=2)))
    x = _images(3, n=2)
    assert FolderDistances(ref, str(st), None)(x) == FolderDistances(ref, str(weights["inception"]), None)(x)
