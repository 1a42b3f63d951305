"""Speed figures (printed, never asserted): poisoning throughput and trainer vs a bare PyTorch loop.

``backdoor bench`` poisons ``--images`` CIFAR-shaped uint8 images with every selected attack (the trigger on
all of them, and ``poison_train`` at ratio 0.1), then trains ``--model`` with the project's trainer and with a
minimal hand-written loop on the same data, and prints images/s for each.
"""
from __future__ import annotations

import json
import signal
import statistics
import sys
import time
from typing import Callable

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


def _median_spread(values: list[float]) -> tuple[float, float, float]:
    xs = sorted(values)
    return statistics.median(xs), xs[0], xs[-1]


Step = Callable[[str], None]  # told what the bench starts next (its progress lines)


def _silent(_: str) -> None:
    pass


def poisoning_rows(pattern: str, images: int, device: torch.device, model_name: str, overrides: dict,
                   repeats: int = 5, step: Step = _silent) -> list[dict]:
    """Per attack: material time (once), then ``repeats`` rounds of the trigger on all images, interleaved over
    the attacks (round 1 of every attack, then round 2, ...) so a load spike on a shared machine hits all of them
    alike; the median throughput and its range are reported."""
    train = cifar_shaped(images)
    train = Split(train.x, torch.arange(images) % 10)  # balanced, so clean-label ratio 0.1 is feasible
    ctx = bench_context(device, train, model_name)
    attacks, rows = [], {}
    for name in ATTACKS.names(pattern):
        attack = create_attack(name, cap_ratio=True, **overrides.get(name, {}))
        if attack.kind == "training_controllable":
            continue  # they poison each batch inside the trainer (their cost is in the training time)
        step(f"{name}: material")
        start = time.perf_counter()
        attack.prepare(ctx)
        rows[name] = {"attack": name, "kind": attack.kind, "material_s": time.perf_counter() - start, "rates": [],
                      "poison_s": []}
        attacks.append((name, attack))
    for round_ in range(repeats):
        step(f"poisoning round {round_ + 1}/{repeats} ({len(attacks)} attack(s))")
        for name, attack in attacks:
            start = time.perf_counter()
            attack.apply_trigger(train.x)
            _sync(device)
            rows[name]["rates"].append(images / (time.perf_counter() - start))
            start = time.perf_counter()
            poisoned = attack.poison_train(train, 0.1, seed=0)
            rows[name]["poison_s"].append(time.perf_counter() - start)
            rows[name]["poisoned"] = int(poisoned.mask.sum())
    for row in rows.values():
        row["trigger_img_s"], row["trigger_min"], row["trigger_max"] = _median_spread(row.pop("rates"))
        row["poison_train_s"] = statistics.median(row.pop("poison_s"))
    return list(rows.values())


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


def _timed_fit(runner: str, model_name: str, data: Split, config: TrainConfig, device: torch.device) -> float:
    model = create_model(model_name, 10, seed=0)
    warm = Split(data.x[:256], data.y[:256])  # warm-up: allocator, kernels, lazy init
    fit(model, warm, config.with_(epochs=1), device=device, seed=0, desc="warm-up")
    _sync(device)
    start = time.perf_counter()
    if runner == "bare loop":
        bare_loop(model, data, config, device, seed=0)
    else:
        fit(model, data, config, device=device, seed=0, desc=runner)
    _sync(device)
    return time.perf_counter() - start


def training_rows(model_name: str, images: int, epochs: int, device: torch.device, repeats: int = 5,
                  step: Step = _silent) -> dict:
    """``repeats`` interleaved rounds of (bare loop, trainer, trainer with crop + flip) on the same data; returns
    the median images/s of each with its range, and the median and range of the per-round trainer/bare ratio
    (a round's two runs are adjacent in time, so the ratio cancels most of a shared machine's load)."""
    data = cifar_shaped(images)
    plain, augmented = TrainConfig(epochs=epochs, crop_padding=0, hflip=False), TrainConfig(epochs=epochs)
    runs = {"bare loop": [], "trainer": [], "trainer, crop + flip": []}
    for round_ in range(repeats):
        step(f"training round {round_ + 1}/{repeats} (bare loop, trainer, trainer + crop/flip)")
        runs["bare loop"].append(_timed_fit("bare loop", model_name, data, plain, device))
        runs["trainer"].append(_timed_fit("trainer", model_name, data, plain, device))
        runs["trainer, crop + flip"].append(_timed_fit("trainer", model_name, data, augmented, device))
    ratios = [bare / trainer for bare, trainer in zip(runs["bare loop"], runs["trainer"])]
    return {"rates": {name: _median_spread([images * epochs / t for t in times]) for name, times in runs.items()},
            "ratio": _median_spread(ratios), "ratios": ratios}


def main(args) -> int:
    """Print the figures, with a progress line on stderr as each step starts; Ctrl-C ends it with one line."""
    started = time.perf_counter()
    interrupted: list[int] = []

    def on_interrupt(signum, _frame) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    def step(what: str) -> None:
        # A KeyboardInterrupt raised while a finalizer runs (a progress bar's __del__) is printed and dropped by
        # Python, and the bench ran on to its end (CI, loaded): the next step raises it again.
        if interrupted:
            raise KeyboardInterrupt
        print(f"  [{time.perf_counter() - started:5.0f} s] {what}", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        return _bench(args, step)
    except KeyboardInterrupt:
        print(f"backdoor bench: interrupted after {time.perf_counter() - started:.0f} s; the figures printed above "
              "are complete, the rest were not measured", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)


def _bench(args, step: Step) -> int:
    from backdoor import progress

    progress.set_quiet(True)
    device = torch.device(args.device)
    overrides = json.loads(args.attack_params) if args.attack_params else {}
    print(f"device: {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"\npoisoning {args.images:,} CIFAR-shaped uint8 images (ratio 0.1 for poison_train), {args.repeats} interleaved "
          f"rounds; median (min-max). Training-controllable attacks poison inside the trainer and are not listed")
    print(f"{'attack':<12} {'kind':<22} {'trigger on all, img/s: median (min-max)':>42} {'poison_train (s)':>17} "
          f"{'material (s)':>13}")
    for r in poisoning_rows(args.attacks, args.images, device, args.model, overrides, args.repeats, step):
        spread = f"{r['trigger_img_s']:,.0f} ({r['trigger_min']:,.0f}-{r['trigger_max']:,.0f})"
        print(f"{r['attack']:<12} {r['kind']:<22} {spread:>42} {r['poison_train_s']:>17.3f} {r['material_s']:>13.2f}")
    print(f"\ntraining {args.model} on {args.train_images:,} CIFAR-shaped images, {args.epochs} epoch(s), batch 128, "
          f"{args.repeats} interleaved rounds (bare, trainer, trainer + crop/flip, bare, ...)")
    result = training_rows(args.model, args.train_images, args.epochs, device, args.repeats, step)
    for name, (median, low, high) in result["rates"].items():
        print(f"{name:<22} {median:>10,.0f} img/s (min {low:,.0f}, max {high:,.0f})")
    median, low, high = result["ratio"]
    print(f"trainer / bare loop throughput, same work, per round: median {median:.3f} (min {low:.3f}, max {high:.3f}; "
          f"rounds: {', '.join(f'{r:.3f}' for r in result['ratios'])})")
    return 0
