"""FP: Fine-Pruning (Kang Liu, Brendan Dolan-Gavitt and Siddharth Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018).

Steps: (1) record the mean activation of each output channel of the last convolutional block
(``roles.last_conv``) on the defender's clean data; (2) prune the least active channels step by step,
``step_fraction`` = 1% of the channels at a time (at least one), until accuracy on the defender's validation
split drops by more than ``max_drop`` = 10% relative to the unpruned model; keep the last model under that
limit; (3) fine-tune it on the defender's clean subset with the defense budget, the pruned channels kept
silent throughout.

Defaults: ``step_fraction`` 0.01, ``max_drop`` 0.1 (Table 2's "tolerance of accuracy reduction"),
``val_fraction`` 0.2 of the defender's subset held out for the stopping rule, ``epochs``/``lr`` None (the
matrix's defense budget: batch 256, SGD lr 0.01, cosine).

How a channel is pruned, and why. The harness rebuilds the returned model as the plain architecture
(``new_model()`` + ``load_state_dict``), so the pruning must live in the model's own parameters, not in a
hook or an extra buffer. Zeroing the *producer* of a channel is not generic: the last block's output is a
residual sum in PreAct-ResNet and a concatenation in DenseNet. We therefore silence each pruned channel at its
*first consumer*: the first parameterised layer that runs after the last block (the head ``Linear`` after
pooling, VGG's first classifier ``Linear``, DenseNet's ``norm5``). A one-hot probe through the layers in
between (pooling, flatten, dropout: channel-preserving ops) maps every channel to the consumer's input
features it feeds; pruning zeroes those input columns of a ``Linear``/``Conv`` (exactly as if the channel
output were zero) or the weight and bias of a batch-norm consumer (its output for the channel is then zero).
The same parameter change is used during the search, in the kept model and, re-applied after every optimiser
step, during fine-tuning, so what was validated is what is returned.

Departures from the original BackdoorBench code: the number of pruned channels is chosen on a validation
split of the defender's data, never on test accuracy or test ASR; the kept model is a fresh copy pruned to the
chosen depth (the original keeps a reference to the model it went on pruning, i.e. the over-pruned one);
pruning is expressed as zeroed parameters of the unchanged architecture instead of per-architecture surgery
that rebuilds smaller layers (the pruned model computes the same function, and the harness can reload it);
activations are recorded on the training part of the defender's split, and fine-tuning uses the whole
defender's subset.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from backdoor._checks import ParameterError
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.data import Split
from backdoor.defenses import NotApplicable, register_defense
from backdoor.defenses.base import (BY_DEFENSE_TRAINING, Defense, DefenseInputs, DefenseOutcome, Stage,
                                   split_validation)
from backdoor.models import roles
from backdoor.mutants import Mutant
from backdoor.training import TrainHooks, predict


@torch.no_grad()
def mean_channel_activation(model: nn.Module, x: torch.Tensor, *, device: torch.device,
                            batch_size: int = 256) -> torch.Tensor:
    """Mean output of each channel of the last conv block over images and positions: float [C] (CPU)."""
    model.to(device).eval()
    name = model.roles.last_conv
    total, count = None, 0
    with roles.capture_outputs(model, [name]) as store:
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device).float().div_(255)
            model(xb)
            out = store[name].float()
            part = out.transpose(0, 1).flatten(1).sum(1)
            total = part if total is None else total + part
            count += out.numel() // out.shape[1]
    return (total / count).cpu()


class _StopForward(Exception):
    """Raised by the probe once the consumer's input is captured: nothing after it needs computing."""


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


@dataclass
class ChannelSilencer:
    """Silences output channels of the last conv block by zeroing parameters of their first consumer.

    ``features[c]`` are the indices, along the consumer's input-feature axis, fed by channel ``c``.
    """

    consumer_name: str
    consumer_kind: str  # "linear", "conv" or "batchnorm"
    num_channels: int
    features: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def probe(cls, model: nn.Module, image: torch.Tensor, chunk: int = 256) -> "ChannelSilencer":
        """Find the consumer of ``roles.last_conv``'s output and map its channels to the consumer's inputs.

        ``image``: one float [1, C, H, W] input in [0, 1] on the model's device.
        """
        model.eval()
        block_name = model.roles.last_conv
        block = roles.last_conv(model)
        state: dict = {"after": False, "consumer": None, "probe": None, "captured": None}
        inside = {id(m) for m in block.modules()}

        def block_hook(_m, _inp, out):
            if not isinstance(out, torch.Tensor):
                raise NotApplicable(f"fp: the output of last_conv {block_name!r} is not a single tensor")
            state["after"] = True
            state["shape"] = out.shape
            return state["probe"] if state["probe"] is not None else out

        def consumer_hook(name):
            def hook(_m, args):
                if not state["after"]:
                    return
                if state["consumer"] is None:
                    state["consumer"] = name
                if state["consumer"] == name and state["captured"] is None:
                    state["captured"] = args[0].detach().clone()
                    raise _StopForward
            return hook

        handles = [block.register_forward_hook(block_hook)]
        for name, module in model.net.named_modules():
            if id(module) not in inside and _has_own_params(module):
                handles.append(module.register_forward_pre_hook(consumer_hook(name)))

        def run() -> None:
            try:
                model(image)
            except _StopForward:
                pass

        try:
            run()  # find the consumer and the block's output shape
            if state["consumer"] is None:
                raise NotApplicable(f"fp: no parameterised layer runs after last_conv {block_name!r}")
            _, channels, *spatial = state["shape"]
            consumer = model.net.get_submodule(state["consumer"])

            def consumer_input(probe: torch.Tensor) -> torch.Tensor:
                state.update(after=False, probe=probe, captured=None)
                run()
                if state["captured"] is None:
                    raise NotApplicable(f"fp: consumer {state['consumer']!r} did not run on the probe")
                return state["captured"]

            base = consumer_input(torch.zeros(1, channels, *spatial, device=image.device))
            features = []
            for start in range(0, channels, chunk):
                idx = torch.arange(start, min(channels, start + chunk), device=image.device)
                probe = torch.zeros(len(idx), channels, *spatial, device=image.device)
                probe[torch.arange(len(idx)), idx] = 1.0
                diff = (consumer_input(probe) - base).abs()
                if diff.dim() > 2:
                    diff = diff.flatten(2).amax(2)
                features += [row.nonzero().flatten().cpu() for row in diff > 1e-6]
        finally:
            for h in handles:
                h.remove()
        counts = torch.zeros(base.shape[1], dtype=torch.long)
        for f in features:
            counts[f] += 1
        if any(len(f) == 0 for f in features) or bool((counts > 1).any()):
            raise NotApplicable(f"fp: the path from last_conv {block_name!r} to {state['consumer']!r} does not "
                                "keep channels apart; cannot silence single channels")
        if isinstance(consumer, nn.Linear):
            kind = "linear"
        elif isinstance(consumer, nn.modules.conv._ConvNd) and consumer.groups == 1:
            kind = "conv"
        elif isinstance(consumer, nn.modules.batchnorm._BatchNorm):
            kind = "batchnorm"
        else:
            raise NotApplicable(f"fp: cannot silence channels at a {type(consumer).__name__} consumer "
                                f"({state['consumer']!r})")
        return cls(state["consumer"], kind, channels, features)

    def zeroed_entries(self, model: nn.Module, channels: torch.Tensor) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        """(parameter, dim, indices along dim) to hold at zero for silencing ``channels`` in ``model``."""
        consumer = model.net.get_submodule(self.consumer_name)
        if len(channels) == 0:
            return []
        feats = torch.cat([self.features[int(c)] for c in channels]).to(consumer.weight.device)
        if self.consumer_kind in ("linear", "conv"):
            return [(consumer.weight, 1, feats)]  # the input columns the channels feed
        return [(p, 0, feats) for p in (consumer.weight, consumer.bias) if p is not None]

    @torch.no_grad()
    def silence(self, model: nn.Module, channels: torch.Tensor) -> None:
        for p, dim, index in self.zeroed_entries(model, channels):
            p.index_fill_(dim, index, 0.0)


class _KeepSilent(TrainHooks):
    """Re-zero the silenced entries after every optimiser step of the fine-tuning."""

    def __init__(self, entries: list[tuple[nn.Parameter, int, torch.Tensor]]):
        self.entries = entries

    @torch.no_grad()
    def after_step(self) -> None:
        for p, dim, index in self.entries:
            p.index_fill_(dim, index, 0.0)


def accuracy(model: nn.Module, split: Split, device: torch.device) -> float:
    return float((predict(model, split.x, device=device) == split.y).float().mean())


def prune_search(model: nn.Module, silencer: ChannelSilencer, order: torch.Tensor, val: Split, *,
                 device: torch.device, step: int, max_drop: float) -> tuple[nn.Module, dict]:
    """Prune ``order`` (least active first) ``step`` channels at a time on a working copy while validation
    accuracy stays >= (1 - max_drop) * the unpruned accuracy; return a fresh copy of ``model`` pruned to the
    last depth under the limit, and the search trace."""
    base = accuracy(model, val, device)
    limit = (1.0 - max_drop) * base
    work = copy.deepcopy(model)
    kept, kept_acc, next_acc, trace = 0, base, None, [(0, base)]
    while kept < len(order):
        depth = min(len(order), kept + step)
        silencer.silence(work, order[kept:depth])
        acc = accuracy(work, val, device)
        trace.append((depth, acc))
        if acc < limit:
            next_acc = acc
            break
        kept, kept_acc = depth, acc
    del work
    pruned = copy.deepcopy(model)
    silencer.silence(pruned, order[:kept])
    info = {"val_acc_before": base, "val_acc_limit": limit, "val_acc_pruned": kept_acc,
            "val_acc_next": next_acc, "pruned_channels": kept, "trace": trace}
    return pruned, info


@register_defense("fp")
class FinePruning(Defense):
    """FP: prune the last conv block's least active channels (validation-limited), then fine-tune."""

    kind = "model_repair"
    title = "FP"
    description = ("prune the last conv block's least active channels 1% at a time until validation accuracy drops 10% "
                   "(relative), keep a copy of the last model under the limit, fine-tune")
    order = 20
    parameters = {
        "step_fraction": Param(NONE, "1% of the channels per step", "as the reference"),
        "max_drop": Param("10% (relative)", "picked with test accuracy and test ASR", "Table 2's tolerance, checked "
                          "on a validation split of the defender's data: a defense never sees the test set"),
        "val_fraction": Param(NONE, "— (test set)", "share of the defender's subset held out for the stopping rule"),
        "epochs": Param("100", NOT_STATED, f"None: {BY_DEFENSE_TRAINING}"),
        "lr": Param(NONE, NOT_STATED, f"None: {BY_DEFENSE_TRAINING}"),
    }
    budgets = (
        Stage("pruning search", "own parameters", "`step_fraction`, `max_drop`, `val_fraction` (no training)"),
        Stage("fine-tune the pruned model", "defense_training", "`epochs`, `lr`"),
    )
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("prunes-nothing", "the kept model has no channel silenced (the search still reports its depth)",
               "\n    silencer.silence(pruned, order[:kept])", "\n    silencer.silence(pruned, order[:0])"),
        Mutant("most-active-first", "prunes the most active channels first instead of the least active",
               "\n        order = torch.sort(activation, stable=True).indices",
               "\n        order = torch.sort(activation, descending=True, stable=True).indices"),
        Mutant("not-kept-silent", "fine-tuning lets the pruned channels come back",
               "\n        for p, dim, index in self.entries:", "\n        for p, dim, index in []:"),
    )

    def __init__(self, step_fraction: float = 0.01, max_drop: float = 0.1, val_fraction: float = 0.2,
                 epochs: int | None = None, lr: float | None = None):
        if not 0 < step_fraction <= 1:
            raise ParameterError("fp", "step_fraction", step_fraction, "a value in (0, 1]")
        if not 0 <= max_drop < 1:
            raise ParameterError("fp", "max_drop", max_drop, "a value in [0, 1)")
        if not 0 < val_fraction < 1:
            raise ParameterError("fp", "val_fraction", val_fraction, "a value in (0, 1)")
        if epochs is not None and epochs < 0:
            raise ParameterError("fp", "epochs", epochs, "a value >= 0")
        if lr is not None and lr <= 0:
            raise ParameterError("fp", "lr", lr, "a value > 0")
        self.step_fraction, self.max_drop, self.val_fraction = step_fraction, max_drop, val_fraction
        self.epochs, self.lr = epochs, lr

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        device = inputs.device
        model = inputs.model.to(device).eval()
        train, val = split_validation(inputs.clean, self.val_fraction, inputs.seed)
        activation = mean_channel_activation(model, train.x, device=device)
        order = torch.sort(activation, stable=True).indices  # least active first
        silencer = ChannelSilencer.probe(model, train.x[:1].to(device).float().div(255))
        step = max(1, int(self.step_fraction * silencer.num_channels))
        pruned, info = prune_search(model, silencer, order, val, device=device, step=step, max_drop=self.max_drop)
        config = inputs.training.with_(epochs=self.epochs, lr=self.lr)
        channels = order[:info["pruned_channels"]]
        hooks = _KeepSilent(silencer.zeroed_entries(pruned, channels))
        inputs.fit(pruned, inputs.clean, config, seed=inputs.seed, hooks=hooks, desc="fp fine-tune")
        info.update(total_channels=silencer.num_channels, step=step, consumer=silencer.consumer_name,
                    pruned_channel_ids=[int(c) for c in channels], epochs=config.epochs,
                    trace=[[d, a] for d, a in info["trace"]])
        return DefenseOutcome(model=pruned, info=info)
