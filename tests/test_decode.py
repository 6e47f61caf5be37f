"""The JPEG fast path (torchvision's decoder + uint8 tensor transforms) against the PIL path:
same pixels, same bad-data accounting, same augmentation statistics."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from supersub.data.dataset import TensorTrainTransform, build_transforms, normalise_uint8
from supersub.data.images import (
    CONVERTED_CMYK,
    CONVERTED_GRAYSCALE,
    FORMAT_MISMATCH,
    SKIPPED_EMPTY,
    SKIPPED_TRUNCATED,
    decode_image,
    decode_tensor,
    fast_jpeg_size,
    jpeg_header,
    pil_to_uint8,
)

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample-200"


def _photo(w: int = 120, h: int = 90, seed: int = 0) -> np.ndarray:
    """A smooth image with some texture (JPEG-friendly, not constant)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _pil_only(data: bytes):
    """PIL's own decode, as the PIL path does it."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("kw", [{}, {"progressive": True}, {"subsampling": 0}, {"quality": 30}])
def test_fast_path_decodes_jpegs_as_pil_does(kw) -> None:
    data = _encode(Image.fromarray(_photo(), "RGB"), **kw)
    assert jpeg_header(data) == (120, 90, 3, 8) and fast_jpeg_size(data, "a.JPEG") == (120, 90)
    got = decode_tensor(data, "a.JPEG")
    assert got.fast and got.events == () and got.tensor.dtype == torch.uint8 and got.tensor.shape == (3, 90, 120)
    assert np.array_equal(got.tensor.permute(1, 2, 0).numpy(), _pil_only(data))
    # decode_image (PIL images, used by evaluation, builds and serving) takes the same fast path.
    assert np.array_equal(np.asarray(decode_image(data, "a.JPEG").image), _pil_only(data))


def test_everything_else_takes_the_pil_path_with_its_accounting() -> None:
    rgb = Image.fromarray(_photo(), "RGB")
    jpeg = _encode(rgb)
    cases = {
        "gray.JPEG": (_encode(rgb.convert("L")), (CONVERTED_GRAYSCALE,)),
        "cmyk.JPEG": (_encode(rgb.convert("CMYK")), (CONVERTED_CMYK,)),
        "png.JPEG": (_encode(rgb, "PNG"), (FORMAT_MISMATCH,)),
        "jpeg.png": (jpeg, (FORMAT_MISMATCH,)),
        "cut.JPEG": (jpeg[: len(jpeg) // 2], (SKIPPED_TRUNCATED,)),
        "tail.JPEG": (jpeg + b"trailing bytes", ()),
        "empty.JPEG": (b"", (SKIPPED_EMPTY,)),
    }
    for name, (data, events) in cases.items():
        assert fast_jpeg_size(data, name) is None, name
        got, ref = decode_tensor(data, name), decode_image(data, name)
        assert not got.fast and got.events == ref.events == events, name
        if ref.image is None:
            assert got.tensor is None
        else:
            assert torch.equal(got.tensor, pil_to_uint8(ref.image)), name


def test_header_walk_refuses_non_jpegs_and_finds_sof_after_segments() -> None:
    assert jpeg_header(b"") is None and jpeg_header(b"\x89PNG\r\n\x1a\n....") is None
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # a long APP1 segment before the frame header
    data = _encode(Image.fromarray(_photo(300, 200), "RGB"), exif=exif.tobytes())
    assert jpeg_header(data) == (300, 200, 3, 8)


def _ramp(w: int = 500, h: int = 375) -> np.ndarray:
    """R encodes the column, G the row: a crop's box can be read back from its pixels."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255.0 / (w - 1), yy * 255.0 / (h - 1), np.zeros_like(xx, dtype=float)], -1).round().astype(np.uint8)


def _boxes(outputs: list[np.ndarray], w: int, h: int) -> np.ndarray:
    """``[N, 3]``: crop area / image area, crop aspect (w/h), flipped — read from the pixels."""
    rows = []
    for o in outputs:  # o: float [S, S, 2] in input pixel units, from the R and G channels
        S = o.shape[0]
        xl, xr = o[:, 0, 0].mean() * (w - 1) / 255, o[:, -1, 0].mean() * (w - 1) / 255
        yt, yb = o[0, :, 1].mean() * (h - 1) / 255, o[-1, :, 1].mean() * (h - 1) / 255
        cw, ch = abs(xr - xl) * S / (S - 1), abs(yb - yt) * S / (S - 1)
        rows.append((cw * ch / (w * h), cw / max(ch, 1e-6), float(xl > xr)))
    return np.array(rows)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), grid, "right") / a.size
                        - np.searchsorted(np.sort(b), grid, "right") / b.size).max())


def test_tensor_augmentation_keeps_crop_scale_aspect_and_flip_statistics() -> None:
    """RandomResizedCrop(224) + flip: PIL path (today's transforms, normalisation undone) against
    the uint8 tensor path, 1,000 crops each of a 500×375 image, independent seeds. KS critical
    value at α = 0.001 for 1,000 + 1,000 samples: 0.087."""
    w, h, n, size = 500, 375, 1000, 224
    ramp = _ramp(w, h)
    pil, tensor = Image.fromarray(ramp, "RGB"), torch.from_numpy(ramp).permute(2, 0, 1)
    old, new = build_transforms(size, train=True), TensorTrainTransform(size)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.manual_seed(1)
    a = _boxes([((old(pil) * std + mean) * 255).permute(1, 2, 0)[..., :2].numpy() for _ in range(n)], w, h)
    torch.manual_seed(2)
    b = _boxes([new(tensor).permute(1, 2, 0)[..., :2].float().numpy() for _ in range(n)], w, h)
    assert _ks(a[:, 0], b[:, 0]) < 0.087 and _ks(np.log(a[:, 1]), np.log(b[:, 1])) < 0.087
    assert abs(a[:, 2].mean() - 0.5) < 0.06 and abs(b[:, 2].mean() - 0.5) < 0.06
    # The readout sees a real change: crops drawn from scale (0.25, 1) instead of (0.08, 1).
    other = TensorTrainTransform(size)
    other.scale = (0.25, 1.0)
    c = _boxes([other(tensor).permute(1, 2, 0)[..., :2].float().numpy() for _ in range(n)], w, h)
    assert _ks(a[:, 0], c[:, 0]) > 0.15
    # Same seed, same draws: the same box from both paths (the crop is chosen on the full geometry).
    torch.manual_seed(3)
    a = _boxes([((old(pil) * std + mean) * 255).permute(1, 2, 0)[..., :2].numpy() for _ in range(100)], w, h)
    torch.manual_seed(3)
    b = _boxes([new(tensor).permute(1, 2, 0)[..., :2].float().numpy() for _ in range(100)], w, h)
    assert np.allclose(a[:, 0], b[:, 0], rtol=0.05, atol=0.002) and np.array_equal(a[:, 2], b[:, 2])


def test_the_channels_last_resize_gives_transforms_v2_pixels() -> None:
    """TensorTrainTransform resizes the crop channels-last (torch's vectorised uint8 kernel): the
    same pixels as ``transforms.v2``'s ``resized_crop`` for the same draws, whether the input is a
    view of HWC pixels (the decoders') or a contiguous ``[3, H, W]``."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as F2

    hwc = torch.from_numpy(_photo(500, 375, seed=4)).permute(2, 0, 1)
    augment = TensorTrainTransform(224)
    for x in (hwc, hwc.contiguous()):
        for seed in range(20):
            torch.manual_seed(seed)
            top, left, h, w = RandomResizedCrop.get_params(x, list(augment.scale), list(augment.ratio))
            want = F2.resized_crop(x, top, left, h, w, [224, 224], antialias=True)
            flip = bool(torch.rand(1) < 0.5)
            torch.manual_seed(seed)
            got = augment(x)
            assert got.dtype == torch.uint8 and got.shape == (3, 224, 224)
            assert torch.equal(got, want.flip(-1) if flip else want)


def test_small_images_and_normalisation() -> None:
    x = torch.from_numpy(_photo(40, 30)).permute(2, 0, 1)
    out = TensorTrainTransform(32)(x)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    batch = torch.stack([out, out])
    ref = build_transforms(32, train=False).transforms[-1](batch[0].float() / 255)  # Normalize
    assert torch.allclose(normalise_uint8(batch)[0], ref, atol=1e-5)


@pytest.mark.realdata
def test_fast_path_is_bit_exact_on_real_imagenet_jpegs() -> None:
    if not SAMPLE.is_dir():
        pytest.skip("../shared/data/imagenet-sample-200 is absent")
    import pyarrow.parquet as pq

    table = pq.read_table(next(SAMPLE.glob("*.parquet")), columns=["image"])
    fast = 0
    for row in table.column("image").to_pylist():
        data, name = row["bytes"], row["path"]
        got = decode_tensor(data, name)
        fast += got.fast
        assert np.array_equal(got.tensor.permute(1, 2, 0).numpy(), _pil_only(data)), name
    assert fast >= 190  # 197 of the 200 are RGB JPEGs; the 3 grayscale ones take the PIL path


def _folder_manifest(tmp_path: Path, size: int = 160) -> Path:
    from supersub.data import build_manifest
    from supersub.hierarchy.core import Hierarchy, Subclass, Superclass

    for ci, wnid in enumerate(["n01", "n02", "n03"]):
        d = tmp_path / "src" / "train" / wnid
        d.mkdir(parents=True)
        for i in range(8):
            img = Image.fromarray(_photo(size, size * 3 // 4, seed=10 * ci + i), "RGB")
            (d / f"{wnid}_{i}.JPEG").write_bytes(_encode(img.convert("L") if i == 0 else img))
    h = Hierarchy("t", (Superclass("a", "a", (Subclass("n01", "n01"), Subclass("n02", "n02"))),
                        Superclass("b", "b", (Subclass("n03", "n03"),))))
    build_manifest(str(tmp_path / "src"), h, tmp_path / "m", val_fraction=0.25, test_fraction=0.0, num_workers=0,
                   progress=False)
    return tmp_path / "m"


def test_dataset_loader_trains_on_uint8_and_normalises_on_the_device(tmp_path: Path) -> None:
    from supersub.data import load_manifest
    from supersub.data.loaders import LoaderSpec, make_loader

    manifest = load_manifest(_folder_manifest(tmp_path))
    train = make_loader(manifest, LoaderSpec("train", "fine", True, 4), image_size=96, mode="dataset",
                        device=torch.device("cpu"), num_workers=0)
    assert train.dataset.decoder == "tensor"
    x, y = next(iter(train))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 96, 96) and y.shape == (4,)
    assert -2.2 < float(x.min()) and float(x.max()) < 2.7  # normalised uint8 range
    val = make_loader(manifest, LoaderSpec("val", "fine", False, 4), image_size=96, mode="dataset",
                      device=torch.device("cpu"), num_workers=0)
    assert val.dataset.decoder == "pil" and next(iter(val))[0].shape[1:] == (3, 96, 96)


def test_ray_data_decode_batch_takes_the_tensor_path(tmp_path: Path) -> None:
    from jobs.ray_data import decode_batch
    from supersub.data import load_manifest

    manifest = load_manifest(_folder_manifest(tmp_path))
    rows = manifest.indices("train")
    batch = {"row": np.arange(rows.size), "uri": np.array([manifest.uris[i] for i in rows])}
    for train in (True, False):
        out = decode_batch(batch, manifest.meta, 96, train)
        assert out["image"].shape == (rows.size, 96, 96, 3) and out["image"].dtype == np.uint8


# ------------------------------------------------------------------ data.decode=cuda
def test_device_augmentation_runs_on_a_cpu_with_the_same_crop_statistics() -> None:
    from supersub.data.gpu import augment_batch

    w, h, n, size = 500, 375, 400, 224
    ramp = torch.from_numpy(_ramp(w, h)).permute(2, 0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.manual_seed(4)
    x = augment_batch([ramp] * n, size, train=True)
    assert x.shape == (n, 3, size, size) and x.dtype == torch.float32
    a = _boxes([((xi * std + mean) * 255).permute(1, 2, 0)[..., :2].numpy() for xi in x], w, h)
    torch.manual_seed(5)
    cpu = TensorTrainTransform(size)
    b = _boxes([cpu(ramp).permute(1, 2, 0)[..., :2].float().numpy() for _ in range(n)], w, h)
    # KS critical value at α = 0.001 for 400 + 400 samples: 0.138.
    assert _ks(a[:, 0], b[:, 0]) < 0.138 and _ks(np.log(a[:, 1]), np.log(b[:, 1])) < 0.138
    assert abs(a[:, 2].mean() - 0.5) < 0.1
    ev = augment_batch([ramp, ramp[:, :300, :200]], size, train=False)
    assert ev.shape == (2, 3, size, size) and torch.equal(ev[0], augment_batch([ramp], size, train=False)[0])
    small = augment_batch([ramp], 32, train=True)
    assert small.shape == (1, 3, 32, 32)


def test_dataset_loader_with_device_decode_hands_over_bytes(tmp_path: Path) -> None:
    from supersub.data import load_manifest
    from supersub.data.gpu import BytesRows, read_item
    from supersub.data.loaders import LoaderSpec, make_loader

    manifest = load_manifest(_folder_manifest(tmp_path))
    loader = make_loader(manifest, LoaderSpec("train", "fine", True, 4), image_size=96, mode="dataset",
                         device=torch.device("cpu"), num_workers=0, decode="cuda")
    assert loader.on_device
    rows = BytesRows(loader.dataset, np.arange(len(loader.dataset)), loader.dataset.targets)
    kinds = {rows[i][0][0] for i in range(len(rows))}
    assert kinds <= {"jpeg", "pixels"} and "jpeg" in kinds  # the grayscale images come decoded
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 96, 96) and x.dtype == torch.float32 and y.shape == (4,)
    auto = make_loader(manifest, LoaderSpec("train", "fine", True, 4), image_size=96, mode="dataset",
                       device=torch.device("cpu"), num_workers=0)
    assert not auto.on_device  # auto: on the device only when it is a GPU
    with pytest.raises(Exception, match="bad|truncated|unreadable"):
        read_item(b"\xff\xd8\xff\xe0 not a jpeg", "x.JPEG")


@pytest.mark.gpu
def test_nvjpeg_batch_decode_matches_the_cpu_decoder() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from supersub.data.gpu import augment_batch, decode_on_device, read_item

    datas = [_encode(Image.fromarray(_photo(320, 240, seed=s), "RGB")) for s in range(8)]
    datas.append(_encode(Image.fromarray(_photo(320, 240, seed=9), "RGB").convert("L")))  # decoded by PIL
    items = [read_item(d, "x.JPEG") for d in datas]
    assert [k for k, _ in items].count("pixels") == 1
    gpu = decode_on_device(items, torch.device("cuda"))
    for d, g in zip(datas, gpu):
        ref = decode_tensor(d, "x.JPEG").tensor
        assert g.is_cuda and g.shape == ref.shape
        assert (g.cpu().float() - ref.float()).abs().mean() < 2.0  # nvJPEG's IDCT is not libjpeg's bit for bit
    x = augment_batch(gpu, 224, train=True)
    assert x.is_cuda and x.shape == (9, 3, 224, 224) and torch.isfinite(x).all()
