"""ABL's unlearning against learning rate and epochs: is there a step where the ASR is low and C-Acc kept?

Runs ABL's isolation and fine-tuning once on a matrix's case (its ``abl`` parameters and budgets), then, from
that model, gradient ascent on the isolated samples for each learning rate, with the batch-norm layers in train
mode (as ABL and BackdoorBench run it) and, with ``--frozen-bn``, also in eval mode (running statistics fixed).
Prints C-Acc / ASR / R-Acc / target-class accuracy at chosen epochs. Each epoch is one ``fit`` call at a
constant learning rate (seeded by the epoch), so the optimiser's momentum restarts every epoch.

    BACKDOOR_DATA_ROOT=/path/to/folder python benchmarks/abl_unlearning.py matrices/gtsrb_defenses.yaml \\
        --attack badnets --lrs 1e-4 5e-4 2e-3 --frozen-bn
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from backdoor.harness.cache import ArtifactCache
from backdoor.defenses.abl import AntiBackdoorLearning, ascent_loss
from backdoor.harness.matrix import load_matrix
from backdoor.harness.case_record import StageLog
from backdoor.harness.runner import Runner
from backdoor.training import fit

MARKS = (1, 2, 4, 8, 12, 20, 30, 40)


def frozen_bn_ascent(model, x, y):
    """The ascent loss with every batch-norm layer in eval mode (fixed running statistics)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return ascent_loss(model, x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix")
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4, 2e-3])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--frozen-bn", action="store_true", help="also run with batch norm in eval mode")
    parser.add_argument("--cache-dir", default=".backdoor-cache")
    args = parser.parse_args()
    torch.set_num_threads(1)

    runner = Runner(ArtifactCache(args.cache_dir))
    cases = [c for c in load_matrix(args.matrix).cases() if c.attack == args.attack and c.defense == "abl"]
    if not cases:
        raise SystemExit(f"{args.matrix} has no case of attack {args.attack!r} with defense abl")
    case, log_ = cases[0], StageLog()
    data = runner.dataset(case, log_)
    attack = runner.attack(case, data, log_)
    poisoned = runner.poisoned(case, attack, data, log_, runner.attack_spec(case, attack))
    # ABL trains from scratch: the model it is handed (here an untrained one) is not used.
    inputs = runner.defense_inputs(case, data, runner.new_model(case, data), poisoned.split)

    started = time.perf_counter()
    abl = AntiBackdoorLearning(**case.defense_params)
    before = AntiBackdoorLearning(**{**case.defense_params, "unlearn_epochs": 0}).run(inputs)
    precision = float(poisoned.mask[before.flagged].float().mean())
    print(f"{case.case_id}: isolation + fine-tuning {time.perf_counter() - started:.0f} s; "
          f"{int(before.flagged.sum())} isolated, {precision:.2f} of them poisoned")

    def scores(model) -> str:
        r = runner.evaluate(model.eval(), data, attack, case.target)
        return "  ".join(f"{k} {100 * r[k]:6.2f}" for k in ("c_acc", "asr", "r_acc", "target_acc") if r[k] is not None)

    print(f"before unlearning: {scores(before.model)}")
    isolated = poisoned.split.subset(torch.nonzero(before.flagged).flatten())
    budget = inputs.retraining.with_(lr=abl.lr)
    variants = [(lr, False) for lr in args.lrs] + ([(lr, True) for lr in args.lrs] if args.frozen_bn else [])
    for lr, frozen in variants:
        model = copy.deepcopy(before.model)
        config = budget.with_(epochs=1, lr=lr, schedule="constant")
        for epoch in range(1, args.epochs + 1):
            fit(model, isolated, config, device=runner.device, seed=1000 + epoch,
                loss_fn=frozen_bn_ascent if frozen else ascent_loss, desc="unlearn")
            if epoch in MARKS or epoch == args.epochs:
                print(f"lr {lr:g} {'eval' if frozen else 'train'}-mode BN, epoch {epoch:2d}: {scores(model)}", flush=True)


if __name__ == "__main__":
    main()
