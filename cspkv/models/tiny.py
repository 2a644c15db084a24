"""Small random LLaVA models built from configs (no hub access), and prompts with several images.

They exercise every code path in seconds: tests use them, and `csp-run --model tiny` runs the whole
reference pipeline on them where no real model is at hand.
"""

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 99
VOCAB = 100
IMAGE_SIZE = 28   # 4 x 4 patches of 7 px: 16 image tokens per image


def tiny_llava(n_heads: int = 4, n_kv_heads: int = 2, n_layers: int = 2, seed: int = 0):
    """A random LlavaForConditionalGeneration; n_kv_heads < n_heads is GQA, equal is MHA."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=7,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=n_layers, num_attention_heads=n_heads,
                       num_key_value_heads=n_kv_heads, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=None, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    # Random init gives near-uniform attention; sharper projections make pruning choices matter.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def multi_image_prompt(n_images: int, text_len: int = 6, seed: int = 0):
    """input_ids [1, L] with n_images runs of 16 image tokens between text, and pixel_values."""
    g = torch.Generator().manual_seed(seed)
    tokens = [1]
    for _ in range(n_images):
        tokens += torch.randint(2, IMAGE_TOKEN, (text_len,), generator=g).tolist()
        tokens += [IMAGE_TOKEN] * 16
    tokens += torch.randint(2, IMAGE_TOKEN, (text_len,), generator=g).tolist()
    pixels = torch.randn(n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return torch.tensor([tokens]), pixels
