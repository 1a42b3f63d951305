"""CLP: Channel Lipschitzness-based Pruning (Runkai Zheng, Rongjun Tang, Jianze Li and Li Liu, "Data-free Backdoor
Removal based on Channel Lipschitzness", ECCV 2022).

The Lipschitz constant of the map from a layer's input to one output channel of a convolution followed by batch
norm is bounded by the channel's UCLC (upper bound of the channel Lipschitz constant): the largest singular value
of the channel's kernel, reshaped to a matrix [in_channels / groups, kh * kw], times the batch norm's scale
|gamma_k| / sqrt(running_var_k + eps). Backdoor channels, which the trigger drives hard, stand out with a large
UCLC. Within each conv + batch-norm pair, every channel whose UCLC exceeds ``mean + u * std`` of that layer's UCLCs
(std with Bessel's correction, as ``torch.std``) is pruned: its batch-norm weight and bias are set to 0, so the
channel outputs 0 before the activation. Nothing is trained and no data is read: the decision depends on the
weights alone, and the defender's clean subset is ignored.

Pairs: a ``BatchNorm2d`` is paired with the ``Conv2d`` registered last before it (module registration order,
``named_modules``), as in the authors' and BackdoorBench's code; that is the conv feeding it in post-activation
networks (ResNet, the torchvision models' conv-BN-activation blocks, ``cnn_small``). In pre-activation blocks
(``preact_resnet18``, DenseNet) a block's first batch norm normalises the block input, and the rule pairs it with
the previous block's last conv, as the reference does on its main model, PreAct-ResNet18. A model with no pair
(VGG-19 without BN, a model whose batch norms follow no conv) raises ``NotApplicable``.

Defaults: ``u`` 3 (the paper's default, the authors' code and BackdoorBench's config).

Departures, and why:
- The batch norm's scale divides by sqrt(running_var + eps), what the layer computes; the reference divides by
  sqrt(running_var). The UCLCs differ by a factor close to 1 except for a channel whose running variance is near 0,
  where the reference's bound is infinite (or NaN) and its layer's mean and std with it, so that layer prunes
  nothing; here the bound stays finite.
- A batch norm is paired only when the conv's output channels equal its channel count and it has affine weights
  and running statistics; the reference pairs every batch norm with the last conv and fails (an index error) or
  reads the wrong channels where they differ (DenseNet's pre-activation norms and transitions), and cannot prune
  a batch norm without weights. Such batch norms are skipped; the rest of the model is pruned as the reference.
  Every batch norm of cnn_small, preact_resnet18, mobilenet_v3_large and efficientnet_b3 is paired; of
  densenet161's 161, 83 are (the first norm of each dense layer, each transition's and the final one are not).
- BackdoorBench also sweeps u over 21 values in [0, 10] and reports test accuracy and ASR for each; that reads
  the test set, which a defense may not, and does not change the returned model (pruned with u = 3). Not done.
- The spectral norms are computed for all channels of a layer at once (``torch.linalg.matrix_norm``) on the
  model's device, not one SVD per channel on the CPU: the same values.
"""
from __future__ import annotations

import torch
from torch import nn

from backdoor._checks import check_number
from backdoor._registry import NONE, Param
from backdoor.defenses import NotApplicable, register_defense
from backdoor.defenses.base import Defense, DefenseInputs, DefenseOutcome, Stage
from backdoor.mutants import Mutant

NO_PAIR = "clp: the model has no convolution followed by batch norm (e.g. VGG-19 without BN)"


def conv_bn_pairs(net: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    """(batch-norm name, conv, batch norm) for every ``BatchNorm2d`` of ``net`` that follows a ``Conv2d`` in
    registration order, has as many channels as that conv has outputs, affine weights and running statistics."""
    pairs, conv = [], None
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = module
        elif isinstance(module, nn.BatchNorm2d) and conv is not None:
            if (conv.out_channels == module.num_features and module.affine
                    and module.running_var is not None):
                pairs.append((name, conv, module))
    return pairs


@torch.no_grad()
def channel_lipschitz_bounds(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC of every output channel k: the spectral norm of conv.weight[k] as a [in / groups, kh * kw] matrix,
    times |gamma_k| / sqrt(running_var_k + eps). float [out_channels], on the weights' device."""
    kernels = conv.weight.detach().flatten(2)  # [out, in / groups, kh * kw]
    spectral = torch.linalg.matrix_norm(kernels.float(), ord=2)
    scale = bn.weight.detach().float().abs() / torch.sqrt(bn.running_var.float() + bn.eps)
    return spectral * scale


@torch.no_grad()
def clp_prune(net: nn.Module, u: float) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """Zero the batch-norm weight and bias of every channel whose UCLC exceeds its layer's mean + u * std.

    Returns ({batch-norm name: pruned channel indices}, {batch-norm name: UCLCs}) over every conv + BN pair."""
    pairs = conv_bn_pairs(net)
    if not pairs:
        raise NotApplicable(NO_PAIR)
    scores = {name: channel_lipschitz_bounds(conv, bn) for name, conv, bn in pairs}
    pruned = {}
    for name, _conv, bn in pairs:
        lips = scores[name]
        limit = lips.mean() + u * lips.std()
        channels = (lips > limit).nonzero().flatten()
        bn.weight[channels] = 0.0
        bn.bias[channels] = 0.0
        pruned[name] = [int(c) for c in channels]
    return pruned, scores


@register_defense("clp")
class ChannelLipschitzPruning(Defense):
    """CLP: prune, per conv + batch-norm layer, the channels whose Lipschitz upper bound exceeds mean + u std."""

    kind = "model_repair"
    title = "CLP"
    description = ("data-free: per conv + batch-norm layer, the upper bound of each channel's Lipschitz constant (kernel"
                   " spectral norm x BN scale); zero the channels above mean + u std (u 3); `n/a` without batch norm")
    order = 53
    parameters = {
        "u": Param("3", "3", "the paper's default (also the authors' code); BackdoorBench's sweep over [0, 10] "
                   "reads test data and is not done"),
    }
    budgets = (
        Stage("(nothing trains: channels pruned from the weights alone, no data read)", NONE, "`u`"),
    )
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("prunes-below", "prunes the channels below mean - u std instead of those above mean + u std",
               "\n        channels = (lips > limit).nonzero().flatten()",
               "\n        channels = (lips < lips.mean() - u * lips.std()).nonzero().flatten()"),
        Mutant("no-bn-scale", "the UCLC is the kernel's spectral norm alone, without the batch norm's scale",
               "\n    return spectral * scale", "\n    return spectral"),
        Mutant("network-threshold", "mean and std over every channel of the network instead of per layer",
               "\n        limit = lips.mean() + u * lips.std()",
               "\n        every = torch.cat(list(scores.values()))"
               "\n        limit = every.mean() + u * every.std()"),
        Mutant("frobenius", "the Frobenius norm of the kernel instead of its spectral norm",
               "\n    spectral = torch.linalg.matrix_norm(kernels.float(), ord=2)",
               "\n    spectral = torch.linalg.matrix_norm(kernels.float(), ord='fro')"),
        Mutant("population-std", "the std without Bessel's correction (the reference uses torch.std's)",
               "\n        limit = lips.mean() + u * lips.std()",
               "\n        limit = lips.mean() + u * lips.std(correction=0)"),
        Mutant("keeps-bias", "pruned channels keep their batch-norm bias (they output a constant, not 0)",
               "\n        bn.bias[channels] = 0.0", "\n        pass"),
        Mutant("zeroes-nothing", "the pruned channels are found but their batch norm is left as it was",
               "\n        bn.weight[channels] = 0.0\n        bn.bias[channels] = 0.0",
               "\n        pass"),
        Mutant("reads-data", "passes the clean subset through the model in train mode first: the batch norms' "
               "running statistics, hence the UCLCs, then depend on data",
               "\n        model = inputs.model",
               "\n        model = inputs.model\n        model.train()(inputs.clean.x.float().div(255))"),
    )

    def __init__(self, u: float = 3.0):
        check_number("clp", "u", u, low=0, low_open=True)
        self.u = u

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        # inputs.clean is deliberately not read: CLP is data-free.
        model = inputs.model
        pruned, scores = clp_prune(model.net, self.u)
        info = {"u": self.u, "pruned_channels": sum(len(v) for v in pruned.values()),
                "total_channels": sum(len(s) for s in scores.values()), "layers": len(scores),
                "pruned_per_layer": {name: len(v) for name, v in pruned.items() if v},
                "pruned_indices": {name: v for name, v in pruned.items() if v},
                "uclc_max": max(float(s.max()) for s in scores.values())}
        return DefenseOutcome(model=model.eval(), info=info)
