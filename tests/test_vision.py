"""Vision tasks: CIFAR-style models, ViT, the CIFAR-10 JPEG loader, augmentation, task configs."""

from __future__ import annotations

import io
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pisa_bench.config import compose_config
from pisa_bench.data.images import CIFAR10_FILES, balanced_subset, decode_jpeg_npz, load_images
from pisa_bench.models import build_model
from pisa_bench.models.cifar import VGG, VGG11, DenseNet, ResNet
from pisa_bench.models.vit import ViT
from pisa_bench.schedules import lr_multiplier
from pisa_bench.tasks import DatasetMissing, build_task
from pisa_bench.tasks.vision import augment, epoch_generator

VISION_TASKS = ["vit_cifar10", "vgg11_cifar10", "resnet34_cifar10", "densenet121_cifar10",
                "resnet18_imagenet"]
CIFAR_TASKS = VISION_TASKS[:4]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small convolutions on a loaded 2-core machine are far faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --- parameter counts, computed from the architectures' definitions ---------------------------
def conv(cin: int, cout: int, k: int, bias: bool) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # weight and bias (running statistics are buffers)


def vgg_count(layers: tuple, hidden: int, classes: int, batch_norm: bool) -> int:
    total, c = 0, 3
    for v in layers:
        if v != "M":
            total += conv(c, v, 3, True) + (bn(v) if batch_norm else 0)
            c = v
    return total + (c * hidden + hidden) + (hidden * hidden + hidden) + (hidden * classes + classes)


def resnet_count(blocks: tuple, classes: int) -> int:
    widths = (64, 128, 256, 512)
    total, c = conv(3, 64, 3, False) + bn(64), 64
    for i, (n, w) in enumerate(zip(blocks, widths)):
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            total += conv(c, w, 3, False) + bn(w) + conv(w, w, 3, False) + bn(w)
            if stride != 1 or c != w:
                total += conv(c, w, 1, False) + bn(w)
            c = w
    return total + c * classes + classes


def densenet_count(blocks: tuple, k: int, classes: int) -> int:
    c = 2 * k
    total = conv(3, c, 3, False)
    for i, n in enumerate(blocks):
        for _ in range(n):
            total += bn(c) + conv(c, 4 * k, 1, False) + bn(4 * k) + conv(4 * k, k, 3, False)
            c += k
        if i < len(blocks) - 1:
            out = c // 2
            total += bn(c) + conv(c, out, 1, False)
            c = out
    return total + bn(c) + c * classes + classes


def test_param_counts_of_the_paper_architectures() -> None:
    # VGG-11 as in the AdaBelief benchmark code the paper uses: no batch norm, classifier
    # 512-512-512-10 with dropout. Its conv stack has 9,220,480 weights; with batch norm and a
    # single fc(512, 10) instead (kuangliu/pytorch-cifar's VGG('VGG11')) it is the often quoted
    # 9.23M (9,231,114); with the 3-layer classifier it is 9,750,922.
    assert vgg_count(VGG11, 512, 10, False) == 9_750_922
    assert vgg_count(VGG11, 512, 10, False) - 530_442 + 5_504 + 5_130 == 9_231_114
    assert n_params(VGG()) == 9_750_922
    assert n_params(VGG(batch_norm=True)) == vgg_count(VGG11, 512, 10, True)
    # ResNet-34 (CIFAR variant: 3x3 stem, no max-pool): 21.28M, the known value (21,282,122).
    assert resnet_count((3, 4, 6, 3), 10) == 21_282_122
    assert n_params(ResNet()) == 21_282_122
    # DenseNet-121 (CIFAR variant, growth 32, compression 0.5): 6.96M, the known value (6,956,298).
    assert densenet_count((6, 12, 24, 16), 32, 10) == 6_956_298
    assert n_params(DenseNet()) == 6_956_298
    # the scaled-down variants follow the same formulas
    assert n_params(ResNet(blocks=(1, 1, 1, 1))) == resnet_count((1, 1, 1, 1), 10)
    assert n_params(DenseNet(blocks=(2, 4, 6, 4), growth=8)) == densenet_count((2, 4, 6, 4), 8, 10)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_scaled_models_forward_shapes(size: int) -> None:
    x = torch.randn(3, 3, size, size)
    layers = [8, "M", 16, "M"]
    models = [
        VGG(image_size=size, layers=layers, width=0.5, hidden=16, num_classes=7),
        ResNet(blocks=(1, 1, 1, 1), width=0.0625, num_classes=7),
        DenseNet(image_size=size, blocks=(1, 1, 1, 1), growth=4, num_classes=7),
        ViT(image_size=size, patch_size=4, hidden=16, depth=1, heads=2, mlp=32, num_classes=7),
    ]
    for m in models:
        m.train()
        assert m(x).shape == (3, 7), type(m).__name__
        m.eval()
        with torch.no_grad():
            assert m(x).shape == (3, 7), type(m).__name__


def test_output_layer_is_named_classifier() -> None:
    """Routing (Muon / NSISA) sends ``classifier`` to the companion; VGG's fc layers are hidden."""
    from pisa_bench.tasks.imagenet import Headed

    for m in (VGG(width=0.125), ResNet(blocks=(1, 1, 1, 1), width=0.125),
              DenseNet(blocks=(1, 1, 1, 1), growth=4)):
        params = dict(m.named_parameters())
        assert params["classifier.weight"].shape[0] == 10, type(m).__name__
        assert not any(n.startswith("linear") for n in params)
    vgg_matrices = [n for n, p in VGG(width=0.125).named_parameters() if p.ndim == 2]
    assert vgg_matrices == ["fc.1.weight", "fc.4.weight", "classifier.weight"]

    body = torch.nn.Sequential()
    body.add_module("conv", torch.nn.Conv2d(3, 4, 3))
    body.add_module("pool", torch.nn.Flatten())
    body.add_module("fc", torch.nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8)
    y = body(x)
    headed = Headed(body, "fc")
    assert torch.equal(headed(x), y)
    assert "classifier.weight" in dict(headed.named_parameters())
    assert n_params(headed) == 3 * 4 * 9 + 4 + 144 * 5 + 5


def test_full_size_models_forward_on_cifar_images() -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for m in (VGG(), ResNet(), DenseNet()):
            m.eval()
            assert m(x).shape == (2, 10)


def test_model_errors() -> None:
    with pytest.raises(ValueError, match="too small"):
        VGG(image_size=16)  # five max-pools need >= 32 pixels
    with pytest.raises(ValueError, match="multiple of patch size"):
        ViT(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="not an importable model class"):
        build_model({"_target_": "pisa_bench.models.cifar.VGGDoesNotExist"})


def test_vit_is_a_fresh_transformers_vit() -> None:
    from transformers import ViTForImageClassification

    m = build_model({"_target_": "pisa_bench.models.vit.ViT", "patch_size": 4, "hidden": 32,
                     "depth": 2, "heads": 4, "mlp": 64}, in_channels=3, num_classes=10,
                    image_size=32)
    assert isinstance(m.net, ViTForImageClassification)
    assert m.config.image_size == 32 and m.config.patch_size == 4 and m.config.num_labels == 10
    assert m.net.vit.embeddings.position_embeddings.shape == (1, 64 + 1, 32)  # 8x8 patches + CLS
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    m2 = ViT(image_size=32, patch_size=4, hidden=32, depth=2, heads=4, mlp=64)
    # randomly initialised (no pretrained weights): two builds differ
    assert not torch.equal(m.net.vit.embeddings.cls_token, m2.net.vit.embeddings.cls_token)


# --- CIFAR-10 JPEG loader ----------------------------------------------------------------------
def write_jpeg_npz(path: Path, colours: list[tuple[int, int, int]], labels: list[int]) -> None:
    """A .npz in the layout of the real files: one solid-colour 32x32 JPEG per image."""
    from PIL import Image

    blobs = []
    for c in colours:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), c).save(buf, format="JPEG", quality=75)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    names = np.array(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                      "ship", "truck"], dtype="<U10")
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets,
             labels=np.array(labels, np.uint8), class_index=np.arange(len(labels), dtype=np.int32),
             class_names=names)


def test_cifar10_loader_on_a_fixture(tmp_path: Path) -> None:
    d = tmp_path / "cifar10-jpeg"
    d.mkdir()
    train_labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 9, 9, 9]  # sorted by label, as the real file
    train_colours = [(20 * y + 10, 200 - 15 * y, 7 * i) for i, y in enumerate(train_labels)]
    write_jpeg_npz(d / CIFAR10_FILES[0], train_colours, train_labels)
    write_jpeg_npz(d / CIFAR10_FILES[1], [(255, 0, 0), (0, 0, 255)], [3, 5])

    data = load_images(OmegaConf.create({"name": "cifar10"}), tmp_path)
    assert data.train_x.shape == (12, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (2, 3, 32, 32)
    assert data.train_y.dtype == torch.int64
    assert data.train_y.tolist() == train_labels and data.test_y.tolist() == [3, 5]
    assert data.num_classes == 10 and len(data.mean) == len(data.std) == 3
    # pixels survive the JPEG round trip (solid colours: within a few levels), channel-first
    got = data.train_x[:, :, 16, 16].int()
    assert (got - torch.tensor(train_colours)).abs().max() <= 4
    assert data.test_x[0, 0].float().mean() > 240 and data.test_x[0, 2].float().mean() < 15

    # class-balanced subset of 9 from 4 classes: 2 each, the remaining one to the lowest label
    sub = load_images(OmegaConf.create({"name": "cifar10", "n_train": 9, "n_test": 1}), tmp_path)
    assert sorted(sub.train_y.tolist()) == [0, 0, 0, 1, 1, 2, 2, 9, 9]
    assert torch.equal(sub.train_x[0], data.train_x[0])  # the first images of each class
    assert sub.test_y.tolist() == [3]
    assert "subset" in sub.note


def test_cifar10_loader_caches_decoded_arrays(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    write_jpeg_npz(path, [(1, 2, 3), (4, 5, 6)], [0, 1])
    a = decode_jpeg_npz(path)
    assert decode_jpeg_npz(path)[0] is a[0]
    write_jpeg_npz(path, [(200, 2, 3), (4, 5, 6), (7, 8, 9)], [0, 1, 1])  # file changed
    b = decode_jpeg_npz(path)
    assert b[0].shape[0] == 3


def test_cifar10_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissing) as e:
        load_images(OmegaConf.create({"name": "cifar10"}), tmp_path)
    msg = str(e.value)
    for f in CIFAR10_FILES:
        assert str(tmp_path / "cifar10-jpeg" / f) in msg
    # one file present: the message still names the directory and the files expected
    (tmp_path / "cifar10-jpeg").mkdir()
    write_jpeg_npz(tmp_path / "cifar10-jpeg" / CIFAR10_FILES[0], [(0, 0, 0)], [0])
    with pytest.raises(DatasetMissing, match=CIFAR10_FILES[1]):
        load_images(OmegaConf.create({"name": "cifar10"}), tmp_path)


def test_balanced_subset() -> None:
    labels = np.repeat(np.arange(4), [5, 3, 6, 2])
    idx = balanced_subset(labels, 9)
    assert np.bincount(labels[idx], minlength=4).tolist() == [3, 2, 2, 2]
    assert (np.diff(idx) > 0).all()
    assert balanced_subset(labels, None).tolist() == list(range(16))
    assert balanced_subset(labels, 100).tolist() == list(range(16))
    # every class gets its first rows (file order)
    assert set(idx[labels[idx] == 0].tolist()) == {0, 1, 2}


REAL_DIR = os.environ.get("PISA_DATA_DIR")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DIR or not (Path(REAL_DIR) / "cifar10-jpeg").is_dir(),
                    reason="real CIFAR-10 JPEG data not found (set PISA_DATA_DIR)")
def test_real_cifar10() -> None:
    data = load_images(OmegaConf.create({"name": "cifar10"}), Path(str(REAL_DIR)))
    assert data.train_x.shape == (50000, 3, 32, 32) and data.test_x.shape == (10000, 3, 32, 32)
    assert data.train_y.bincount().tolist() == [5000] * 10
    assert data.test_y.bincount().tolist() == [1000] * 10
    mean = data.train_x[::10].float().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(data.mean), atol=5e-3)


# --- augmentation determinism ------------------------------------------------------------------
def test_augmentation_is_fixed_by_seed_and_epoch() -> None:
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    a = augment(x, 4, True, epoch_generator(3, 0))
    assert torch.equal(a, augment(x, 4, True, epoch_generator(3, 0)))
    assert not torch.equal(a, augment(x, 4, True, epoch_generator(3, 1)))
    assert not torch.equal(a, augment(x, 4, True, epoch_generator(4, 0)))
    assert not torch.equal(a, x)
    assert a.shape == x.shape and a.dtype == torch.uint8


def test_task_batches_are_fixed_by_seed_and_epoch() -> None:
    cfg = compose_config(["task=vgg11_cifar10", "optim=adamw", "scale=smoke", "seed=5"])
    task = build_task(cfg, torch.device("cpu"))
    task.setup()
    assert task.tcfg.data.augment.pad == 4 and task.tcfg.data.augment.flip

    def epoch(e: int) -> list[torch.Tensor]:
        return [x for x, _ in task.train_batches(e)]

    e0, e1 = epoch(0), epoch(1)
    assert len(e0) == task.steps_per_epoch() == 64 // 8
    assert all(torch.equal(a, b) for a, b in zip(e0, epoch(0)))
    assert not all(torch.equal(a, b) for a, b in zip(e0, e1))
    # a new task object (as after a resume) gives the same batches
    again = build_task(cfg, torch.device("cpu"))
    again.setup()
    assert all(torch.equal(a, b) for (a, _), b in zip(again.train_batches(1), e1))


# --- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["smoke", "small", "paper"])
@pytest.mark.parametrize("task", VISION_TASKS)
def test_vision_tasks_compose(task: str, scale: str) -> None:
    cfg = compose_config([f"task={task}", "optim=adamw", f"scale={scale}"])
    assert cfg.task.name == task and cfg.scale == scale
    assert cfg.task.metric.name == "accuracy" and not cfg.task.metric.lower_is_better
    assert bool(cfg.task.data.synthetic) is (scale == "smoke")
    if scale == "smoke":
        assert cfg.train.max_steps == 3 and cfg.train.epochs is None
        assert cfg.task.data.n_train == 64
    else:
        assert cfg.train.epochs > 0 and cfg.train.batch_size >= 128
    if task in CIFAR_TASKS and scale != "smoke":
        assert cfg.task.data.name == "cifar10" and cfg.task.data.augment == {"pad": 4, "flip": True}
        assert (cfg.task.data.n_train is None) is (scale == "paper")


PAPER = {  # task: (epochs, batch size, parameters of the model the paper trains)
    "vgg11_cifar10": (205, 128, 9_750_922),
    "resnet34_cifar10": (205, 128, 21_282_122),
    "densenet121_cifar10": (201, 256, 6_956_298),
}


@pytest.mark.parametrize("task", list(PAPER))
def test_paper_scale_builds_the_paper_model(task: str) -> None:
    cfg = compose_config([f"task={task}", "optim=adamw", "scale=paper"])
    epochs, batch, params = PAPER[task]
    assert cfg.train.epochs == epochs and cfg.train.batch_size == batch
    m = build_model(cfg.task.model, in_channels=3, num_classes=10, image_size=32)
    assert n_params(m) == params


SISA = {  # task: (sigma, rho, beta, weight decay, decoupled, lambda) from the official commands
    "vgg11_cifar10": (4.5, 3e4, 0.995, 2.5e-4, False, 4e-4),
    "resnet34_cifar10": (0.1, 5e3, 0.999, 5e-5, False, 0.0),
    "densenet121_cifar10": (0.8, 2e3, 0.999, 5e-4, False, 5e-5),
    "resnet18_imagenet": (1.0, 1999.0, 0.999, 1e-2, True, 5e-6),
}


@pytest.mark.parametrize("task", list(SISA))
def test_sisa_pairs_carry_the_paper_values(task: str) -> None:
    sigma, rho, beta, wd, decoupled, lam = SISA[task]
    o = compose_config([f"task={task}", "optim=sisa", "scale=paper"]).optim
    assert o.sigma == sigma and o.beta == beta and o.weight_decay == wd and o.l2_lambda == lam
    assert o.decoupled_weight_decay is decoupled and o.n_workers == 4
    assert 1.0 / o.lr - o.sigma == pytest.approx(rho, rel=1e-6)  # lr = 1 / (sigma + rho)


@pytest.mark.parametrize(("task", "points", "rel"), [
    # official: x0.9 at epochs 10, 20, 25..60 (every 5), 70..140 (every 10); x0.35 at 125..200
    ("vgg11_cifar10", {9: 1.0, 10: 0.9, 61: 0.9**10, 130: 0.9**17 * 0.35, 204: 0.9**18 * 0.35**4},
     0.02),
    # official: x0.85 at 6..60 (every 3), 70, 80, 90; x0.5 at 100..200 (every 25); 0.5 ~ 0.85^4
    ("resnet34_cifar10", {5: 1.0, 6: 0.85, 60: 0.85**19, 99: 0.85**22, 204: 0.85**22 * 0.5**5},
     0.25),
    ("densenet121_cifar10", {49: 1.0, 50: 0.25, 200: 0.25**4}, 1e-9),
    ("resnet18_imagenet", {64: 1.0, 65: 0.15, 80: 0.15**2, 89: 0.15**3}, 1e-9),
])
def test_paper_schedules(task: str, points: dict[int, float], rel: float) -> None:
    """The official step schedules: lr multiplier at the start of the given epochs."""
    cfg = compose_config([f"task={task}", "optim=adamw", "scale=paper"])
    spe = 100  # steps per epoch
    f = lr_multiplier(OmegaConf.to_container(cfg.train.schedule), int(cfg.train.epochs) * spe)
    for epoch, value in points.items():
        assert f(epoch * spe) == pytest.approx(value, rel=rel), epoch


def test_adammini_on_vit_follows_the_model_shape() -> None:
    cfg = compose_config(["task=vit_cifar10", "optim=adammini", "scale=paper"])
    assert cfg.optim.num_embeds == 192 and cfg.optim.num_heads == 3


# --- ImageNet ----------------------------------------------------------------------------------
def test_imagenet_without_torchvision_says_how_to_get_it(tmp_path: Path) -> None:
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision imports here")
    except Exception:
        pass
    cfg = compose_config(["task=resnet18_imagenet", "optim=adamw", f"paths.data_dir={tmp_path}"])
    task = build_task(cfg, torch.device("cpu"))
    with pytest.raises(ImportError, match=r"pip install -e \.\[vision\]"):
        task.setup()


def test_imagenet_smoke_uses_an_in_project_model(run_cfg) -> None:
    summary, _ = run_cfg(["task=resnet18_imagenet", "optim=adamw", "scale=smoke"])
    assert summary["status"] == "ok", summary.get("error")
    assert summary["n_params"] == n_params(ResNet(blocks=(1, 1, 1, 1), width=0.0625))


def fake_torchvision() -> types.ModuleType:
    """A stand-in for torchvision with just what the ImageNet task touches: ImageFolder over
    ``<root>/<class>/<n>.JPEG`` giving constant images of value n, pass-through transforms, and a
    ``models.resnet18`` with an ``fc`` head. It checks the task's wiring, not torchvision."""
    tv = types.ModuleType("torchvision")

    class ImageFolder(torch.utils.data.Dataset):
        def __init__(self, root: str, transform: object) -> None:
            r = Path(root)
            self.classes = sorted(p.name for p in r.iterdir())
            self.samples = [(f, i) for i, c in enumerate(self.classes)
                            for f in sorted((r / c).iterdir())]
            self.targets = [t for _, t in self.samples]

        def __len__(self) -> int:
            return len(self.samples)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            f, t = self.samples[i]
            return torch.full((3, 8, 8), float(f.stem)), t

    def passthrough(*args: object, **kwargs: object) -> object:
        return lambda x: x

    def resnet18(weights: object = None, num_classes: int = 1000) -> torch.nn.Module:
        assert weights is None
        m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
        m.add_module("fc", torch.nn.Linear(16, num_classes))
        return m

    tv.datasets = types.SimpleNamespace(ImageFolder=ImageFolder)
    tv.transforms = types.SimpleNamespace(**{n: passthrough for n in (
        "Compose", "RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize", "Resize",
        "CenterCrop")})
    tv.models = types.SimpleNamespace(resnet18=resnet18)
    return tv


def test_imagenet_imagefolder_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   run_cfg) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision())
    overrides = ["task=resnet18_imagenet", "optim=adamw", f"paths.data_dir={tmp_path}",
                 "task.data.workers=0", "task.data.train_per_class=2", "train.epochs=2",
                 "train.batch_size=2", "train.eval_batch_size=4", "train.device=cpu"]
    cfg = compose_config(overrides)
    with pytest.raises(DatasetMissing, match="imagenet"):
        build_task(cfg, torch.device("cpu")).setup()
    for split, per_class in (("train", 3), ("val", 2)):
        for c in ("n01", "n02", "n03"):
            (tmp_path / "imagenet" / split / c).mkdir(parents=True)
            for i in range(per_class):
                (tmp_path / "imagenet" / split / c / f"{10 * int(c[-1]) + i}.JPEG").touch()

    task = build_task(cfg, torch.device("cpu"))
    task.setup()
    assert task.num_classes == 3 and task.steps_per_epoch() == 3  # 2 of 3 images per class
    assert any("2 per class" in n for n in task.notes)
    order = [x[:, 0, 0, 0].tolist() for x, _ in task.train_batches(0)]
    assert order == [x[:, 0, 0, 0].tolist() for x, _ in task.train_batches(0)]
    assert sorted(v for b in order for v in b) == [10, 11, 20, 21, 30, 31]  # first 2 per class
    model = task.build_model()
    assert "classifier.weight" in dict(model.named_parameters())
    metrics = task.evaluate(model.eval())
    assert {"accuracy", "top5", "loss"} <= set(metrics) and metrics["top5"] == 100.0

    summary, _ = run_cfg(overrides)
    assert summary["status"] == "ok", summary.get("error")
    assert summary["steps"] == 6 and summary["metric_split"] == "val"
