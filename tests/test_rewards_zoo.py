"""Reward zoo: JPEG rewards, differentiable CLIP preprocessing, CLIP/aesthetic/PickScore/HPSv2 loaders.

Offline: every learned reward is built from a tiny random-config CLIP saved with ``save_pretrained`` to a temp
folder and loaded through the real loading code; scores are checked against independent computations.
"""

from __future__ import annotations

import io
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer  # noqa: E402

from diffusion_blend.errors import RewardError
from diffusion_blend.rewards import available_rewards, get_reward
from diffusion_blend.rewards.clip import (
    AestheticHead,
    load_aesthetic_head,
    save_aesthetic_head,
)
from diffusion_blend.rewards.hpsv2 import (
    convert_hpsv2_checkpoint,
    open_clip_to_transformers,
)
from diffusion_blend.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_preprocess,
)

WIDTH, HEADS, LAYERS, EMBED, IMAGE, PATCH, CONTEXT = 32, 4, 2, 16, 32, 8, 16
PROMPTS = ["a cat", "a red dog"]


def tiny_vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in "abcdefghijklmnopqrstuvwxyz":
            vocab[char + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # largest id, as in real CLIP (open_clip pools at argmax(id))
    return vocab


def tiny_config(vocab: dict[str, int], hidden_act: str = "quick_gelu") -> CLIPConfig:
    common = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, hidden_act=hidden_act)
    text = dict(common, vocab_size=len(vocab), max_position_embeddings=CONTEXT,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    vision = dict(common, image_size=IMAGE, patch_size=PATCH)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)


def tiny_tokenizer(vocab: dict[str, int]) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=dict(vocab), merges=[])


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    torch.manual_seed(0)
    vocab = tiny_vocab()
    folder = str(tmp_path_factory.mktemp("tiny_clip"))
    model = CLIPModel(tiny_config(vocab)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(50.0))  # a non-default value, so the test can see it is used
    model.save_pretrained(folder)
    tiny_tokenizer(vocab).save_pretrained(folder)
    return folder


def images(seed: int = 0, batch: int = 2, size: int = 40) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_embeds(folder: str, pixels: torch.Tensor, prompts) -> tuple[torch.Tensor, torch.Tensor, CLIPModel]:
    """Independent route: reload the folder, encode pre-built pixels and tokens, normalise by hand."""
    model = CLIPModel.from_pretrained(folder).eval()
    tok = tiny_tokenizer(tiny_vocab())(list(prompts), padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    img = img if torch.is_tensor(img) else img.pooler_output
    txt = txt if torch.is_tensor(txt) else txt.pooler_output
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True), model


# ------------------------------------------------------------------ JPEG


def pil_jpeg_kb(array: np.ndarray, quality: int) -> float:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000.0


def test_jpeg_rewards_order_flat_vs_noise_and_match_pil_sizes():
    generator = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8)
    flat = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    batch = torch.stack([flat, noise]).float() / 255.0
    comp = get_reward("jpeg_compressibility")(batch)
    incomp = get_reward("jpeg_incompressibility", quality=80)(batch)
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    expected95 = [pil_jpeg_kb(x.permute(1, 2, 0).numpy(), 95) for x in (flat, noise)]
    expected80 = [pil_jpeg_kb(x.permute(1, 2, 0).numpy(), 80) for x in (flat, noise)]
    torch.testing.assert_close(comp, -torch.tensor(expected95), rtol=0, atol=1e-6)
    torch.testing.assert_close(incomp, torch.tensor(expected80), rtol=0, atol=1e-6)


def test_jpeg_grayscale_and_bad_quality():
    gray = torch.zeros(1, 1, 16, 16)
    assert get_reward("jpeg_incompressibility")(gray).item() == pytest.approx(
        pil_jpeg_kb(np.zeros((16, 16), np.uint8), 95)
    )
    with pytest.raises(RewardError, match="quality"):
        get_reward("jpeg_compressibility", quality=0)


# ------------------------------------------------------------------ preprocessing


def test_clip_preprocess_normalises_crops_and_repeats_gray():
    """Basic plumbing; the per-reward comparisons with the official transforms are in test_reward_preprocessing.py."""
    def eight_bit(t: torch.Tensor) -> torch.Tensor:  # the official scorers read 8-bit images
        return (t * 255).round() / 255

    x = images(size=IMAGE)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip_preprocess(x, IMAGE), (eight_bit(x) - mean) / std)  # no resize, no crop
    wide = torch.rand(1, 3, IMAGE, IMAGE + 10, generator=torch.Generator().manual_seed(3))
    out = clip_preprocess(wide, IMAGE, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(out, eight_bit(wide)[..., :, 5 : 5 + IMAGE])
    gray = eight_bit(torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(4)))
    resized = clip_preprocess(gray, IMAGE, mean=(0, 0, 0), std=(1, 1, 1), style="hpsv2")  # one float pass, no clamp
    pil = Image.fromarray(gray[0, 0].numpy().astype(np.float32), mode="F").resize((IMAGE, IMAGE), Image.BICUBIC)
    for channel in range(3):  # 1 channel is repeated to RGB
        torch.testing.assert_close(resized[0, channel], torch.from_numpy(np.array(pil)), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ CLIP family


def test_clip_score_equals_hand_cosine_and_has_gradients(clip_folder):
    reward = get_reward("clip_score", model=clip_folder)
    x = images()
    img, txt, _ = reference_embeds(clip_folder, clip_preprocess(x, IMAGE), PROMPTS)
    expected = 100.0 * (img * txt).sum(-1).clamp(min=0)
    value = reward(x, PROMPTS)
    assert value.shape == (2,) and torch.isfinite(value).all() and reward.differentiable
    torch.testing.assert_close(value, expected, atol=1e-4, rtol=1e-4)
    x.requires_grad_(True)
    get_reward("clip_score", model=clip_folder, scale=2.5)(x, PROMPTS).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pickscore_uses_logit_scale_and_offset(clip_folder):
    x = images(seed=5)
    img, txt, model = reference_embeds(clip_folder, clip_preprocess(x, IMAGE), PROMPTS)
    cosine = (img * txt).sum(-1)
    assert model.logit_scale.exp().item() == pytest.approx(50.0, rel=1e-5)
    shifted = get_reward("pickscore", model=clip_folder, processor=clip_folder)
    raw = get_reward("pickscore", model=clip_folder, processor=clip_folder, offset=0.0)
    torch.testing.assert_close(shifted(x, PROMPTS), 50.0 * cosine - 19.0, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(raw(x, PROMPTS), 50.0 * cosine, atol=1e-3, rtol=1e-5)
    assert shifted.value_range == pytest.approx((-69.0, 31.0), rel=1e-5)


def test_aesthetic_head_round_trips_safetensors_and_scores(clip_folder, tmp_path):
    torch.manual_seed(2)
    head = AestheticHead(embed_dim=EMBED).eval()
    path = str(tmp_path / "head.safetensors")
    save_aesthetic_head(head, path)
    loaded = load_aesthetic_head(path)
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    reward = get_reward("aesthetic", model=clip_folder, head=path)
    x = images(seed=7)
    img, _, _ = reference_embeds(clip_folder, clip_preprocess(x, IMAGE), PROMPTS)
    with torch.no_grad():
        expected = head(img)
    torch.testing.assert_close(reward(x), expected, atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)
    reward(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_aesthetic_head_from_torch_pickle_in_folder(tmp_path):
    head = AestheticHead(embed_dim=EMBED)
    torch.save(head.state_dict(), tmp_path / "aesthetic-model.pth")
    loaded = load_aesthetic_head(str(tmp_path))
    assert torch.equal(loaded.layers[7].weight, head.layers[7].weight)
    with pytest.raises(RewardError, match="not found in folder"):
        load_aesthetic_head(str(tmp_path), filename="missing.safetensors")


# ------------------------------------------------------------------ HPSv2: open_clip -> transformers


def random_open_clip_state(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An open_clip ``CLIP`` (ViT tower) state dict with random values and open_clip's key names/shapes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {
        "logit_scale": torch.tensor(np.log(100.0), dtype=torch.float32),
        "token_embedding.weight": r(vocab_size, WIDTH),
        "positional_embedding": r(CONTEXT, WIDTH),
        "ln_final.weight": 1 + r(WIDTH), "ln_final.bias": r(WIDTH),
        "text_projection": r(WIDTH, EMBED),
        "visual.class_embedding": r(WIDTH),
        "visual.positional_embedding": r((IMAGE // PATCH) ** 2 + 1, WIDTH),
        "visual.conv1.weight": r(WIDTH, 3, PATCH, PATCH),
        "visual.ln_pre.weight": 1 + r(WIDTH), "visual.ln_pre.bias": r(WIDTH),
        "visual.ln_post.weight": 1 + r(WIDTH), "visual.ln_post.bias": r(WIDTH),
        "visual.proj": r(WIDTH, EMBED),
    }
    for tower in ("", "visual."):
        for i in range(LAYERS):
            p = f"{tower}transformer.resblocks.{i}."
            state.update({
                p + "ln_1.weight": 1 + r(WIDTH), p + "ln_1.bias": r(WIDTH),
                p + "ln_2.weight": 1 + r(WIDTH), p + "ln_2.bias": r(WIDTH),
                p + "attn.in_proj_weight": r(3 * WIDTH, WIDTH), p + "attn.in_proj_bias": r(3 * WIDTH),
                p + "attn.out_proj.weight": r(WIDTH, WIDTH), p + "attn.out_proj.bias": r(WIDTH),
                p + "mlp.c_fc.weight": r(4 * WIDTH, WIDTH), p + "mlp.c_fc.bias": r(4 * WIDTH),
                p + "mlp.c_proj.weight": r(WIDTH, 4 * WIDTH), p + "mlp.c_proj.bias": r(WIDTH),
            })
    return state


def open_clip_blocks(state, tower: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip residual attention blocks, written with ``nn.MultiheadAttention`` (independent of our mapping)."""
    for i in range(LAYERS):
        p = f"{tower}transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        attn.load_state_dict({"in_proj_weight": state[p + "attn.in_proj_weight"],
                              "in_proj_bias": state[p + "attn.in_proj_bias"],
                              "out_proj.weight": state[p + "attn.out_proj.weight"],
                              "out_proj.bias": state[p + "attn.out_proj.bias"]})
        h = nn.functional.layer_norm(x, (WIDTH,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = nn.functional.layer_norm(x, (WIDTH,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = nn.functional.gelu(nn.functional.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + nn.functional.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    return x


def open_clip_cosine(state, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """open_clip ``encode_image``/``encode_text`` (ViT tower, GELU), then the HPSv2 cosine."""
    ln = nn.functional.layer_norm
    x = nn.functional.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = ln(x, (WIDTH,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    x = open_clip_blocks(state, "visual.", x, None)
    image = ln(x[:, 0], (WIDTH,), state["visual.ln_post.weight"], state["visual.ln_post.bias"]) @ state["visual.proj"]
    length = ids.shape[1]
    t = state["token_embedding.weight"][ids] + state["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    t = open_clip_blocks(state, "", t, causal)
    t = ln(t, (WIDTH,), state["ln_final.weight"], state["ln_final.bias"])
    text = t[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ state["text_projection"]
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    return (image * text).sum(-1)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    vocab = tiny_vocab()
    root = tmp_path_factory.mktemp("hps")
    backbone = root / "backbone"
    backbone.mkdir()
    tiny_config(vocab, hidden_act="gelu").save_pretrained(backbone)
    tiny_tokenizer(vocab).save_pretrained(backbone)
    state = random_open_clip_state(len(vocab))
    checkpoint = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, checkpoint)
    return state, str(backbone), str(checkpoint)


def test_open_clip_key_mapping_covers_every_key_and_splits_qkv(hps_files):
    state, _, _ = hps_files
    converted = open_clip_to_transformers(state)
    in_proj = state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    torch.testing.assert_close(converted["vision_model.encoder.layers.1.self_attn.k_proj.weight"],
                               in_proj[WIDTH : 2 * WIDTH])
    torch.testing.assert_close(converted["text_projection.weight"], state["text_projection"].t())
    expected_keys = set(CLIPModel(tiny_config(tiny_vocab(), "gelu")).state_dict())
    assert set(converted) == expected_keys
    with pytest.raises(RewardError, match="unexpected open_clip key"):
        open_clip_to_transformers({**state, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(WIDTH)})


def test_hpsv2_matches_reference_open_clip_forward(hps_files, tmp_path):
    state, backbone, checkpoint = hps_files
    reward = get_reward("hpsv2", checkpoint=checkpoint, backbone=backbone)
    x = images(seed=9)
    ids = tiny_tokenizer(tiny_vocab())(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = open_clip_cosine(state, clip_preprocess(x, IMAGE, style="hpsv2"), ids)
    value = reward(x, PROMPTS)
    torch.testing.assert_close(value, expected, atol=1e-4, rtol=1e-4)
    folder = convert_hpsv2_checkpoint(checkpoint, backbone, str(tmp_path / "hps_hf"))
    assert json.loads(open(os.path.join(folder, "preprocessor_config.json")).read())["crop_size"]["height"] == IMAGE
    torch.testing.assert_close(get_reward("hpsv2", checkpoint=folder)(x, PROMPTS), value, atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)
    reward(x, PROMPTS).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_hpsv2_rejects_checkpoint_that_does_not_fit_config(hps_files, tmp_path):
    state, backbone, _ = hps_files
    small = {k: v for k, v in state.items() if "resblocks.1." not in k}
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": small}, path)
    with pytest.raises(RewardError, match="does not fit the config") as info:
        get_reward("hpsv2", checkpoint=str(path), backbone=backbone)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ errors and registry


def test_registry_lists_the_zoo():
    names = set(available_rewards())
    assert {"jpeg_compressibility", "jpeg_incompressibility", "clip_score", "aesthetic", "pickscore",
            "hpsv2", "imagereward"} <= names


def test_missing_weights_offline_is_one_readable_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for name, options in [("clip_score", {"model": "nobody/no-such-clip"}),
                          ("aesthetic", {"model": "nobody/no-such-clip"}),
                          ("hpsv2", {"checkpoint": "nobody/no-such-hps"})]:
        with pytest.raises(RewardError) as info:
            get_reward(name, **options)
        message = str(info.value)
        assert "\n" not in message and "nobody/no-such-" in message and "HF_HUB_OFFLINE" in message


def test_missing_extra_names_the_pip_extra(monkeypatch, clip_folder):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(RewardError, match=r"diffusion-blend\[rewards\]") as info:
        get_reward("clip_score", model=clip_folder)
    assert "\n" not in str(info.value)


def test_nan_images_and_missing_prompts_are_rejected(clip_folder):
    reward = get_reward("clip_score", model=clip_folder)
    bad = images()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(RewardError, match="NaN"):
        reward(bad, PROMPTS)
    with pytest.raises(RewardError, match="one prompt per image"):
        reward(images(), None)
    with pytest.raises(RewardError, match="NaN"):
        get_reward("jpeg_compressibility")(bad)


# ------------------------------------------------------------------ ImageReward: BLIP checkpoint -> transformers


BLIP_HEADS, TEXT_WIDTH = 16, 24  # ImageReward's ViT-L has 16 heads; the loader assumes that


def tiny_bert_vocab() -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "red", "dog", "##s"]


def random_blip_vision_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """BLIP/timm ViT key names and shapes (``blip.visual_encoder.*``), random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {"cls_token": r(1, 1, WIDTH), "pos_embed": r(1, (IMAGE // PATCH) ** 2 + 1, WIDTH),
             "patch_embed.proj.weight": r(WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": r(WIDTH),
             "norm.weight": 1 + r(WIDTH), "norm.bias": r(WIDTH)}
    for i in range(LAYERS):
        p = f"blocks.{i}."
        state.update({p + "norm1.weight": 1 + r(WIDTH), p + "norm1.bias": r(WIDTH),
                      p + "norm2.weight": 1 + r(WIDTH), p + "norm2.bias": r(WIDTH),
                      p + "attn.qkv.weight": r(3 * WIDTH, WIDTH), p + "attn.qkv.bias": r(3 * WIDTH),
                      p + "attn.proj.weight": r(WIDTH, WIDTH), p + "attn.proj.bias": r(WIDTH),
                      p + "mlp.fc1.weight": r(4 * WIDTH, WIDTH), p + "mlp.fc1.bias": r(4 * WIDTH),
                      p + "mlp.fc2.weight": r(WIDTH, 4 * WIDTH), p + "mlp.fc2.bias": r(WIDTH)})
    return state


def blip_vit_reference(state, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's timm-style ViT forward written out by hand (LayerNorm eps 1e-6, exact GELU)."""
    ln = nn.functional.layer_norm
    x = nn.functional.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + state["pos_embed"]
    batch, tokens, head_dim = x.shape[0], x.shape[1], WIDTH // BLIP_HEADS
    for i in range(LAYERS):
        p = f"blocks.{i}."
        h = ln(x, (WIDTH,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
        qkv = nn.functional.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, BLIP_HEADS, head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, tokens, WIDTH)
        x = x + nn.functional.linear(h, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = ln(x, (WIDTH,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        h = nn.functional.gelu(nn.functional.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + nn.functional.linear(h, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    return ln(x, (WIDTH,), state["norm.weight"], state["norm.bias"], eps=1e-6)


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

    torch.manual_seed(3)
    root = tmp_path_factory.mktemp("imagereward")
    (root / "vocab.txt").write_text("\n".join(tiny_bert_vocab()) + "\n")
    tokenizer = BertTokenizer(vocab=str(root / "vocab.txt"))
    tokenizer.save_pretrained(root / "tokenizer")
    med = {"vocab_size": len(tiny_bert_vocab()) + 2, "hidden_size": TEXT_WIDTH, "intermediate_size": 2 * TEXT_WIDTH,
           "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 40,
           "hidden_act": "gelu", "layer_norm_eps": 1e-12, "encoder_width": WIDTH, "add_cross_attention": True}
    (root / "med_config.json").write_text(json.dumps(med))
    text_config = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                                 encoder_hidden_size=WIDTH, is_decoder=True, pad_token_id=0)
    text = BlipTextModel(text_config, add_pooling_layer=False).eval()
    head = AestheticHead(embed_dim=TEXT_WIDTH).eval()
    vision = random_blip_vision_state()
    state = {f"blip.visual_encoder.{k}": v for k, v in vision.items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    state.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    state["blip.vision_proj.weight"] = torch.zeros(8, WIDTH)
    torch.save(state, root / "ImageReward.pt")
    return root, vision, text, head


def test_imagereward_matches_hand_built_blip_forward(imagereward_files):
    root, vision, text, head = imagereward_files
    reward = get_reward("imagereward", checkpoint=str(root), tokenizer=str(root / "tokenizer"))
    raw = get_reward("imagereward", checkpoint=str(root), tokenizer=str(root / "tokenizer"), normalize=False)
    x = images(seed=11, size=48)
    prompts = ["a red cat", "dogs"]
    from transformers import BertTokenizer

    tokens = BertTokenizer(vocab=str(root / "vocab.txt"))(prompts, padding="max_length", max_length=35,
                                                          return_tensors="pt")
    with torch.no_grad():
        image_embeds = blip_vit_reference(vision, clip_preprocess(x, IMAGE, style="torchvision"))
        hidden = text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                      encoder_hidden_states=image_embeds).last_hidden_state
        expected = head(hidden[:, 0])
    torch.testing.assert_close(raw(x, prompts), expected, atol=1e-4, rtol=1e-4)
    normalised = (expected - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(reward(x, prompts), normalised, atol=1e-4, rtol=1e-4)
    x.requires_grad_(True)
    reward(x, prompts).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_imagereward_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(RewardError, match="ImageReward.pt") as info:
        get_reward("imagereward", checkpoint=str(tmp_path))
    assert "\n" not in str(info.value)
