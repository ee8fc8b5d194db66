r"""WGAN (weight clipping) and WGAN-GP (gradient penalty) with a DCGAN pair; primary metric FID.

Losses (Arjovsky et al. 2017; Gulrajani et al. 2017), on a real batch x and z ~ N(0, I)::

    critic:     L_D = mean D(G(z)) - mean D(x)  [+ lambda_gp * mean_i (||grad D(x^_i)||_2 - 1)^2]
                with x^_i = a_i x_i + (1 - a_i) G(z_i), a_i ~ U(0, 1)
    generator:  L_G = -mean D(G(z))
    clipping:   after every critic round, every critic parameter is clamped to [-c, c]

One global step = one critic round on one real batch, plus a generator round every
``gan.n_critic`` steps (the paper's commands use n_critic = 1). Both networks get an optimizer
built from ``optim=`` (the same config, two instances); each has its own LR schedule over its
own number of rounds.

PISA-family optimizers in virtual-worker mode (``optim.n_workers = m``): each round cuts the
real batch (critic) or the noise batch (generator) into m sub-batches, and makes one
``step()`` per sub-batch; the optimizer keeps the parameters at the global weights during the
round, so every sub-batch gradient is taken there, and the m-th step writes the new global
weights. Weight clipping then acts on those global weights, as in the official code.

Evaluation: FID of ``fid.n_fake`` generated images (fixed noise, generator in eval mode)
against ``fid.n_real`` images of the reference split (``fid.reference``: train | test), at the
end of every epoch (``fid.per_epoch``), every ``train.eval_every`` steps when set, and at the
end. The metric is ``fid_inception`` or ``fid_classifier`` by the feature extractor in use (see
:mod:`pisa_bench.fid`); the summary's notes say which network and how it was obtained.

Validation split (``task.data.val_fraction``, :mod:`pisa_bench.data.split`): that share of the
training images is held out before ``data.train_subset`` is taken, so the generator and critic
never train on it (nor does the suite's FID classifier), and every evaluation also logs
``val_<metric>``: the FID of the *same* ``n_fake`` generated images against ``n_real`` of the
held-out images, drawn as the reference ones are (``fid.seed``). Both distances use the same
sample sizes (FID is biased by ``n``), so a split with fewer than ``n_real`` images is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pisa_bench.baselines import needs_create_graph
from pisa_bench.data.images import ImageData, image_data_keys, load_images
from pisa_bench.data.split import carve_validation
from pisa_bench.errors import ConfigError
from pisa_bench.fid import (
    ClassifierExtractor,
    FeatureExtractor,
    InceptionExtractor,
    frechet_distance,
    gaussian_stats,
    load_or_train_classifier,
    resolve_extractor,
)
from pisa_bench.models.gan import DCGAN
from pisa_bench.runtime import autocast, epoch_generator, round_telemetry, workers_per_round
from pisa_bench.tasks.base import Task, to_device
from pisa_bench.trainer import Trainer


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_i (||grad_x D(x^_i)||_2 - 1)^2`` at ``x^_i = a_i real_i + (1 - a_i) fake_i``.

    ``alpha`` (shape (N,), default U(0, 1) from the global RNG) fixes the interpolation. The
    graph is kept (``create_graph``) so that the penalty can be back-propagated.
    """
    if alpha is None:
        alpha = torch.rand(real.shape[0], device=real.device)
    a = alpha.to(real.dtype).view(-1, *([1] * (real.dim() - 1)))
    x = (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)
    out = critic(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


@torch.no_grad()
def clip_weights(module: nn.Module, c: float) -> None:
    """Clamp every parameter of ``module`` to ``[-c, c]`` (in place)."""
    for p in module.parameters():
        p.clamp_(-c, c)


def n_workers(opt: torch.optim.Optimizer) -> int:
    """Sub-batches per round: ``opt.n_workers`` for PISA-family optimizers, else 1."""
    return workers_per_round(opt)


class WGAN(Task):
    """WGAN / WGAN-GP on an image dataset (``task.gan``: n_critic, clip_value, gp_weight)."""

    data: ImageData  # its train split without the held-out validation images
    train_x: torch.Tensor  # the images the GAN trains on (``data.train_subset``)
    val_x: torch.Tensor | None  # held-out training images (``data.val_fraction``), or None

    @classmethod
    def accepted_data_keys(cls, data: DictConfig) -> frozenset[str]:
        return image_data_keys(data) | {"resize", "train_subset", "val_fraction"}

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.gcfg = self.tcfg.gan
        self.fcfg = self.tcfg.fid
        inception = self.fcfg.get("inception_path")
        self.inception_path = None if inception in (None, "") else str(inception)
        self.extractor_kind = resolve_extractor(str(self.fcfg.extractor), self.inception_path)
        clip, gp = self.gcfg.get("clip_value"), self.gcfg.get("gp_weight")
        if clip is None and not gp:
            raise ValueError("task.gan needs clip_value (WGAN) or gp_weight (WGAN-GP)")
        self.clip_value = None if clip is None else float(clip)
        self.gp_weight = float(gp or 0.0)
        self.n_critic = int(self.gcfg.n_critic)
        if str(self.fcfg.reference) not in ("train", "test"):  # before any run directory
            raise ConfigError("task.fid.reference", self.fcfg.reference, "must be train or test")
        if self.n_critic < 1:
            raise ValueError(f"task.gan.n_critic must be >= 1, got {self.n_critic}")
        self.extractor: FeatureExtractor | None = None
        self._real_stats: dict[str, tuple[Any, Any]] = {}  # split -> Gaussian of its features

    # --- metric: the extractor is part of its name ------------------------------------------
    @property
    def metric(self) -> str:
        return f"{self.tcfg.metric.name}_{self.extractor_kind}"

    # --- data ---------------------------------------------------------------------------
    def setup(self) -> None:
        self.data = load_images(self.tcfg.data, self.data_dir)
        if self.data.note:
            self.notes.append(self.data.note)
        self._carve_validation()
        subset = self.tcfg.data.get("train_subset")
        if subset and not self.tcfg.data.get("synthetic") and int(subset) < len(self.data.train_x):
            n = int(subset)  # the GAN's images; FID reference and classifier: all non-held-out
            self.train_x = self.data.train_x[:n]
            self.notes.append(f"GAN trained on the first {n} of {len(self.data.train_x)} images")
        else:
            self.train_x = self.data.train_x
        resize = self.tcfg.data.get("resize")
        self.image_size = int(resize) if resize else int(self.data.train_x.shape[-1])
        self.extractor = self._make_extractor()

    def _carve_validation(self) -> None:
        """Move ``data.val_fraction`` of the training images into ``val_x`` (held out)."""
        d = self.data
        d.train_x, d.train_y, self.val_x, _ = carve_validation(
            d.train_x, d.train_y, self.tcfg.data.get("val_fraction"))
        if self.val_x is not None:
            self.notes.append(
                f"validation split: {len(self.val_x)} of the {len(self.val_x) + len(d.train_x)} "
                f"training images held out (never trained on by the GAN or the FID classifier); "
                f"val_{self.metric}: FID of the same generated images against "
                f"{int(self.fcfg.n_real)} of them")

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float in [-1, 1] at the model's size (bilinear, antialiased)."""
        x = x.float() / 127.5 - 1.0
        if x.shape[-1] != self.image_size:
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            ).clamp_(-1, 1)
        return x

    def steps_per_epoch(self) -> int:
        return max(len(self.train_x) // int(self.cfg.train.batch_size), 1)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        g = epoch_generator(self.seed, epoch)
        n, bs = len(self.train_x), min(int(self.cfg.train.batch_size), len(self.train_x))
        perm = torch.randperm(n, generator=g)
        for i in range(start, self.steps_per_epoch()):
            yield self.to_input(self.train_x[perm[i * bs : (i + 1) * bs]])

    def count(self, batch: Any) -> int:
        return int(batch.shape[0])

    # --- model --------------------------------------------------------------------------
    def build_model(self) -> DCGAN:
        mc = self.tcfg.model
        if str(mc.name) != "dcgan":
            raise KeyError(f"task {self.tcfg.name}: unknown GAN model '{mc.name}' (have: dcgan)")
        return DCGAN(
            z_dim=int(mc.z_dim),
            image_channels=int(self.data.train_x.shape[1]),
            image_size=self.image_size,
            g_channels=int(mc.g_channels),
            d_channels=int(mc.d_channels),
            critic_norm=str(mc.critic_norm),
        )

    # --- FID ----------------------------------------------------------------------------
    def _make_extractor(self) -> FeatureExtractor:
        f = self.fcfg
        n_real, n_fake, ref = int(f.n_real), int(f.n_fake), str(f.reference)
        sizes = f"{n_fake} generated vs {n_real} real ({ref} split) images"
        if self.extractor_kind == "inception":
            ext: FeatureExtractor = InceptionExtractor(
                self.inception_path or "", self.device, int(f.batch_size)
            )
            self.notes.append(f"{self.metric}: standard FID on the {ext.description}; {sizes}")
            return ext
        spec = OmegaConf.to_container(f.classifier, resolve=True)
        assert isinstance(spec, dict)
        data_cfg = OmegaConf.to_container(self.tcfg.data, resolve=True)
        assert isinstance(data_cfg, dict)
        data_cfg.pop("train_subset", None)  # the classifier trains on its own n_train images
        if not data_cfg.get("val_fraction"):  # no held-out images: the classifier of old configs
            data_cfg.pop("val_fraction", None)
        spec["data"] = data_cfg  # what the classifier was trained on is part of its identity
        dataset = "synthetic" if self.tcfg.data.get("synthetic") else str(self.tcfg.data.name)
        cache = Path(str(self.cfg.paths.cache_dir))
        net, info = load_or_train_classifier(
            cache / "fid_classifier", dataset, spec, self.data, self.to_input, self.device
        )
        desc = (
            f"{self.metric}: Fréchet distance on the penultimate features of a small CNN trained "
            f"by this suite on {dataset} (seed {spec['seed']}, {spec['epochs']} epochs, test "
            f"accuracy {info['test_accuracy']:.2f}%, {info['path']}); NOT the Inception FID and "
            f"not comparable with published FIDs; {sizes}"
        )
        self.notes.append(desc)
        return ClassifierExtractor(net, self.device, int(f.batch_size), desc)

    def _pool(self, split: str) -> torch.Tensor:
        """The real images of ``split``: train (the non-held-out training images), test, val."""
        pool = {"train": self.data.train_x, "test": self.data.test_x, "val": self.val_x}[split]
        assert pool is not None
        return pool

    def _reference_stats(self, split: str) -> tuple[Any, Any]:
        """Feature Gaussian of ``fid.n_real`` images of ``split`` (drawn with ``fid.seed``)."""
        if split not in self._real_stats:
            assert self.extractor is not None
            f = self.fcfg
            pool, n_real = self._pool(split), int(f.n_real)
            if len(pool) < n_real:
                raise ValueError(
                    f"task.fid.n_real={n_real} but the {split} split has {len(pool)} images: "
                    f"FID is biased by the sample size, so every split needs n_real images")
            g = torch.Generator().manual_seed(int(f.seed))
            idx = torch.randperm(len(pool), generator=g)[:n_real]
            x = torch.cat(
                [self.to_input(pool[idx[i : i + 1024]]) for i in range(0, len(idx), 1024)]
            )
            self._real_stats[split] = gaussian_stats(self.extractor(x))
        return self._real_stats[split]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        assert isinstance(model, DCGAN) and self.extractor is not None
        f = self.fcfg
        gen = model.generator
        was_training = gen.training
        gen.eval()
        g = torch.Generator().manual_seed(int(f.seed) + 1)  # the same noise at every evaluation
        n, bs = int(f.n_fake), int(f.batch_size)
        fakes = [
            gen(torch.randn(min(bs, n - i), model.z_dim, generator=g).to(self.device)).float().cpu()
            for i in range(0, n, bs)
        ]
        gen.train(was_training)
        fake = torch.cat(fakes)
        # The generator's output (eval mode: BN running statistics) is watched too: when it is
        # non-finite the FID is undefined (nan), so the run ends `diverged`, not with an error.
        out = {"generator_abs_max": float(fake.abs().max())}
        names = {self.metric: str(f.reference)}  # metric -> split of its real images
        if self.val_x is not None:
            names[f"val_{self.metric}"] = "val"
        if not math.isfinite(out["generator_abs_max"]):
            return {**out, **dict.fromkeys(names, math.nan)}
        fake_stats = gaussian_stats(self.extractor(fake))
        for name, split in names.items():
            out[name] = frechet_distance(*self._reference_stats(split), *fake_stats)
        return out

    # --- the loop -----------------------------------------------------------------------
    def _noise(self, n: int, z_dim: int) -> torch.Tensor:
        return torch.randn(n, z_dim, device=self.device)

    def critic_round(
        self,
        model: DCGAN,
        opt: torch.optim.Optimizer,
        real: torch.Tensor,
        trainer: Trainer,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One optimizer round of the critic on ``real`` (m sub-batches); clip after it. The
        losses are device tensors, not yet read (:meth:`Trainer.watch`)."""
        G, D = model.generator, model.critic
        precision, clip = str(self.cfg.train.precision), self.cfg.train.get("grad_clip")
        subs = self.split_batch(real, n_workers(opt))
        sums = {k: torch.zeros((), dtype=torch.float64, device=self.device)
                for k in ("loss_d", "wasserstein", "gp")}
        for sub in subs:
            opt.zero_grad(set_to_none=True)
            with torch.no_grad(), autocast(self.device, precision):
                fake = G(self._noise(len(sub), model.z_dim))
            with autocast(self.device, precision):
                d_real, d_fake = D(sub).float().mean(), D(fake).float().mean()
                loss = d_fake - d_real
                if self.gp_weight:
                    gp = gradient_penalty(D, sub, fake)
                    loss = loss + self.gp_weight * gp
                    sums["gp"] += gp.detach().double()
            loss.backward(create_graph=create_graph)
            if clip:
                nn.utils.clip_grad_norm_(D.parameters(), float(clip))
            trainer.optimizer_step(opt)
            sums["loss_d"] += loss.detach().double()
            sums["wasserstein"] += (d_real - d_fake).detach().double()
        if self.clip_value is not None:
            clip_weights(D, self.clip_value)
        out = {k: v / len(subs) for k, v in sums.items()}
        if not self.gp_weight:
            out.pop("gp")
        return out

    def generator_round(
        self,
        model: DCGAN,
        opt: torch.optim.Optimizer,
        batch_size: int,
        trainer: Trainer,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One optimizer round of the generator on ``batch_size`` noise vectors (m sub-batches);
        its loss a device tensor, not yet read."""
        G, D = model.generator, model.critic
        precision, clip = str(self.cfg.train.precision), self.cfg.train.get("grad_clip")
        sizes = [len(c) for c in torch.arange(batch_size).tensor_split(n_workers(opt))]
        if min(sizes) == 0:
            raise ValueError(f"batch of {batch_size} cannot feed {len(sizes)} workers")
        D.requires_grad_(False)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            for n in sizes:
                opt.zero_grad(set_to_none=True)
                with autocast(self.device, precision):
                    loss = -D(G(self._noise(n, model.z_dim))).float().mean()
                loss.backward(create_graph=create_graph)
                if clip:
                    nn.utils.clip_grad_norm_(G.parameters(), float(clip))
                trainer.optimizer_step(opt)
                total += loss.detach().double()
        finally:
            D.requires_grad_(True)
        return {"loss_g": total / len(sizes)}

    def run(self, trainer: Trainer) -> None:
        if trainer.dist.world > 1:
            raise NotImplementedError(f"task {self.tcfg.name} runs in one process (no torchrun)")
        create_graph = needs_create_graph(self.cfg.optim)
        model = self.build_model().to(self.device)
        opt_d = trainer.make_optimizer(model.critic)
        opt_g = trainer.make_optimizer(model.generator)
        total = trainer.max_steps = trainer.total_steps()
        sched_d = trainer.make_scheduler(opt_d, total)
        sched_g = trainer.make_scheduler(opt_g, math.ceil(total / self.n_critic))
        state = trainer.load_checkpoint()
        if state is not None:
            model.load_state_dict(state["model"])
            for obj, key in (
                (opt_d, "opt_d"),
                (opt_g, "opt_g"),
                (sched_d, "sched_d"),
                (sched_g, "sched_g"),
            ):
                obj.load_state_dict(state[key])
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        spe = self.steps_per_epoch()
        per_epoch = bool(self.fcfg.get("per_epoch", True))

        def ckpt_state() -> dict[str, Any]:
            return {
                "model": model.state_dict(),
                "opt_d": opt_d.state_dict(),
                "opt_g": opt_g.state_dict(),
                "sched_d": sched_d.state_dict(),
                "sched_g": sched_g.state_dict(),
            }

        bar = trainer.progress(total, initial=trainer.step)
        batches = trainer.batches()
        while trainer.step < total:
            real = to_device(next(batches), self.device)
            model.train()
            row = self.critic_round(model, opt_d, real, trainer, create_graph)
            sched_d.step()
            if trainer.step % self.n_critic == 0:
                row.update(self.generator_round(model, opt_g, len(real), trainer, create_graph))
                sched_g.step()
            trainer.end_round()
            trainer.step += 1
            trainer.samples += len(real)
            trainer.watch(row)  # both losses, read at once on CPU, at the cadence on GPU
            bar.update(1)
            log_due = trainer.log_due()
            epoch_end = per_epoch and trainer.batch_in_epoch >= spe
            eval_due = epoch_end or trainer.eval_due()
            read = trainer.read_watched_if(log_due or eval_due)
            if log_due:
                read["lr"] = opt_d.param_groups[0]["lr"]
                for name, opt in (("d", opt_d), ("g", opt_g)):
                    read.update(round_telemetry(opt, f"admm_{name}_"))
                trainer.log("train", read)
            if eval_due:
                trainer.record_eval(self.evaluate(model))
            trainer.checkpoint_or_stop(ckpt_state)
        bar.close()
        trainer.finish([opt_d, opt_g], n_params)
