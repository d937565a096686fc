"""The one place that knows diffusers: load a pipeline, encode prompts, evaluate the denoiser,
decode latents, attach LoRA, give the reference policy, save LoRA weights.

Stable Diffusion 1.x/2.x folders (or hub ids) and the embedded ShapeWorld model go through the
same class. Shapes: latents (B, C, h, w); prompt embeddings (B, L, D); images (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_FILES = ("model_index.json",)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class ModelLoadError(RuntimeError):
    """A model that cannot be found or loaded; the message says what to do."""


def resolve_model(model: str) -> str:
    """``shapeworld`` -> the packaged embedded model folder; a folder must hold a pipeline."""
    if model == "shapeworld":
        from .embedded.pretrain import default_model_dir

        folder = default_model_dir()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"the embedded ShapeWorld model is missing from {folder}; reinstall the package or "
                "recreate it with 'dpok pretrain'"
            )
        return str(folder)
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise ModelLoadError(f"model folder {model!r} does not exist; give a diffusers pipeline folder, "
                                 "a hub id such as 'runwayml/stable-diffusion-v1-5', or 'shapeworld'")
        missing = [f for f in MODEL_FILES if not (path / f).is_file()]
        if missing:
            raise ModelLoadError(f"model folder {model!r} has no {', '.join(missing)}: it is not a diffusers "
                                 "pipeline folder (save one with pipe.save_pretrained(folder))")
        index = json.loads((path / "model_index.json").read_text())
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if part in index and index[part] and index[part][0] is not None and not (path / part).is_dir():
                raise ModelLoadError(f"model folder {model!r} lists '{part}' in model_index.json but has no "
                                     f"'{part}/' subfolder; the download or copy is incomplete")
        return str(path)
    return model  # a hub id


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch: ``cond`` and ``uncond`` (B, L, D) (uncond = empty prompt)."""

    cond: torch.Tensor
    uncond: torch.Tensor

    def __getitem__(self, idx: torch.Tensor | slice) -> PromptEmbeds:
        return PromptEmbeds(self.cond[idx], self.uncond[idx])

    def to(self, device: torch.device | str) -> PromptEmbeds:
        return PromptEmbeds(self.cond.to(device), self.uncond.to(device))

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([e.cond for e in items]), torch.cat([e.uncond for e in items]))


class DiffusionAdapter:
    """A Stable-Diffusion-style pipeline seen as a policy over denoising steps."""

    def __init__(self, pipe, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:  # noqa: ANN001
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.scheduler = pipe.scheduler
        self.reference_unet: torch.nn.Module | None = None  # frozen copy, full fine-tuning only
        self.lora_config = None
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False)
            module.eval()
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str = "shapeworld", device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> DiffusionAdapter:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        source = resolve_model(model)
        try:
            # only a non-default dtype is passed: the keyword's name changed across diffusers versions
            kwargs = {"torch_dtype": dtype} if dtype != torch.float32 else {}
            pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False,
                                                           **kwargs)
        except OSError as e:
            raise ModelLoadError(f"cannot load model {model!r}: {e}. Without network access give a local "
                                 "folder holding the pipeline (or 'shapeworld')") from e
        except Exception as e:  # corrupt weights or configs
            raise ModelLoadError(f"cannot load model {model!r} from {source}: {e}") from e
        # DDIM with eta > 0 is the stochastic policy both papers train
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return cls(pipe, device, dtype)

    # ----------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """CLIP text states (B, L, D) for prompts and for the empty prompt (guidance)."""
        def encode(texts: list[str]) -> torch.Tensor:
            ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            return self.text_encoder(ids)[0].to(self.dtype)

        cond = encode(list(prompts))
        uncond = encode([""]).expand(len(prompts), -1, -1).contiguous()
        return PromptEmbeds(cond, uncond)

    # ---------------------------------------------------------------------------------- denoiser
    def noise_pred(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                   guidance_scale: float) -> torch.Tensor:
        """Guided model output eps_u + w (eps_c - eps_u), (B, C, h, w); timesteps (B,).

        The one denoiser evaluation shared by sampling and training, so log-probs at sampling
        time and at update time come from the same computation (ratio exactly 1 before updates).
        DDIM's ``scale_model_input`` is the identity, so it is not called.
        """
        return self._guided(self.unet, latents, timesteps, embeds, guidance_scale)

    def reference_noise_pred(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                             guidance_scale: float) -> torch.Tensor:
        """The same with the pretrained weights (LoRA disabled, or the frozen copy); no grad."""
        with torch.no_grad(), self.reference():
            unet = self.reference_unet if self.reference_unet is not None else self.unet
            return self._guided(unet, latents, timesteps, embeds, guidance_scale)

    def conditional_noise_pred(self, latents: torch.Tensor, timesteps: torch.Tensor,
                               embeds: PromptEmbeds) -> torch.Tensor:
        """Unguided conditional eps_theta(x_t, t, z) for supervised losses (SFT, RWR)."""
        return self.unet(latents, timesteps, embeds.cond).sample

    @staticmethod
    def _guided(unet, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,  # noqa: ANN001
                guidance_scale: float) -> torch.Tensor:
        if guidance_scale == 1.0:
            return unet(latents, timesteps, embeds.cond).sample
        out = unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                   torch.cat([embeds.uncond, embeds.cond])).sample
        eps_u, eps_c = out.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this block ``self.unet`` is the pretrained policy (LoRA adapters disabled)."""
        if self.lora_config is None:
            yield
            return
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    # ------------------------------------------------------------------------------------ images
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x_0 latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1] (float32)."""
        with torch.no_grad():
            x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> scaled latents (mode of the posterior)."""
        with torch.no_grad():
            z = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.mode()
        return z * self.vae.config.scaling_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    # --------------------------------------------------------------------------------- schedule
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        return torch.as_tensor(self.scheduler.final_alpha_cumprod, dtype=torch.float32, device=self.device)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The DDIM timesteps, high to low, (T,) long."""
        self.scheduler.set_timesteps(num_steps, device=self.device)
        return self.scheduler.timesteps.clone()

    def step_size(self, num_steps: int) -> int:
        return self.scheduler.config.num_train_timesteps // num_steps

    # ----------------------------------------------------------------------------- parameters
    def add_lora(self, rank: int, alpha: float, target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS) -> None:
        """Attach a peft LoRA adapter to the UNet (B = 0 at init, so the policy starts at the base)."""
        from peft import LoraConfig

        self.lora_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                      target_modules=list(target_modules))
        self.unet.add_adapter(self.lora_config)
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # LoRA weights train in fp32 even when the UNet is half

    def enable_full_finetuning(self) -> None:
        """Train every UNet weight; keep a frozen copy as the reference policy."""
        self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.unet.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self.unet.train(mode)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in diffusers' naming (what ``load_lora_weights`` expects)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))

    def save_lora(self, folder: str | Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(folder)`` loads."""
        from diffusers import StableDiffusionPipeline

        if self.lora_config is None:
            raise RuntimeError("this model has no LoRA adapter to save (full fine-tuning saves the UNet)")
        folder = Path(folder)
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers={k: v.detach().cpu() for k, v in self.lora_state_dict().items()},
            safe_serialization=True, unet_lora_adapter_metadata=self.lora_config.to_dict(),
        )
        return folder / "pytorch_lora_weights.safetensors"

    def load_lora(self, folder: str | Path) -> None:
        """Load LoRA weights saved by :meth:`save_lora` (or any diffusers SD LoRA) into the UNet."""
        folder = Path(folder)
        if not (folder / "pytorch_lora_weights.safetensors").is_file():
            raise ModelLoadError(f"no pytorch_lora_weights.safetensors in {folder}; give the 'lora' folder of a run")
        self.pipe.load_lora_weights(str(folder))
