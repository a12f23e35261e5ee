"""``dblend inspect`` and adapters by hub id (issue 22).

The classification is checked on files whose key names and widths follow the published layouts (SD 1.5's
cross-attention width 768, SDXL's 2048, SD3-Medium's 1536, FLUX's 3072; diffusers, peft and kohya key styles), built
here with tiny ranks, and on real LoRA files of the tiny pipelines; ``--base`` asks the loader itself. Hub ids are
resolved offline against a Hugging Face cache this test writes on disk (the layout huggingface_hub reads:
``models--ORG--NAME/refs/main`` and ``snapshots/<commit>/``).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from diffusion_blend.cli import main
from diffusion_blend.pipelines.inspection import inspect_adapter


def lora(prefix: str, width: int, out: int = 8, rank: int = 4) -> dict[str, torch.Tensor]:
    return {f"{prefix}.lora_A.weight": torch.zeros(rank, width), f"{prefix}.lora_B.weight": torch.zeros(out, rank)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    save_file({**lora("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 768),
               **lora("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640)},
              root / "sd15.safetensors",
              metadata={"unet_lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8}), "format": "pt"})
    save_file({**lora("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", 2048),
               **lora("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768)}, root / "sdxl.safetensors")
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    kohya = {f"{module}.lora_down.weight": torch.zeros(16, 768), f"{module}.lora_up.weight": torch.zeros(320, 16),
             f"{module}.alpha": torch.tensor(8.0)}
    save_file(kohya, root / "kohya.safetensors")
    peft = root / "flow_grpo"
    peft.mkdir()
    save_file({**lora("base_model.model.transformer_blocks.0.attn.to_q", 1536, rank=32),
               **lora("base_model.model.transformer_blocks.0.attn.add_k_proj", 1536, rank=32)},
              peft / "adapter_model.safetensors")
    (peft / "adapter_config.json").write_text(json.dumps({"r": 32, "lora_alpha": 64, "peft_type": "LORA",
                                                          "target_modules": ["to_q", "add_k_proj"]}))
    save_file({**lora("transformer.single_transformer_blocks.0.attn.to_q", 3072)}, root / "flux.safetensors")
    save_file({"weight": torch.zeros(2, 2)}, root / "not_lora.safetensors")
    (root / "text.safetensors").write_text("not a safetensors file")
    return root


def test_formats_and_the_denoiser_each_fits(files):
    sd15 = inspect_adapter(files / "sd15.safetensors")
    assert (sd15.format, sd15.denoiser, sd15.text_encoder) == ("diffusers LoRA file", "Stable Diffusion 1.x UNet",
                                                                False)
    assert sd15.ranks == [4] and sd15.lora_alpha == [8.0] and sd15.target_modules == ["to_k", "to_q"]
    assert sd15.parameters == 4 * 768 + 8 * 4 + 4 * 640 + 8 * 4 and sd15.ours is None
    sdxl = inspect_adapter(files / "sdxl.safetensors")
    assert sdxl.denoiser == "SDXL UNet" and sdxl.text_encoder and any("text encoder" in n for n in sdxl.notes)
    kohya = inspect_adapter(files / "kohya.safetensors")
    assert (kohya.format, kohya.denoiser, kohya.ranks, kohya.lora_alpha) == (
        "kohya / A1111 LoRA file", "Stable Diffusion 1.x UNet", [16], [8.0])
    assert kohya.target_modules == ["to_k"]
    peft = inspect_adapter(files / "flow_grpo")
    assert (peft.format, peft.ranks, peft.lora_alpha) == ("peft folder", [32], [64.0])
    assert peft.denoiser.startswith("SD3 transformer (SD3 / SD3.5-Medium")
    assert inspect_adapter(files / "flux.safetensors").denoiser.startswith("FLUX transformer (FLUX.1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD base, one of our experts (metadata) and a LoRA of the tiny SDXL UNet (another base)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from diffusion_blend.adapters import AdapterMetadata, base_fingerprint
    from diffusion_blend.pipelines.lora_files import export_diffusers_lora, unet_architecture
    from diffusion_blend.pipelines.tiny import (
        ATTENTION_PROJECTIONS,
        perturbed_lora,
        save_diffusers_lora,
        tiny_sd_pipeline,
        tiny_sdxl_pipeline,
    )

    root = tmp_path_factory.mktemp("tiny_inspect")
    tiny_sd_pipeline(root).save_pretrained(root / "base")
    unet = UNet2DConditionModel.from_pretrained(root / "base" / "unet")
    perturbed_lora(unet, "bright", seed=1)
    metadata = AdapterMetadata(rewards={"brightness": 2.0}, alpha=0.1, rank=4, lora_alpha=4.0,
                               base_fingerprint=base_fingerprint(unet, unet_architecture(unet)),
                               target_modules=ATTENTION_PROJECTIONS)
    export_diffusers_lora(unet, "bright", root / "bright.safetensors", metadata)
    xl = tiny_sdxl_pipeline(root / "xl").unet
    perturbed_lora(xl, "other", seed=2)
    save_diffusers_lora(StableDiffusionXLPipeline, xl, "other", root / "other.safetensors")
    return root


def test_our_metadata_and_the_loaders_check_against_a_base(tiny, capsys):
    assert main(["inspect", str(tiny / "bright.safetensors"), str(tiny / "other.safetensors"), "--base",
                 str(tiny / "base"), "--json"]) == 0
    bright, other = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert bright["ours"]["rewards"] == {"brightness": 2.0} and bright["ours"]["effective_alpha"] == 0.05
    assert bright["loads"] == "yes" and bright["denoiser"].startswith("UNet with cross-attention width 32")
    assert other["ours"] is None and other["loads"].startswith("no: adapter 'inspected'")
    assert main(["inspect", str(tiny / "bright.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "diffusion-blend expert: rewards {'brightness': 2.0}, alpha 0.1 (effective 0.05" in text


@pytest.mark.parametrize(("name", "fragment"), [
    ("text.safetensors", "not a readable safetensors file"),
    ("not_lora.safetensors", "no LoRA weights"),
    ("missing.safetensors", "does not exist"),
])
def test_unreadable_or_foreign_files_are_one_line(files, capsys, name, fragment):
    assert main(["inspect", str(files / name)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("dblend: error: ") and fragment in err[0], err


def fake_hub_cache(cache, repo: str, files: dict[str, object], commit: str = "0123456789abcdef") -> None:
    """The on-disk layout huggingface_hub reads offline: refs/main -> a snapshot folder holding the files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for relative, source in files.items():
        target = folder / "snapshots" / commit / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)


def test_adapters_by_hub_id_offline(tiny, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    fake_hub_cache(cache, "someone/bright-expert", {"pytorch_lora_weights.safetensors": tiny / "bright.safetensors"})
    fake_hub_cache(cache, "someone/two-experts",
                   {"bright/pytorch_lora_weights.safetensors": tiny / "bright.safetensors"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["sample", "--base", str(tiny / "base"), "--adapter", "b=someone/bright-expert", "--adapter",
            "c=someone/two-experts:bright", "--weights", "b=0.5,c=0.5", "--prompt", "x", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["experts"]["b"]["alpha"] == 0.05 and str(cache) in settings["experts"]["c"]["source"]
    assert main(["inspect", "someone/bright-expert"]) == 0 and "effective 0.05" in capsys.readouterr().out
    assert main(["sample", "--base", str(tiny / "base"), "--adapter", "b=someone/missing-expert", "--weights", "b=1",
                 "--prompt", "x", "--out", str(tmp_path / "x")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "'someone/missing-expert'" in err[0] and "HF_HUB_OFFLINE=1" in err[0], err
