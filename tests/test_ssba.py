"""SSBA: the trained encoder hides a code the decoder recovers (and cannot read in clean images); the residual
is small, bounded and follows each image; the encoder is built once and then comes from the cache."""
from pathlib import Path

import pytest
import torch

from backdoor.attacks import AttackContext, create_attack
from backdoor.attacks.ssba import bit_accuracy, texture_mask
from backdoor.harness.cache import ArtifactCache
from backdoor.data import load_dataset
from backdoor.training import TrainConfig

CPU = torch.device("cpu")
SMALL = dict(code_length=4, steps=400, width=8, lr=3e-3, batch_size=32)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", image_size=16)


@pytest.fixture(scope="module")
def setting(data, tmp_path_factory):
    cache = ArtifactCache(tmp_path_factory.mktemp("ssba-cache"))
    builds = []

    def cached(kind, spec, build):
        def counted():
            builds.append(kind)
            return build()
        return cache.get_or_build(kind, spec, counted)[0]

    ctx = AttackContext(dataset=data, device=CPU, seed=0, training=TrainConfig(), model_name="cnn_small",
                        cached=cached, clean_model=lambda: None)
    attack = create_attack("ssba", **SMALL)
    attack.prepare(ctx)
    return attack, ctx, builds


def half_flat_images() -> torch.Tensor:
    """Four 16 x 16 images of random texture, each with one flat half (one grey level): the left half (columns
    0-7) of images 0 and 1, the right half (columns 8-15) of images 2 and 3."""
    x = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[:2, ..., :8] = torch.tensor([60, 120], dtype=torch.uint8).view(2, 1, 1, 1)
    x[2:, ..., 8:] = torch.tensor([180, 90], dtype=torch.uint8).view(2, 1, 1, 1)
    return x


def test_residual_follows_each_images_texture_and_carries_the_code():
    """The trigger's mechanism on an untrained encoder (fast; it does not need training): ``x + residual`` with
    the residual bounded by max_residual, zero where the image is flat (3 x 3 windows inside the flat half), present
    on its texture, so it lies on a different half in different images; another code, another residual."""
    attack = create_attack("ssba", **SMALL)
    encoder, decoder = attack.new_nets(3, seed=0)
    attack.load_material({**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                          **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}, 3)
    x = half_flat_images()
    residual = attack.apply_trigger(x).float() - x.float()
    left, right = residual[..., :7], residual[..., 9:]
    assert left[:2].abs().max() == 0 and right[2:].abs().max() == 0, "nothing changes where the image is flat"
    texture = torch.cat([right[:2], left[2:]])
    assert texture.abs().mean() > 2 and residual.abs().max() <= attack.max_residual * 255 + 0.5
    other_code = attack.encode(x, 1 - attack.code).float() - x.float()
    assert (torch.cat([other_code[:2, ..., 9:], other_code[2:, ..., :7]]) - texture).abs().mean() > 1, \
        "the residual carries the code"


def test_decoder_recovers_the_code_from_encoded_images_only(setting, data):
    attack, _, _ = setting
    x = data.test.x
    bits = torch.randint(0, 2, (len(x), 4), generator=torch.Generator().manual_seed(1))
    encoded = attack.encode(x, bits)
    assert encoded.dtype == torch.uint8 and encoded.shape == x.shape
    assert bit_accuracy(attack.decode(encoded), bits) > 0.9
    clean = bit_accuracy(attack.decode(x), bits)  # codes independent of the clean images: chance
    assert 0.35 < clean < 0.65
    # The fixed benchmark code is read back from poisoned images.
    poisoned = attack.apply_trigger(x)
    assert bit_accuracy(attack.decode(poisoned), attack.code.expand(len(x), -1)) > 0.9


def test_residual_is_small_bounded_and_sample_specific(setting, data):
    attack, _, _ = setting
    x = data.test.x[:200]
    residual = attack.apply_trigger(x).float() - x.float()
    assert residual.abs().max() <= attack.max_residual * 255 + 0.5
    rmse = residual.pow(2).mean().sqrt()
    assert 0.2 < rmse < 0.08 * 255  # present but small (the tiny encoder lands at 10-14 grey levels over CPU kernels)
    # Residuals differ between images: the pairwise difference is comparable to their size ...
    assert (residual[:100] - residual[100:]).abs().mean() > 0.3 * residual.abs().mean()
    # ... because each lives on its own image's structure: nothing in flat regions.
    flat = texture_mask(x.float() / 255, attack.texture_floor).expand_as(residual) < 0.02
    assert residual[flat].abs().max() <= 1.0  # at most one rounding step
    assert residual[~flat].abs().mean() > 5 * residual[flat].abs().mean()


def test_poisoning_is_dirty_label_and_deterministic(setting, data):
    attack, _, _ = setting
    assert torch.equal(attack.code, create_attack("ssba", **SMALL).code)  # drawn from code_seed
    p = attack.poison_train(data.train, 0.1, seed=0)
    assert int(p.mask.sum()) == round(0.1 * len(data.train))
    assert bool((p.y[p.mask] == 0).all()) and torch.equal(p.y[~p.mask], data.train.y[~p.mask])
    assert torch.equal(p.x[~p.mask], data.train.x[~p.mask])
    assert torch.equal(p.x[p.mask], attack.apply_trigger(data.train.x[p.mask]))
    assert torch.equal(attack.apply_trigger(data.test.x[:20]), attack.apply_trigger(data.test.x[:20]))


def test_encoder_is_built_once_then_cached(setting, data):
    attack, ctx, builds = setting
    assert builds == ["ssba_encoder"]
    again = create_attack("ssba", **SMALL)
    again.prepare(ctx)
    other_code = create_attack("ssba", code_seed=5, **SMALL)  # the code is not part of the encoder's key
    other_code.prepare(ctx)
    assert builds == ["ssba_encoder"]
    assert torch.equal(again.apply_trigger(data.test.x[:50]), attack.apply_trigger(data.test.x[:50]))
    spec = attack.material_spec(ctx)
    assert spec != create_attack("ssba", **{**SMALL, "steps": 401}).material_spec(ctx)
    assert spec == other_code.material_spec(ctx)


def test_trigger_needs_prepare():
    with pytest.raises(RuntimeError, match="prepare"):
        create_attack("ssba").apply_trigger(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [{"code_length": 0}, {"steps": 0}, {"lr": 0}, {"max_residual": 0},
                                 {"max_residual": 2}, {"code_weight": 0}, {"texture_floor": 0},
                                 {"image_weight": -1}])
def test_bad_parameters_raise(bad):
    with pytest.raises(ValueError):
        create_attack("ssba", **bad)


def test_an_edit_of_ssba_py_is_a_cache_miss(monkeypatch, tmp_path, data):
    """The encoder's key carries the digest of the code that trains it (audit: it once did not, so an edited
    ssba.py was served a stale encoder). The digest is taken as the harness takes it, from the module's file."""
    import shutil
    import sys

    from backdoor.harness import specs

    module = sys.modules["backdoor.attacks.ssba"]
    original = Path(module.__file__)
    copy = Path(shutil.copytree(original.parent, tmp_path / "attacks"))
    attack = create_attack("ssba", **SMALL)

    def encoder_spec(file: Path) -> dict:
        monkeypatch.setattr(module, "__file__", str(file))
        specs.code_version.cache_clear()
        ctx = AttackContext(dataset=data, device=CPU, seed=0, training=TrainConfig(), model_name="cnn_small",
                            cached=None, clean_model=lambda: None,
                            spec={"attack_code": specs.code_version(module.__name__)})
        return attack.material_spec(ctx)

    try:
        unchanged = encoder_spec(copy / "ssba.py")
        assert unchanged == encoder_spec(original)  # same bytes, same key
        (copy / "ssba.py").write_text((copy / "ssba.py").read_text() + "\n# an edit\n")
        edited = encoder_spec(copy / "ssba.py")
        assert edited != unchanged
        assert ArtifactCache(tmp_path / "c").path("ssba_encoder", edited) != \
            ArtifactCache(tmp_path / "c").path("ssba_encoder", unchanged)
    finally:
        specs.code_version.cache_clear()
