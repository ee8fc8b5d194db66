"""Bad input is refused in one line naming the key, before any run directory exists.

Config values and optimizer hyperparameters are checked by :func:`pisa_bench.validate.validate`
(called first in :func:`pisa_bench.main.execute`); every ``task.data`` key is either honoured by
its loader or refused; the analysis scripts refuse a missing path in one line.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from pisa_bench.config import compose_config, group_options, task_settings
from pisa_bench.data.images import load_images
from pisa_bench.main import execute
from pisa_bench.validate import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["task=quickstart_mnist", "scale=smoke", "train.threads=1"]
REAL = ["task.data.synthetic=false"]  # the shipped MNIST loader (smoke scale: synthetic data)


@pytest.mark.parametrize(
    ("overrides", "names", "allowed"),
    [
        (["optim=sisa", "optim.lr=-1"], "optim.lr=-1", "lr must be in (0, 1/sigma)"),
        (["optim=sisa", "optim.lr=abc"], "optim.lr='abc'", "a number"),
        (["optim=sisa", "optim.n_workers=0"], "optim.n_workers=0", "integer >= 1"),
        (["optim=sisa", "optim.lr=1.5"], "optim.lr=1.5", "(0, 1/sigma) = (0, 1)"),
        (["optim=sisa", "optim.sigma=4", "optim.lr=0.5"], "optim.sigma=4", "(0, 0.25)"),
        (["optim=adamw", "optim.lr=-1"], "optim.lr=-1", "a number > 0"),
        (["optim=adamw", "optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5]", "[0, 1)"),
        (["optim=muon", "optim.companion.lr=-1"], "optim.companion.lr=-1", "> 0"),
        (["optim=sgdm", "optim.nesterov=maybe"], "optim.nesterov='maybe'", "true or false"),
        (["optim._target_=torch.optim.Nope"], "optim._target_='torch.optim.Nope'",
         "not an importable optimizer class"),
        (["optim=adamw", "+optim.takes=module"], "optim.takes='module'", "params or model"),
        (["optim=adamw", "+optim.bogus=1"], "optim.bogus=1", "it takes amsgrad, betas"),
        (["train.batch_size=abc"], "train.batch_size='abc'", "an integer >= 1"),
        (["train.schedule.name=cos"], "train.schedule.name='cos'", "constant, step, cosine"),
        (["train.precision=fp8"], "train.precision='fp8'", "auto, bf16, fp32"),
        (["task.model._target_=pisa_bench.models.small.Nope"],
         "task.model._target_='pisa_bench.models.small.Nope'", "not an importable model class"),
        (["+task.explode_above=-1"], "task.explode_above=-1", "a number > 0"),
        (["task.data.val_fraction=1.5"], "task.data.val_fraction=1.5", "a number in [0, 1)"),
        (["task.data.name=nope"], "task.data.name='nope'", "fashion_mnist, mnist"),
        (["+task.data.bogus=1"], "task.data.bogus=1", "its keys are augment, n_test"),
        ([*REAL, "+task.data.n_test=5"], "task.data.n_test=5", "dataset 'mnist_shipped'"),
    ],
)
def test_bad_value_is_one_line_and_leaves_no_run_dir(
    overrides: list[str], names: str, allowed: str, tmp_path: Path
) -> None:
    cfg = compose_config([*QUICK, f"paths.out_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError) as e:
        execute(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(names + ": ") and allowed in msg, msg
    assert list(tmp_path.iterdir()) == []  # no run directory, no failed record


def _every_shipped_config() -> list[list[str]]:
    tasks = group_options("task")
    out = [[f"optim={o}", "task=quickstart_mnist"] for o in group_options("optim")]
    out += [[f"task={t}", f"scale={s}"] for t in tasks for s in ("smoke", "paper")]
    for task in tasks:  # conf/task/<task>/optim/<optim>.yaml (or the folder it shares)
        out += [[f"task={task}", f"optim={o}"] for o in task_settings(task, "optim")]
    out += [[f"experiment={e}"] for e in group_options("experiment")]
    return out


def test_every_shipped_config_is_valid() -> None:
    """No false refusal: every optimizer, task x scale, task x optim pair with settings of its
    own (conf/task/<task>/optim/) and experiment passes."""
    for overrides in _every_shipped_config():
        try:
            validate(compose_config(overrides))
        except ConfigError as e:
            pytest.fail(f"{overrides}: {e}")


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("optim.lr=abc", "error: optim.lr='abc': a number (default 0.001)"),
        ("optim.n_workers=0", "error: optim.n_workers=0: invalid for sisa: n_workers must be an"),
        ("optim.lr=1.5", "error: optim.lr=1.5: invalid for sisa: lr must be in (0, 1/sigma)"),
    ],
)
def test_run_py_prints_one_line_and_exits_2(override: str, line: str, tmp_path: Path) -> None:
    """The command line: one line on stderr (no traceback), exit code 2, no run directory."""
    done = subprocess.run(
        [sys.executable, "run.py", *QUICK, "optim=sisa", override, f"paths.out_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(line), done.stderr
    assert not (tmp_path / "runs").exists()


def test_run_py_help_lists_each_group_once() -> None:
    """``--help`` lists the groups a user picks from, with their options, and names the task
    folders' own settings once instead of listing every ``task/<task>/scale`` as a group."""
    done = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"task: {', '.join(group_options('task'))}" in lines
    assert f"optim: {', '.join(group_options('optim'))}" in lines
    assert not [ln for ln in lines if ln.startswith("task/")]


# --- every loader honours or refuses each key -------------------------------------------------
def _write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (magic 2051 for (N, H, W) uint8 images, 2049 for (N,) labels), gzipped."""
    dims = array.shape
    magic = 2051 if len(dims) == 3 else 2049
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(head + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST look-alike: 40 training images (4 per class), 20 test images."""
    root = tmp_path / "data"
    d = root / "fashion-mnist"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        _write_idx(d / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(d / f"{stem}-labels-idx1-ubyte.gz", labels)
    return root


def test_fashion_mnist_honours_n_train_and_n_test(fashion_dir: Path) -> None:
    cfg = OmegaConf.create(
        {"name": "fashion_mnist", "synthetic": False, "n_train": 20, "n_test": 10}
    )
    data = load_images(cfg, fashion_dir)
    assert len(data.train_x) == 20 and len(data.test_x) == 10
    assert np.bincount(data.train_y.numpy()).tolist() == [2] * 10  # class-balanced
    assert "20 of 40" in data.note and "10 of 20" in data.note
    full = load_images(OmegaConf.create({"name": "fashion_mnist", "synthetic": False}), fashion_dir)
    assert len(full.train_x) == 40 and full.note == ""


def test_fashion_mnist_n_train_run_trains_on_the_subset(fashion_dir: Path, tmp_path: Path) -> None:
    """The issue's case: ``task.data.n_train`` with ``fashion_mnist`` trained on every image."""
    cfg = compose_config(
        [
            "task=quickstart_mnist",
            "task.data.name=fashion_mnist",
            "task.data.n_train=20",
            f"paths.data_dir={fashion_dir}",
            f"paths.out_dir={tmp_path / 'out'}",
            "train.threads=1",
            "train.epochs=1",
            "train.batch_size=10",
            "train.eval_every=0",
        ]
    )
    summary = execute(cfg)
    assert summary["status"] == "ok", summary.get("error")
    assert summary["steps"] == 2  # one epoch of 20 images in batches of 10 (not 40 images)
    assert any("20 of 40" in n for n in summary["notes"])


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["task=gpt2", "+task.data.n_train=5"], "task.data.n_train=5: not read by task gpt2 "),
        (["task=gpt2", "task.data.name=c4"], "task.data.name='c4': choose one of fineweb10B"),
        (["task=gpt2_finetune", "+task.data.n=1"], "task.data.n=1: not read by task gpt2_fine"),
        (["task=lstm1_ptb", "task.data.name=wsj"], "task.data.name='wsj': choose one of ptb"),
        (["task=lstm2_ptb", "+task.data.seq_len=9"], "task.data.seq_len=9: not read by task lst"),
        (["task=wgan_cifar10", "+task.data.n_tests=9"], "task.data.n_tests=9: not read by task"),
        (["task=fl_adult", "task.data.kind=x"], "task.data.kind='x': choose one of images, tab"),
        (["task=fl_adult", "+task.data.shape=[1]"], "task.data.shape=[1]: not read by task fl_"),
        (["task=fl_cifar10", "+task.data.dir=x"], "task.data.dir='x': not read by task fl_cifar"),
        (["task=resnet18_imagenet", "+task.data.n_test=1"], "task.data.n_test=1: not read by"),
        (["task=vgg11_cifar10", "+task.data.resize=9"], "task.data.resize=9: not read by task"),
    ],
)
def test_every_task_refuses_a_data_key_it_does_not_read(overrides: list[str], start: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(compose_config(overrides))
    assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)


def test_tabular_loader_refuses_an_unknown_dataset() -> None:
    cfg = compose_config(["task=fl_adult", "task.data.name=nope"])
    with pytest.raises(ConfigError, match=r"^task.data.name='nope': choose one of adult_a9a$"):
        validate(cfg)


# --- the analysis scripts on a missing path ---------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["scripts/collect.py", "/nonexistent", "--out", "{tmp}/runs"],
        ["scripts/report.py", "--runs", "/nonexistent", "--out", "{tmp}/report"],
        ["scripts/report.py", "--table", "/nonexistent.parquet", "--out", "{tmp}/report"],
    ],
)
def test_scripts_refuse_a_missing_path_in_one_line(argv: list[str], tmp_path: Path) -> None:
    args = [a.format(tmp=tmp_path) for a in argv]
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "/nonexistent" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
