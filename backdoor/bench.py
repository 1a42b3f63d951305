"""Speed figures (printed, never asserted): poisoning throughput and trainer vs a bare PyTorch loop.

``backdoor bench`` poisons ``--images`` CIFAR-shaped uint8 images with every selected attack (the trigger on
all of them, and ``poison_train`` at ratio 0.1), then trains ``--model`` with the project's trainer and with a
minimal hand-written loop on the same data, and prints images/s for each.
"""
from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from backdoor.attacks import ATTACKS, AttackContext, create_attack
from backdoor.data import Dataset, Split, channel_stats
from backdoor.models import create_model
from backdoor.training import TrainConfig, fit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cifar_shaped(n: int, num_classes: int = 10, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, num_classes, (n,), generator=g))


def bench_context(device: torch.device, train: Split, model_name: str) -> AttackContext:
    """Material for attacks that need it (LC, LF, SSBA), built at a tiny budget: the bench times poisoning,
    not material (``prepare`` time is printed separately)."""
    mean, std = channel_stats(train.x[:2048])
    data = Dataset("bench", train, cifar_shaped(512, seed=1), 10, mean, std, hflip=True)
    config = TrainConfig(epochs=1, lr=0.05)
    cache: dict = {}

    def clean_model():
        if "model" not in cache:
            model = create_model(model_name, 10, mean, std, seed=0)
            fit(model, train.subset(torch.arange(min(len(train), 4096))), config, device=device, seed=0, desc="bench ref")
            cache["model"] = model
        return cache["model"]

    def cached(kind, spec, build):
        key = json.dumps([kind, spec], sort_keys=True, default=str)
        if key not in cache:
            cache[key] = build()
        return cache[key]

    return AttackContext(dataset=data, device=device, seed=0, training=config, model_name=model_name,
                         cached=cached, clean_model=clean_model, spec={"bench": True},
                         new_model=lambda: create_model(model_name, 10, mean, std, seed=0))


def poisoning_rows(pattern: str, images: int, device: torch.device, model_name: str, overrides: dict) -> list[dict]:
    train = cifar_shaped(images)
    train = Split(train.x, torch.arange(images) % 10)  # balanced, so clean-label ratio 0.1 is feasible
    ctx = bench_context(device, train, model_name)
    rows = []
    for name in ATTACKS.names(pattern):
        attack = create_attack(name, cap_ratio=True, **overrides.get(name, {}))
        if attack.kind == "training_controllable":
            continue  # they poison each batch inside the trainer (their cost is in the training time)
        start = time.perf_counter()
        attack.prepare(ctx)
        prepared = time.perf_counter() - start
        start = time.perf_counter()
        attack.apply_trigger(train.x)
        trigger = time.perf_counter() - start
        start = time.perf_counter()
        poisoned = attack.poison_train(train, 0.1, seed=0)
        poison = time.perf_counter() - start
        rows.append({"attack": name, "kind": attack.kind, "material_s": prepared,
                     "trigger_all_img_s": images / trigger, "poison_train_s": poison,
                     "poisoned": int(poisoned.mask.sum())})
    return rows


def bare_loop(model, data: Split, config: TrainConfig, device: torch.device, seed: int) -> None:
    """The minimal PyTorch loop: device tensors, index, float, forward, backward, step."""
    torch.manual_seed(seed)
    model.to(device).train()
    x_all, y_all = data.x.to(device), data.y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    for _ in range(config.epochs):
        order = torch.randperm(len(data), device=device)
        for start in range(0, len(data), config.batch_size):
            idx = order[start:start + config.batch_size]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=config.amp and device.type == "cuda"):
                loss = F.cross_entropy(model(x_all[idx].float().div_(255)), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def training_rows(model_name: str, images: int, epochs: int, device: torch.device) -> list[dict]:
    data = cifar_shaped(images)
    rows = []
    for label, config in (("no augmentation", TrainConfig(epochs=epochs, crop_padding=0, hflip=False)),
                          ("crop + flip", TrainConfig(epochs=epochs))):
        times = {}
        for runner in ("bare loop", "trainer"):
            model = create_model(model_name, 10, seed=0)
            warm = Split(data.x[:256], data.y[:256])  # warm-up: allocator, kernels, lazy init
            fit(model, warm, config.with_(epochs=1), device=device, seed=0, desc="warm-up")
            _sync(device)
            start = time.perf_counter()
            if runner == "trainer":
                fit(model, data, config, device=device, seed=0, desc="trainer")
            else:
                bare_loop(model, data, config, device, seed=0)
            _sync(device)
            times[runner] = time.perf_counter() - start
        if label == "crop + flip":
            times.pop("bare loop")  # the bare loop does no augmentation; only the trainer's figure is new
        for runner, seconds in times.items():
            rows.append({"model": model_name, "setting": label, "runner": runner,
                         "img_s": images * epochs / seconds})
    return rows


def main(args) -> int:
    from backdoor import progress

    progress.set_quiet(True)
    device = torch.device(args.device)
    overrides = json.loads(args.attack_params) if args.attack_params else {}
    print(f"device: {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"\npoisoning {args.images:,} CIFAR-shaped uint8 images (ratio 0.1 for poison_train); training-controllable "
          f"attacks poison inside the trainer and are not listed")
    print(f"{'attack':<12} {'kind':<22} {'trigger on all (img/s)':>24} {'poison_train (s)':>17} {'material (s)':>13}")
    for r in poisoning_rows(args.attacks, args.images, device, args.model, overrides):
        print(f"{r['attack']:<12} {r['kind']:<22} {r['trigger_all_img_s']:>24,.0f} {r['poison_train_s']:>17.3f} "
              f"{r['material_s']:>13.2f}")
    print(f"\ntraining {args.model} on {args.train_images:,} CIFAR-shaped images, {args.epochs} epoch(s), batch 128")
    rows = training_rows(args.model, args.train_images, args.epochs, device)
    for r in rows:
        print(f"{r['setting']:<16} {r['runner']:<10} {r['img_s']:>10,.0f} img/s")
    bare = next(r["img_s"] for r in rows if r["runner"] == "bare loop")
    same = next(r["img_s"] for r in rows if r["runner"] == "trainer" and r["setting"] == "no augmentation")
    print(f"trainer / bare loop (same work, no augmentation): {same / bare:.3f}")
    return 0
