"""FID and CLIP-FD against a reference folder (distar.evaluation.fid): torchmetrics' metric fed by our loading,
on tiny images with random-init Inception and open_clip weights from local files (no network)."""
from __future__ import annotations

import pickle

import pytest
import torch

from distar.errors import UserError
from distar.evaluation.fid import FolderDistances, reference_files
from distar.images import read_rgb_u8 as read_image

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
    files = reference_files(save_image_folder(tmp_path / "ref", _images(0)))
    assert len(files) == 6 and read_image(files[0]).dtype == torch.uint8 and read_image(files[0]).shape == (3, 32, 32)
    dist = FolderDistances(files, str(weights["inception"]), str(weights["clip"]), batch=4)
    same = dist(torch.stack([read_image(p) for p in files]).float() / 255, "same")  # the folder's own images
    near = dist(_images(1), "resample")              # the same distribution, other draws
    far = dist(_images(1, shift=0.4), "shifted")      # brighter: another distribution
    assert set(same) == {"FID", "CLIP-FD"}
    for k in same:
        assert abs(same[k]) < 1e-3 * max(far[k], 1e-6), (k, same, far)   # rounding only
        assert 0 < near[k] < far[k], (k, near, far)
    # each model is measured alone against the kept reference: the same images again give the same numbers
    assert dist(_images(1), "resample again") == near


def test_reference_folder_of_mixed_sizes_limit_and_bad_inputs(weights, tmp_path):
    save_image_folder(tmp_path / "mixed", _images(0, n=3, size=32))
    save_image_folder(tmp_path / "mixed" / "big", _images(2, n=3, size=48))
    files = reference_files(tmp_path / "mixed")
    assert sorted({tuple(read_image(p).shape) for p in files}) == [(3, 32, 32), (3, 48, 48)]
    assert reference_files(tmp_path / "mixed", limit=2) == files[:2]
    FolderDistances(files, str(weights["inception"]), None, batch=4)  # batches never mix sizes

    with pytest.raises(UserError, match=r"--fid-ref .*not a directory"):
        reference_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"--fid-ref .*found 0 image"):
        reference_files(tmp_path / "empty")
    with pytest.raises(UserError, match=r"--fid-limit 1"):
        reference_files(tmp_path / "mixed", limit=1)
    with pytest.raises(UserError, match=r"--fid-weights .*no such file"):
        FolderDistances(files, str(tmp_path / "missing.pth"), None)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"--fid-weights .*not torch-fidelity's Inception-v3 state dict"):
        FolderDistances(files, str(tmp_path / "other.pth"), None)
    with pytest.raises(UserError, match=r"--clip-fd"):
        FolderDistances(files, str(weights["inception"]), str(tmp_path / "empty"))


class _Boom:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['DISTAR_FID_MARK'], 'w').write('ran')",))


def test_pickled_code_as_inception_weights_is_refused_not_run(weights, tmp_path, monkeypatch):
    mark = tmp_path / "ran.txt"
    monkeypatch.setenv("DISTAR_FID_MARK", str(mark))
    bad = tmp_path / "weights-inception.pth"
    bad.write_bytes(pickle.dumps({"Conv2d_1a_3x3.conv.weight": _Boom()}))
    files = reference_files(save_image_folder(tmp_path / "ref", _images(0, n=3)))
    with pytest.raises(UserError, match=r"--fid-weights .*refused without running it"):
        FolderDistances(files, str(bad), None)
    assert not mark.exists()


def test_safetensors_inception_weights_give_the_same_fid(weights, tmp_path):
    from safetensors.torch import save_file

    st = tmp_path / "inception.SafeTensors"
    save_file({k: v.contiguous() for k, v in torch.load(weights["inception"], weights_only=True).items()}, str(st))
    files = reference_files(save_image_folder(tmp_path / "ref", _images(0, n=2)))
    x = _images(3, n=2)
    assert FolderDistances(files, str(st), None)(x) == FolderDistances(files, str(weights["inception"]), None)(x)
