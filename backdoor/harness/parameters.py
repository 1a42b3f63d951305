"""Every method parameter beside the paper's value, the reference code's and ours (``backdoor params``).

- paper: BackdoorBench's supplementary Tables 1 (attacks) and 2 (defenses), including their general settings
  (in the text conversion Table 1's rows are shifted: LC's PGD takes the eps of 8, SIG the f of 6).
- reference: the public BackdoorBench code, as the method docstrings quote it.
- ours: the default of the registered class's ``__init__`` signature, read here with ``inspect``, so the table
  cannot drift from the code.
- why: where ours differs, the reason (from the method's docstring); where it agrees, where it comes from.

``PAPER_AND_REFERENCE`` declares (paper, reference, why) for each (method, parameter); NONE ("—") marks a
source that gives no value, NOT_STATED one whose value the docstrings do not quote. A why that argues for one
value carries that value as a fourth element, so that a changed default fails the tests until its why is
revisited. ``DEFENSE_BUDGETS``
declares which training budget each defense stage uses: the matrix's ``defense_training`` (``inputs.training``),
the defense's own parameters, or the attack's budget (``inputs.retraining``, the matrix's ``training``) for
training from scratch on the poisoned set. The tests fail when a parameter is added without a row, when a
row names a parameter that does not exist, when a why argues for another default, and when README.md's block is
not the generated table.
"""
from __future__ import annotations

import difflib
import inspect
import textwrap
from typing import Any

NONE = "—"
NOT_STATED = "not stated"
GENERIC = ("self", "target", "cap_ratio")  # shared by every attack: not listed
START, END = "<!-- parameters:start -->", "<!-- parameters:end -->"
COMMAND = "backdoor params --write README.md"

_DEF = "the matrix's `defense_training`"
_ATT = "the attack's budget (`retraining`)"

PAPER_AND_REFERENCE: dict[str, dict[str, tuple]] = {  # (paper, reference, why[, the default the why argues for])
    # ---------------------------------------------------------------------------------------- attacks
    "badnets": {
        "size": ("3x3, no margin (enlarged on Tiny ImageNet)", NOT_STATED,
                 "None scales the side with the image: round(3 H / 32), 3x3 on 32x32, 6x6 on 64x64"),
        "value": ("pure white", NOT_STATED, "Table 1 (255 = white)"),
    },
    "blended": {
        "alpha": ("0.2", NOT_STATED, "Table 1; the blend is rounded to the nearest grey level (the reference "
                  "truncates)"),
        "pattern": ("hello kitty", "hello kitty image, resized with PIL",
                    "the cartoon cannot be shipped: seeded uniform noise by default; any image path is accepted "
                    "and resized as PIL does"),
        "pattern_seed": (NONE, NONE, "seed of the noise pattern"),
    },
    "sig": {
        "delta": ("40", NOT_STATED, "Table 1; rounded to the nearest grey level (the reference truncates)"),
        "frequency": ("6", NOT_STATED, "Table 1"),
        "test_delta": (NONE, "the training delta", "None: the training delta, as the reference; Barni et al. "
                       "treat the test amplitude as a separate knob"),
    },
    "lc": {
        "eps": ("8 (/255)", NOT_STATED, "Table 1; 16/255 is the other budget used in the literature"),
        "step_size": ("1.5 (/255)", NOT_STATED, "Table 1"),
        "steps": ("100", NOT_STATED, "Table 1"),
        "reference": (NONE, NOT_STATED, "the case's clean model, shared with the clean reference row (no extra "
                      "training); Turner et al.'s adversarially trained model is `adversarial`"),
        "adv_epochs": (NONE, NONE, "`adversarial` only: None trains the reference model for the case's epochs"),
        "adv_steps": (NONE, NONE, "`adversarial` only: PGD steps of Madry et al.'s adversarial training"),
        "size": (NONE, NOT_STATED, "None scales the 3x3 corner boards with the image, as BadNets"),
        "amplitude": (NONE, "255 (corners overwritten)", "as the reference; lower values give Turner et al.'s "
                      "reduced-amplitude trigger"),
    },
    "lf": {
        "samples": ("100", NOT_STATED, "Table 1 (N_sample)"),
        "max_passes": ("50", NOT_STATED, "Table 1 (T_ter)"),
        "overshoot": ("0.02", NOT_STATED, "Table 1"),
        "max_iter": ("200", NOT_STATED, "Table 1 (T_df)"),
        "fooling_rate": ("0.2", "label-change rate on a held-out set (10 images per class)",
                         "Table 1's value on the targeted rate (share of the UAP's samples sent to the target), "
                         "the stricter rate for an all-to-one attack"),
        "bound": (NONE, "min-max rescale to [0, 0.2] of the pixel range",
                  "max |delta| = 0.2 of the range, sign kept and no brightness offset (a uniform scale keeps "
                  "the spectrum's shape)"),
        "kernel_size": (NONE, "30 taps (gauss_smooth.py)", "an odd length keeps the kernel centred (30 taps "
                        "shift the image by half a pixel); same magnitude response", 31),
        "sigma": (NONE, "6 px (gauss_smooth.py sig=6)", "the reference filter", 6.0),
        "deepfool_batch": (NONE, "1 (sequential)", "DeepFool on 10 images at once from the same v (a "
                           "Jacobi-style update); 1 is the sequential original"),
    },
    "ssba": {
        "code_length": ("1 (encoded bit)", "— (ships precomputed poisoned data)", "Table 1"),
        "code_seed": (NONE, NONE, "draws the fixed code's bits"),
        "steps": ("140000", "— (precomputed data)", "Table 1's autoencoder train steps; we train the encoder "
                  "ourselves, as the reference's poisoned datasets are its most-reported missing resource"),
        "batch_size": (NONE, "— (StegaStamp: 4)", "with lr 1e-3 for our much smaller nets"),
        "lr": (NONE, "— (StegaStamp: 1e-4)", "our much smaller nets train at 1e-3 (batch 32)"),
        "width": (NONE, NONE, "our small U-Net's base width"),
        "max_residual": (NONE, NONE, "L-inf bound of the residual (pixel range [0, 1])"),
        "image_weight": (NONE, NONE, "sets the residual's size: at 1, PSNR ~31 dB, near StegaStamp's 27-30 dB"),
        "code_weight": (NONE, NONE, "weight of the code's BCE"),
        "clean_weight": (NONE, NONE, "ours: pushes the decoder to 1/2 on clean images, so that every code, "
                         "including the fixed one, leaves a trace"),
        "texture_floor": (NONE, NONE, "perceptual mask s / (s + floor): keeps the residual sample-specific "
                          "(replaces StegaStamp's LPIPS and critic losses)"),
    },
    "inputaware": {
        "channels": (NONE, "32-64-128 (MNIST: 16-32)", "as the reference; `[16, 32]` for its MNIST variant"),
        "mask_density": ("0.032", NOT_STATED, "Table 1"),
        "lambda_norm": ("400", "100 (config)", "the value the code runs with (also the Input-aware authors' "
                        "default); `lambda_norm: 400` follows the table", 100.0),
        "lambda_div": ("1", NOT_STATED, "Table 1"),
        "lr_G": ("0.01", NOT_STATED, "Table 1; G's milestones (200-500) lie beyond any budget, so constant"),
        "lr_M": ("0.01", NOT_STATED, "Table 1; decay x0.1 at 40% and 80% of the mask epochs (Table 1's 10 and "
                 "20 of 25)"),
        "mask_epochs": ("25", "25, inside the classifier's 100 (classifier 75)", "extra attacker compute: the "
                        "classifier trains for the case's full epochs, like every other attack"),
        "mask_batch_size": (NONE, NOT_STATED, "Table 1's general batch 128; smaller on small data sets"),
        "cross_ratio": ("1", NOT_STATED, "Table 1"),
        "crop_padding": (NONE, "5, parsed but never applied", "the Input-aware authors' loader applies it (per "
                         "sample, before poisoning), and every other attack trains augmented; 0 turns it off"),
        "rotation": (NONE, "10 degrees, parsed but never applied", "the Input-aware authors' loader applies it "
                     "(RandomRotation(10), not on MNIST); 0 turns it off"),
    },
    "wanet": {
        "k": (NONE, NOT_STATED, "WaNet paper (Nguyen & Tran)"),
        "s": (NONE, NOT_STATED, "WaNet paper (Nguyen & Tran)"),
        "grid_rescale": ("1", NOT_STATED, "Table 1"),
        "cross_ratio": ("2", NOT_STATED, "Table 1"),
        "field_seed": (NONE, NOT_STATED, "the warping field is drawn from this seed (the same every time)"),
        "crop_padding": (NONE, "5", "the reference's batch augmentation (PostTensorTransform): every coin, offset "
                         "and angle drawn once per batch, for the whole batch"),
        "p_crop": (NONE, "0.8", "as the reference"),
        "rotation": (NONE, "10 degrees (nearest-neighbour)", "as the reference, sampled bilinearly"),
        "p_rotation": (NONE, "0.5", "as the reference"),
    },
    # --------------------------------------------------------------------------------------- defenses
    "ft": {
        "epochs": ("100", NOT_STATED, f"None: {_DEF}"),
        "lr": (NONE, NOT_STATED, f"None: {_DEF}"),
    },
    "fp": {
        "step_fraction": (NONE, "1% of the channels per step", "as the reference"),
        "max_drop": ("10% (relative)", "picked with test accuracy and test ASR", "Table 2's tolerance, checked "
                     "on a validation split of the defender's data: a defense never sees the test set"),
        "val_fraction": (NONE, "— (test set)", "share of the defender's subset held out for the stopping rule"),
        "epochs": ("100", NOT_STATED, f"None: {_DEF}"),
        "lr": (NONE, NOT_STATED, f"None: {_DEF}"),
    },
    "nad": {
        "betas": ("500, 1000, 1000", "third map is 1x1 (its term is always 0)", "Table 2, on three maps with "
                  "spatial extent"),
        "power": ("2.0", NOT_STATED, "Table 2"),
        "teacher_epochs": ("10", NOT_STATED, "Table 2 (E_ft)"),
        "teacher_lr": (NONE, NOT_STATED, f"None: {_DEF}"),
        "epochs": ("100", NOT_STATED, f"None: {_DEF}"),
        "lr": (NONE, "0.01, then 1e-4 from epoch 20 (wd 1e-4)", f"None: {_DEF} (SGD 0.01, wd 5e-4, cosine), "
               "one schedule for every repair defense, so NAD differs from FT by its attention term only"),
    },
    "nc": {
        "epochs": ("80", NOT_STATED, "Table 2 (E_r)"),
        "init_cost": (NONE, NOT_STATED, "NC's adaptive cost (METHODS.md)"),
        "cost_up": (NONE, NOT_STATED, "NC's adaptive cost (METHODS.md)"),
        "cost_down": (NONE, NOT_STATED, "NC's adaptive cost (METHODS.md): 2^1.5"),
        "patience": (NONE, NOT_STATED, "NC's adaptive cost (METHODS.md)"),
        "threshold": (NONE, NOT_STATED, "attack success a reversed trigger must reach (METHODS.md)"),
        "lr": (NONE, NOT_STATED, "Adam (betas 0.5, 0.9) on mask and pattern"),
        "batch_size": (NONE, "256", "the reference's reversal batch (the smoke and quick matrices, with a "
                       "72-image defender's subset, pin 16)", 256),
        "anomaly_threshold": (NONE, NOT_STATED, "NC paper: anomaly index > 2"),
        "unlearn_ratio": ("0.2", NOT_STATED, "Table 2"),
        "max_batch": (NONE, NONE, "memory only: images per forward pass over all classes (the result does not "
                      "depend on it)"),
        "early_stop": (NONE, NOT_STATED, "a class stops once its cost moved both ways and its best L1 stopped "
                       "improving by 1% for `early_stop_patience` epochs"),
        "early_stop_patience": (NONE, "25", "the reference's (was 2 x patience = 10; the smoke and quick "
                                "matrices pin 10)", 25),
        "epochs_unlearn": ("100", NOT_STATED, f"None: {_DEF}"),
        "lr_unlearn": (NONE, NOT_STATED, f"None: {_DEF}"),
        "reset_cost_to_zero": (NONE, "False (starts at init_cost)", "True: the NC authors' visualizer "
                               "(RESET_COST_TO_ZERO = True) starts every class's cost at 0 and sets init_cost "
                               "after `patience` successful epochs", True),
    },
    "anp": {
        "iterations": ("2000", NOT_STATED, "Table 2 (e_i)"),
        "eps": ("0.4", "noise unclipped after the ascent step", "Table 2; unclipped as the reference and ANP's "
                "code (it reaches 2 eps)"),
        "alpha": ("0.2", NOT_STATED, "Table 2"),
        "mask_lr": (NONE, "0.01", "the ANP authors' code (0.2), the rate the paper's threshold was chosen with",
                    0.2),
        "threshold": ("— (tolerance 10%)", "also prunes by number or fraction chosen on test data",
                      "the ANP paper's fixed threshold; a tolerance needs accuracy the defense may not see"),
        "noise_steps": (NONE, NOT_STATED, "one signed ascent step of eps"),
        "batch_size": (NONE, NOT_STATED, "None: the defense budget's (256); ANP's code uses 128"),
        "batch_stats": (NONE, NOT_STATED, "normalise with batch statistics, as ANP's code (masks optimised in "
                        "train mode)"),
    },
    "ac": {
        "rule": (NONE, "`smaller`: the smaller cluster of every label is flagged", "Chen et al.'s exclusionary "
                 "reclassification, the only rule that does not assume the poison is a minority of its label "
                 "(about 53% of the target label at ratio 0.1 on 10 classes); `relative_size` is the other",
                 "exclusionary"),
        "reduction": (NONE, "PCA", "ICA, as Chen et al.; `pca` is the reference's reduction"),
        "n_components": ("10", NOT_STATED, "Table 2"),
        "size_threshold": (NONE, "— (`smaller`: always; 0.5 reproduces it)", "`relative_size` only: Chen et "
                           "al.'s relative size, the default of the authors' ART code"),
        "exclusion_threshold": (NONE, "— (no exclusionary reclassification)", "`exclusionary` only: a cluster is "
                                "poisoned when l / p is below it; 1 is the value Chen et al. found reasonable"),
        "max_tested_share": (NONE, NONE, "`exclusionary` only, ours: a cluster holding more than 2/3 of its "
                             "label is not tested (without it too little of the label is left to learn)"),
        "epochs": (NONE, NOT_STATED, f"None: {_ATT}, retraining from scratch"),
    },
    "spectral": {
        "eps": ("85th percentile (15% removed)", "fixed 85th percentile of scores of the flattened last-block "
                "output (augmented, uncentred)", "Tran et al.'s 1.5 eps per label (15% at 0.1), on the centred "
                "penultimate features without augmentation (Tran et al. centre)"),
        "epochs": (NONE, NOT_STATED, f"None: {_ATT}, retraining from scratch"),
    },
    "abl": {
        "isolation_epochs": ("20", NOT_STATED, "Table 2 (E_tu)"),
        "isolation_ratio": ("0.01", NOT_STATED, "Table 2 (p_i)"),
        "gamma": ("0.5", NOT_STATED, "Table 2 (flooding)"),
        "finetune_epochs": ("60", NOT_STATED, "Table 2 (E_ft)"),
        "unlearn_epochs": ("20", NOT_STATED, "Table 2 (E_u); the ABL authors' code unlearns 5 epochs (the first "
                           "evaluation only) at batch 64"),
        "unlearn_lr": ("0.0005", "1e-4 for 20 epochs (hard-coded; its config says 5e-4)", "what both reference "
                       "codes run: the ABL authors' code does 4 epochs at 5e-4, and 20 x 1e-4 = 4 x 5e-4; at 5e-4 "
                       "for 20 epochs the smoke grid lost its clean accuracy. `unlearn_lr: 5e-4` is Table 2's",
                       1e-4),
        "lr": (NONE, "batch 256, lr 0.01 (the defense budget); fine-tune 0.01, 0.001 after 40 epochs",
               f"None: {_ATT}: both stages are full training runs on the poisoned set"),
    },
    "dbd": {
        "simclr_epochs": ("100", "100", "Table 2 (E_se)"),
        "simclr_batch_size": ("512", "512", "Table 2 (B_self)"),
        "simclr_lr": (NONE, "0.4 (SGD, wd 1e-4, cosine)", "DBD's SimCLR config"),
        "temperature": (NONE, NOT_STATED, "SimCLR temperature (METHODS.md)"),
        "projection_dim": (NONE, NOT_STATED, "output of the projection MLP"),
        "warmup_epochs": ("10", NOT_STATED, "Table 2 (E_wa)"),
        "warmup_batch_size": (NONE, NOT_STATED, "head warm-up batch"),
        "warmup_lr": (NONE, "Adam 0.002, no schedule", f"None: {_DEF}: the one trainer's SGD"),
        "sce_alpha": (NONE, NOT_STATED, "symmetric cross entropy: weight of CE"),
        "sce_beta": (NONE, NOT_STATED, "symmetric cross entropy: weight of reverse CE"),
        "epsilon": ("0.5", NOT_STATED, "Table 2: the lowest-loss half keeps its labels"),
        "mixmatch_epochs": (NONE, "100 epochs x 1,024 iterations", "passes over the labelled half (the one "
                            "trainer's epoch); about a third of the reference's steps on CIFAR-10, kept while the "
                            "DBD budget is studied", 190),
        "mixmatch_batch_size": ("128 (B_semi)", NOT_STATED, "Table 2; labelled batch, as many unlabelled images "
                                "(the smoke matrix pins 64)", 128),
        "mixmatch_lr": (NONE, "Adam 0.002, no schedule", f"None: {_DEF}: the one trainer's SGD"),
        "lambda_u": (NONE, NOT_STATED, "MixMatch unlabelled weight, ramped up over all epochs"),
        "sharpen_temperature": (NONE, NOT_STATED, "MixMatch label sharpening"),
        "augmentations": (NONE, NOT_STATED, "MixMatch views per unlabelled image (K)"),
        "mixup_alpha": (NONE, NOT_STATED, "MixMatch's Beta(alpha, alpha)"),
    },
}

# defense -> (stage, budget, what its own parameters change). Budgets: "defense_training" (inputs.training),
# "retraining" (inputs.retraining: the attack's budget), "own parameters" (no TrainConfig at all).
DEFENSE_BUDGETS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "none": (("(nothing trains)", NONE, NONE),),
    "ft": (("fine-tune on the clean subset", "defense_training", "`epochs`, `lr`"),),
    "fp": (("pruning search", "own parameters", "`step_fraction`, `max_drop`, `val_fraction` (no training)"),
           ("fine-tune the pruned model", "defense_training", "`epochs`, `lr`")),
    "nad": (("teacher fine-tune", "defense_training", "`teacher_epochs`, `teacher_lr`"),
            ("student distillation", "defense_training", "`epochs`, `lr`")),
    "nc": (("trigger reversal (Adam)", "own parameters",
            "`epochs`, `batch_size`, `lr` and the cost / patience parameters"),
           ("unlearning fine-tune", "defense_training", "`epochs_unlearn`, `lr_unlearn`")),
    "anp": (("mask optimisation (SGD on masks)", "own parameters",
             "`iterations`, `mask_lr`, `batch_size` (None: `defense_training`'s); crop/flip from "
             "`defense_training`"),),
    "ac": (("`exclusionary`: two reclassification models, each trained without one cluster of every label",
            "retraining", "`epochs`"),
           ("retrain from scratch on the unflagged samples", "retraining", "`epochs`")),
    "spectral": (("retrain from scratch on the unflagged samples", "retraining", "`epochs`"),),
    "abl": (("isolation (flooding loss, no augmentation)", "retraining", "`isolation_epochs`, `lr`"),
            ("fine-tune on the rest", "retraining", "`finetune_epochs`, `lr`"),
            ("unlearning (gradient ascent, constant schedule)", "retraining", "`unlearn_epochs`, `unlearn_lr`")),
    "dbd": (("SimCLR backbone (wd 1e-4, cosine)", "defense_training",
             "`simclr_epochs`, `simclr_batch_size`, `simclr_lr`"),
            ("SCE warm-up of the head", "defense_training", "`warmup_epochs`, `warmup_batch_size`, `warmup_lr`"),
            ("MixMatch fine-tune", "defense_training", "`mixmatch_epochs`, `mixmatch_batch_size`, `mixmatch_lr`")),
}
BUDGETS = ("defense_training", "retraining", "own parameters", NONE)


def _registries():
    from backdoor.attacks import ATTACKS
    from backdoor.defenses import DEFENSES

    return {"attack": ATTACKS, "defense": DEFENSES}


def signature_defaults(cls) -> dict[str, Any]:
    """The keyword parameters of every ``__init__`` of ``cls``'s hierarchy, in signature order (the class's
    own first), with their defaults (``inspect.Parameter.empty`` where required); generic ones left out."""
    out: dict[str, Any] = {}
    for klass in cls.__mro__[:-1]:
        if "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():  # follows the type-check wrapper
            if p.name not in GENERIC and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                out.setdefault(p.name, p.default)
    return out


def format_value(value: Any) -> str:
    """A default as the table shows it: floats in 6 significant digits, sequences as tuples."""
    if value is inspect.Parameter.empty:
        return "(required)"
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(format_value(v) for v in value) + ")"
    return str(value)


def methods() -> list[tuple[str, str, type]]:
    """(family, name, class) of every registered attack and defense, in registry order."""
    return [(family, name, registry.get(name)) for family, registry in _registries().items()
            for name in registry.names()]


def declaration_problems() -> list[str]:
    """Parameters without a row, rows naming no parameter, methods without a budget declaration, unknown
    budgets: one line each (empty when the declarations are complete)."""
    problems = []
    registered = {name for _, name, _ in methods()}
    for family, name, cls in methods():
        params = set(signature_defaults(cls))
        declared = set(PAPER_AND_REFERENCE.get(name, {}))
        problems += [f"{name}.{p}: parameter without a row in backdoor/harness/parameters.py PAPER_AND_REFERENCE"
                     for p in sorted(params - declared)]
        problems += [f"{name}.{p}: row in backdoor/harness/parameters.py names no parameter of {cls.__name__}"
                     for p in sorted(declared - params)]
        if family == "defense" and name not in DEFENSE_BUDGETS:
            problems.append(f"{name}: defense without a DEFENSE_BUDGETS entry in backdoor/harness/parameters.py")
    problems += [f"{r['method']}.{r['parameter']}: its why argues for {r['why_for']!r} but the default is now "
                 f"{r['default']!r}; update the row in backdoor/harness/parameters.py"
                 for r in parameter_rows() if r["why_for"] is not inspect.Parameter.empty
                 and r["why_for"] != r["default"]]
    problems += [f"{name}: declared in backdoor/harness/parameters.py but not registered"
                 for name in sorted(set(PAPER_AND_REFERENCE) | set(DEFENSE_BUDGETS)) if name not in registered]
    problems += [f"{name}: unknown budget {budget!r} (allowed: {', '.join(BUDGETS)})"
                 for name, stages in DEFENSE_BUDGETS.items() for _, budget, _ in stages if budget not in BUDGETS]
    return problems


def parameter_rows() -> list[dict]:
    """One dict per (method, parameter) of every registered method: family, method, parameter, paper,
    reference, ours (formatted), default (the signature's value), why and why_for (the default the why argues
    for, where the declaration names one; else ``inspect.Parameter.empty``). An undeclared parameter gets
    "UNDECLARED" cells (the tests fail on it); a declared parameter that does not exist gets no row."""
    rows = []
    for family, name, cls in methods():
        declared = PAPER_AND_REFERENCE.get(name, {})
        for param, default in signature_defaults(cls).items():
            paper, reference, why, *argued = declared.get(param, ("UNDECLARED",) * 3)
            rows.append({"family": family, "method": name, "parameter": param, "paper": paper,
                         "reference": reference, "ours": format_value(default), "default": default, "why": why,
                         "why_for": argued[0] if argued else inspect.Parameter.empty})
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def render_parameter_table() -> str:
    """The README block: attacks' and defenses' parameter tables and the defenses' training budgets."""
    rows = parameter_rows()
    header = ["parameter", "paper (Tables 1-2)", "reference (BackdoorBench)", "ours", "why"]
    lines = ["<!-- generated by `backdoor params` from backdoor/harness/parameters.py and the methods' signatures;",
             f"     do not edit by hand: run `{COMMAND}` -->", ""]
    for family, title in (("attack", "Attacks"), ("defense", "Defenses")):
        lines += [f"**{title}** (generic parameters `target`, `cap_ratio` left out)" if family == "attack"
                  else f"**{title}**", ""]
        body = [[f"`{r['method']}.{r['parameter']}`", r["paper"], r["reference"], f"`{r['ours']}`", r["why"]]
                for r in rows if r["family"] == family]
        lines += _table(header, body) + [""]
    budget_rows = []
    from backdoor.defenses import DEFENSES
    for name in DEFENSES.names():
        for stage, budget, own in DEFENSE_BUDGETS.get(name, (("UNDECLARED", "UNDECLARED", "UNDECLARED"),)):
            shown = f"`{budget}`" if budget in ("defense_training", "retraining") else budget
            budget_rows.append([f"`{name}`", stage, shown, own])
    lines += textwrap.wrap(
        "**What each defense trains with**: `defense_training` is the matrix's defense budget (Table 2: SGD, "
        "momentum 0.9, weight decay 5e-4, batch 256, cosine, 100 epochs), `retraining` the attack's budget (the "
        "matrix's `training`), for training from scratch on the poisoned set; \"own parameters\" is a loop of "
        "the defense's own. The parameters listed override the budget's epochs, learning rate or batch size "
        "where they are set (None: the budget's).", width=110, break_on_hyphens=False) + [""]
    lines += _table(["defense", "stage", "trains with", "set by"], budget_rows)
    return "\n".join(lines) + "\n"


def readme_block(text: str) -> str | None:
    """The text between the README's markers (None when they are missing)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(START):end].strip("\n") + "\n"


def replace_block(text: str, table: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {START} ... {END} markers to write the table between")
    return text[:start + len(START)] + "\n" + table + text[end:]


def readme_difference(text: str, table: str | None = None) -> str | None:
    """None when the README's block equals the generated table, else what differs (a short unified diff)."""
    table = render_parameter_table() if table is None else table
    block = readme_block(text)
    if block is None:
        return f"no {START} ... {END} markers"
    if block == table:
        return None
    diff = list(difflib.unified_diff(block.splitlines(), table.splitlines(), "README.md", "generated", n=0,
                                     lineterm=""))
    shown = diff[:30] + ([f"... ({len(diff) - 30} more diff lines)"] if len(diff) > 30 else [])
    return "\n".join(shown)
