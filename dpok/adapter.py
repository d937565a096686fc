"""The one place that knows diffusers: load a pipeline, encode prompts, evaluate the denoiser,
decode latents, attach LoRA, give the reference policy, save LoRA weights.

Stable Diffusion 1.x, 2.x (epsilon or v-prediction) and SDXL folders (or hub ids), the embedded
ShapeWorld model and the flow-matching transformers (SD3, SD3.5 and FLUX, velocity prediction)
go through the same class; the family is read from ``model_index.json``.
Shapes: latents (B, C, h, w) (FLUX's too: packing into 2x2 patches happens inside the denoiser
call); prompt embeddings (B, L, D); pooled text embeddings (B, P) (SDXL, SD3, FLUX) and SDXL's
micro-conditioning time ids (B, 6); images (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .assets import default_flow_model_dir, default_model_dir
from .attention import fold_text_tokens
from .runtime import select_device

MODEL_FILES = ("model_index.json",)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class ModelLoadError(RuntimeError):
    """A model that cannot be found or loaded; the message says what to do."""


def resolve_model(model: str) -> str:
    """``shapeworld`` / ``shapeworld-flow`` -> the packaged embedded model folders; a folder must hold a
    pipeline."""
    embedded = {"shapeworld": (default_model_dir(), "dpok pretrain"),
                "shapeworld-flow": (default_flow_model_dir(), "dpok pretrain --family flow-matching")}
    if model in embedded:
        folder, command = embedded[model]
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"the embedded model {model!r} is missing from {folder}; reinstall the package or "
                f"recreate it with '{command}'"
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
        for part in ("unet", "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                     "text_encoder_3", "tokenizer_3", "scheduler"):
            if part in index and index[part] and index[part][0] is not None and not (path / part).is_dir():
                raise ModelLoadError(f"model folder {model!r} lists '{part}' in model_index.json but has no "
                                     f"'{part}/' subfolder; the download or copy is incomplete")
        return str(path)
    return model  # a hub id


def absent_components(source: str) -> dict[str, None]:
    """Parts a local folder's ``model_index.json`` lists as absent (``[null, null]``), e.g. SD3 saved
    without T5: diffusers loads such a folder only when they are passed as ``None``."""
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {k: None for k, v in entries.items() if isinstance(v, list) and v and v[0] is None}


def pipeline_class_name(source: str) -> str:
    """``_class_name`` of a pipeline folder's (or hub id's) ``model_index.json``.

    A local folder is read directly (offline); a hub id goes through diffusers' config loading,
    and when that fails (no network, no cache) Stable Diffusion is assumed, so the pipeline load
    that follows reports the real problem.
    """
    index = Path(source) / "model_index.json"
    if index.is_file():
        return str(json.loads(index.read_text()).get("_class_name", ""))
    from diffusers import DiffusionPipeline

    try:
        return str(DiffusionPipeline.load_config(source).get("_class_name", ""))
    except Exception:  # noqa: BLE001 - any failure here resurfaces, with its message, in from_pretrained
        return ""


# pipeline classes of the flow-matching family (rectified-flow transformers), by _class_name prefix
FLOW_MATCHING_PIPELINES = ("StableDiffusion3", "Flux")


def model_family(class_name: str) -> str:
    """``flow-matching`` (SD3, SD3.5, FLUX) or ``diffusion`` (noise-prediction models: SD 1.x, 2.x, SDXL)."""
    return "flow-matching" if class_name.startswith(FLOW_MATCHING_PIPELINES) else "diffusion"


def local_model_family(model: str) -> str | None:
    """The family of a model that is a local folder (or the embedded model), read from its
    ``model_index.json`` without loading anything; None for a hub id or a folder that is not a pipeline."""
    try:
        source = resolve_model(model)
    except ModelLoadError:
        return None
    index = Path(source) / "model_index.json"
    return model_family(pipeline_class_name(source)) if index.is_file() else None


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch of B prompts.

    - ``cond``, ``uncond``: (B, L, D) encoder states for the prompts and for the empty prompt (guidance)
    - ``pooled``, ``uncond_pooled``: (B, P) pooled text embeddings of SDXL, SD3 (both CLIPs' projections)
      and FLUX (CLIP's pooled output) (``None`` for SD 1.x/2.x)
    - ``time_ids``: (B, 6) SDXL's micro-conditioning (original size, crop corner, target size),
      shared by both guidance branches (``None`` for SD 1.x/2.x)

    Indexing, ``to`` and ``cat`` carry every field, so callers never look inside.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PromptEmbeds:
        return PromptEmbeds(**{f.name: None if (v := getattr(self, f.name)) is None else fn(v)
                               for f in dataclasses.fields(self)})

    def __getitem__(self, idx: torch.Tensor | slice) -> PromptEmbeds:
        return self._map(lambda v: v[idx])

    def to(self, device: torch.device | str) -> PromptEmbeds:
        return self._map(lambda v: v.to(device))

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        def join(name: str) -> torch.Tensor | None:
            parts = [getattr(e, name) for e in items]
            if any(p is None for p in parts):
                if not all(p is None for p in parts):
                    raise ValueError(f"cannot concatenate prompt embeddings with and without {name!r} (mixed model families)")
                return None
            return torch.cat(parts)

        return PromptEmbeds(**{f.name: join(f.name) for f in dataclasses.fields(PromptEmbeds)})

    def added_cond_kwargs(self, unconditional: bool = False) -> dict[str, torch.Tensor] | None:
        """SDXL's extra UNet inputs for one guidance branch: ``text_embeds`` (B, P), ``time_ids`` (B, 6)."""
        if self.time_ids is None:
            return None
        pooled = self.uncond_pooled if unconditional else self.pooled
        return {"text_embeds": pooled, "time_ids": self.time_ids}


class SDXLTextEncoders(torch.nn.Module):
    """SDXL's two CLIP encoders seen as one text encoder.

    The conditioning is the penultimate hidden states of both, concatenated on the feature axis
    (B, L, D1 + D2), plus the projected pooled output of the second (B, P), as in SDXL.
    ``config.hidden_size`` is D1 + D2, the width of :attr:`PromptEmbeds.cond`, so code that sizes
    a layer on the text width (the DPOK value function) works for every family unchanged.
    """

    def __init__(self, first: torch.nn.Module, second: torch.nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.config = SimpleNamespace(hidden_size=first.config.hidden_size + second.config.hidden_size,
                                      projection_dim=second.config.projection_dim)

    def forward(self, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) for each tokenizer -> states (B, L, D1 + D2), pooled (B, P)."""
        out_1 = self.first(ids, output_hidden_states=True)
        out_2 = self.second(ids_2, output_hidden_states=True)
        # SDXL was trained on the penultimate layer of both encoders
        states = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return states, out_2.text_embeds


class FlowTextEncoders(torch.nn.Module):
    """The CLIP and T5 encoders of a flow-matching pipeline (SD3: CLIP-L, CLIP-G, optional T5; FLUX:
    CLIP, T5) seen as one module; the encoding itself is the pipeline's ``encode_prompt``.
    ``config.hidden_size`` is the transformer's ``joint_attention_dim``, the width of
    :attr:`PromptEmbeds.cond`."""

    def __init__(self, encoders: list[torch.nn.Module | None], width: int) -> None:
        super().__init__()
        self.encoders = torch.nn.ModuleList([e for e in encoders if e is not None])
        self.config = SimpleNamespace(hidden_size=width)


# the pipelines' default T5 sequence lengths and dynamic-shift fallbacks (diffusers' pipeline defaults)
_T5_LENGTH = {"StableDiffusion3": 256, "Flux": 512}
_MAX_SHIFT = {"StableDiffusion3": 1.16, "Flux": 1.15}


def use_sdpa(model: torch.nn.Module) -> None:
    """Route attention through PyTorch's ``scaled_dot_product_attention`` (diffusers' AttnProcessor2_0).

    diffusers picks it by default; a plain ``AttnProcessor`` (e.g. after ``set_default_attn_processor``)
    or xformers is replaced, any other (custom) processor is left alone.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    if not hasattr(model, "attn_processors"):
        return
    processors = model.attn_processors
    if all(isinstance(p, AttnProcessor2_0) for p in processors.values()):
        return
    model.set_attn_processor({name: AttnProcessor2_0() if isinstance(p, (AttnProcessor, XFormersAttnProcessor)) else p
                              for name, p in processors.items()})


def ema_average(params: list[torch.nn.Parameter], decay: float) -> Any:
    """diffusers' ``EMAModel`` over ``params`` (its default decay warm-up), for :mod:`dpok.ema`."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay)


def peft_to_kohya(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNet LoRA weights in peft naming -> kohya's, with diffusers' own converter (for :mod:`dpok.export`)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    return convert_state_dict_to_kohya(weights)


# --autocast: the dtype the denoiser's forward runs in under torch.autocast (None: no autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16}


class DiffusionAdapter:
    """A Stable Diffusion (1.x, 2.x, SDXL) or flow-matching (SD3, SD3.5, FLUX) pipeline seen as a policy
    over denoising steps. ``unet`` is the denoising network, a flow model's transformer included."""

    def __init__(self, pipe, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:  # noqa: ANN001
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        self.family = model_family(type(pipe).__name__)
        self.is_flow = self.family == "flow-matching"
        self.is_flux = type(pipe).__name__.startswith("Flux")
        self.is_sdxl = not self.is_flow and getattr(pipe, "text_encoder_2", None) is not None
        if self.is_sdxl and pipe.text_encoder is None:
            raise ModelLoadError("SDXL pipelines with a single text encoder (the refiner) are not supported; "
                                 "give an SDXL base model")
        # the denoising network: the UNet, or a flow model's transformer (the name stays for every caller)
        self.unet = pipe.transformer if self.is_flow else pipe.unet
        self.vae = pipe.vae
        # one module holding SDXL's (or a flow model's) encoders, whose config.hidden_size is the conditioning width
        if self.is_flow:
            self.text_encoder = FlowTextEncoders(
                [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")],
                self.unet.config.joint_attention_dim)
        else:
            self.text_encoder = (SDXLTextEncoders(pipe.text_encoder, pipe.text_encoder_2) if self.is_sdxl
                                 else pipe.text_encoder)
        self.tokenizer = pipe.tokenizer
        self.tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        self.scheduler = pipe.scheduler
        self.reference_unet: torch.nn.Module | None = None  # frozen copy, full fine-tuning only
        self.channels_last = False  # set_speed
        self.autocast_dtype: torch.dtype | None = None
        self.lora_config = None
        self._flow_schedules: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False)
            module.eval()
        for module in (self.unet, self.vae):
            use_sdpa(module)
        # SD3 without T5 appends 256 identical zero tokens: fold them into one (exact, see dpok.attention;
        # in fp32 only, where it pays: in half precision the fold needs fp32 attention)
        self.folded_text = (self.is_flow and not self.is_flux and getattr(pipe, "text_encoder_3", None) is None
                            and dtype == torch.float32)
        if self.folded_text:
            fold_text_tokens(self.unet, _T5_LENGTH["StableDiffusion3"], pipe.tokenizer_max_length + 1)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str = "shapeworld", device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> DiffusionAdapter:
        from diffusers import (
            DDIMScheduler,
            FluxPipeline,
            StableDiffusion3Pipeline,
            StableDiffusionPipeline,
            StableDiffusionXLPipeline,
        )

        source = resolve_model(model)
        class_name = pipeline_class_name(source)
        try:
            # only a non-default dtype is passed: the keyword's name changed across diffusers versions
            kwargs: dict[str, Any] = {"torch_dtype": dtype} if dtype != torch.float32 else {}
            if class_name.startswith("StableDiffusion3"):
                pipe = StableDiffusion3Pipeline.from_pretrained(source, **absent_components(source), **kwargs)
            elif class_name.startswith("Flux"):
                pipe = FluxPipeline.from_pretrained(source, **kwargs)
            elif class_name.startswith("StableDiffusionXL"):
                # no invisible watermark: rewards must score the images the policy produced
                pipe = StableDiffusionXLPipeline.from_pretrained(source, add_watermarker=False, **kwargs)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                               requires_safety_checker=False, **kwargs)
        except OSError as e:
            raise ModelLoadError(f"cannot load model {model!r}: {e}. Without network access give a local "
                                 "folder holding the pipeline (or 'shapeworld')") from e
        except Exception as e:  # corrupt weights or configs
            raise ModelLoadError(f"cannot load model {model!r} from {source}: {e}") from e
        if model_family(class_name) == "diffusion":
            # DDIM with eta > 0 is the stochastic policy both papers train (flow models keep their
            # flow-match Euler scheduler: the SDE policy is built on its sigmas)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return cls(pipe, device, dtype)

    @classmethod
    def from_pipeline(cls, pipe: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                      ) -> DiffusionAdapter:
        """A Stable Diffusion (1.x, 2.x), SDXL, SD3 or FLUX pipeline object already in memory. It is
        changed in place: an SD/SDXL scheduler becomes DDIM (same configuration), its modules move to
        ``device`` and its UNet (or transformer) is the one that gets the LoRA."""
        from diffusers import DDIMScheduler

        flow = model_family(type(pipe).__name__) == "flow-matching"
        missing = [part for part in ("transformer" if flow else "unet", "vae", "text_encoder", "tokenizer", "scheduler")
                   if getattr(pipe, part, None) is None]
        if missing:
            raise ModelLoadError(f"the pipeline object ({type(pipe).__name__}) has no {', '.join(missing)}; give a "
                                 "Stable Diffusion 1.x/2.x, SDXL, SD3 or FLUX pipeline")
        if not flow:
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return cls(pipe, device, dtype)

    @classmethod
    def load(cls, model: str = "shapeworld", lora: str = "", device: str = "auto") -> DiffusionAdapter:
        """``model`` (a folder, hub id or ``shapeworld``) on ``device`` (``auto``, ``cpu``, ``cuda[:N]``),
        in float32, with the LoRA of folder ``lora`` loaded when one is given (a run's ``lora/``)."""
        adapter = cls.from_pretrained(model, select_device(device))
        if lora:
            adapter.load_lora(lora)
        return adapter

    # ----------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Text conditioning for prompts and for the empty prompt (guidance).

        SD 1.x/2.x: the text encoder's last states (B, L, D). SDXL: both encoders' penultimate states
        (B, L, D1 + D2), the pooled embedding (B, P) and time ids (B, 6); the unconditional branch is
        all zeros when the pipeline's ``force_zeros_for_empty_prompt`` is set, as diffusers does.
        """
        if self.is_sdxl:
            return self._encode_sdxl(list(prompts))
        if self.is_flow:
            return self._encode_flow(list(prompts))

        def encode(texts: list[str]) -> torch.Tensor:
            ids = self._tokenize(self.tokenizer, texts)
            return self.text_encoder(ids)[0].to(self.dtype)

        cond = encode(list(prompts))
        uncond = encode([""]).expand(len(prompts), -1, -1).contiguous()
        return PromptEmbeds(cond, uncond)

    def _tokenize(self, tokenizer, texts: list[str]) -> torch.Tensor:  # noqa: ANN001
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def _encode_sdxl(self, prompts: list[str]) -> PromptEmbeds:
        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            states, pooled = self.text_encoder(self._tokenize(self.tokenizer, texts),
                                               self._tokenize(self.tokenizer_2, texts))
            return states.to(self.dtype), pooled.to(self.dtype)

        n = len(prompts)
        cond, pooled = encode(prompts)
        if self.pipe.config.force_zeros_for_empty_prompt:
            uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
        else:
            uncond, uncond_pooled = encode([""])
            uncond, uncond_pooled = uncond.expand(n, -1, -1).contiguous(), uncond_pooled.expand(n, -1).contiguous()
        time_ids = self.sdxl_time_ids().expand(n, -1).contiguous()
        return PromptEmbeds(cond, uncond, pooled, uncond_pooled, time_ids)

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens of a flow model's prompt: the pipeline's default (SD3 256, FLUX 512), capped by
        the T5 tokenizer's own maximum."""
        default = _T5_LENGTH["Flux" if self.is_flux else "StableDiffusion3"]
        t5_tokenizer = getattr(self.pipe, "tokenizer_2" if self.is_flux else "tokenizer_3", None)
        return min(default, t5_tokenizer.model_max_length) if t5_tokenizer is not None else default

    def _encode_flow(self, prompts: list[str]) -> PromptEmbeds:
        """The pipeline's own ``encode_prompt``: SD3's penultimate CLIP-L/G states padded to the T5
        width and followed by T5's (without T5 one zero token that the transformer's folded attention
        counts 256 times), pooled = both CLIP projections (B, P); FLUX's
        T5 states and CLIP's pooled output. The unconditional branch is the encoded empty prompt."""
        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            length = 1 if self.folded_text else self.max_sequence_length
            if self.is_flux:
                states, pooled, _ = self.pipe.encode_prompt(texts, None, device=self.device, max_sequence_length=length)
            else:
                states, _, pooled, _ = self.pipe.encode_prompt(texts, None, None, device=self.device,
                                                               do_classifier_free_guidance=False,
                                                               max_sequence_length=length)
            return states.to(self.dtype), pooled.to(self.dtype)

        n = len(prompts)
        cond, pooled = encode(prompts)
        uncond, uncond_pooled = encode([""])
        return PromptEmbeds(cond, uncond.expand(n, -1, -1).contiguous(), pooled,
                            uncond_pooled.expand(n, -1).contiguous())

    def sdxl_time_ids(self) -> torch.Tensor:
        """SDXL micro-conditioning (1, 6): original size, crop top-left (0, 0), target size, all at the
        native resolution (UNet sample size x VAE scale factor), what the pipeline uses by default."""
        size = self.unet.config.sample_size * self.pipe.vae_scale_factor
        ids = [size, size, 0, 0, size, size]
        expected = self.unet.config.projection_class_embeddings_input_dim
        got = self.unet.config.addition_time_embed_dim * len(ids) + self.text_encoder.config.projection_dim
        if expected != got:
            raise ModelLoadError(f"this SDXL UNet expects {expected} added-condition features but time ids and "
                                 f"the pooled text embedding give {got}; the text_encoder_2 does not match the UNet")
        return torch.tensor([ids], dtype=self.dtype, device=self.device)

    # ---------------------------------------------------------------------------------- denoiser
    def noise_pred(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                   guidance_scale: float = 1.0, reference: bool = False) -> torch.Tensor:
        """The denoiser's output (B, C, h, w) at latents (B, C, h, w), timesteps (B,): the noise (or v)
        prediction of a UNet, the velocity v = eps - x_0 of a flow model (timesteps 1000 t, float).

        ``guidance_scale`` w: eps_u + w (eps_c - eps_u), one batched UNet call for both branches;
        1.0 is the unguided conditional eps_theta(x_t, t, z) in a single call (the supervised
        losses). ``reference=True``: the pretrained weights (LoRA disabled, or the frozen copy),
        without gradients.

        The one denoiser evaluation shared by sampling and training, so log-probs at sampling
        time and at update time come from the same computation (ratio exactly 1 before updates).
        DDIM's ``scale_model_input`` is the identity, so it is not called.
        """
        if self.is_sdxl and embeds.time_ids is None:
            raise ValueError("SDXL needs the pooled text embeddings and time ids: build the PromptEmbeds with "
                             "encode_prompts (or index one from it), not from the encoder states alone")
        guided = self._flow_guided if self.is_flow else self._guided
        if self.channels_last and not self.is_flow:
            latents = latents.contiguous(memory_format=torch.channels_last)
        with contextlib.ExitStack() as stack:
            unet = self.unet
            if reference:
                stack.enter_context(torch.no_grad())
                stack.enter_context(self.reference())
                unet = self.reference_unet if self.reference_unet is not None else self.unet
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
            out = guided(unet, latents, timesteps, embeds, guidance_scale)
        # the step's mean, log-prob and KL stay in the weights' precision under autocast
        return out.to(self.dtype)

    def set_speed(self, channels_last: bool = False, autocast: str = "no", compile_denoiser: bool = False) -> None:
        """Speed options of the denoiser's calls in sampling and training (``benchmarks/denoiser_speed.py``
        measures each against the stock call):

        - ``channels_last``: UNet weights and inputs in NHWC, which oneDNN's and cuDNN's convolutions prefer
          (a flow model's transformer is left as it is);
        - ``autocast="bf16"``: the forward (and so the backward) under ``torch.autocast`` in bfloat16 with
          the weights kept in their dtype; outputs are cast back, so sampling and training still compute
          the same thing (ratio 1 before an update, up to batch-size rounding);
        - ``compile_denoiser``: ``torch.compile`` (inductor) of the denoiser in place, so its module, LoRA
          and state-dict names are unchanged; the first calls of each shape pay the compilation.
        """
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"--autocast must be one of {', '.join(AUTOCAST_DTYPES)} (got {autocast!r})")
        self.autocast_dtype = AUTOCAST_DTYPES[autocast]
        # a flow transformer's only convolution is its patch embedding: nothing for NHWC to speed up
        self.channels_last = channels_last and not self.is_flow
        if self.channels_last:
            for module in (self.unet, self.reference_unet):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        if compile_denoiser:
            for module in (self.unet, self.reference_unet):
                if module is not None:
                    module.compile()

    def _flow_guided(self, transformer, latents: torch.Tensor, timesteps: torch.Tensor,  # noqa: ANN001
                     embeds: PromptEmbeds, guidance_scale: float) -> torch.Tensor:
        """The velocity (B, C, h, w) of an SD3 or FLUX transformer at timesteps (B,) = 1000 t.

        SD3: classifier-free guidance as for the UNets. FLUX takes no unconditional branch: FLUX.1-dev
        gets ``guidance_scale`` through its guidance embedding, FLUX.1-schnell (no embedding) ignores it.
        """
        if embeds.pooled is None:
            raise ValueError("flow models need the pooled text embeddings: build the PromptEmbeds with encode_prompts")
        if not self.is_flux:
            def call(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
                return transformer(hidden_states=x, timestep=t, encoder_hidden_states=states,
                                   pooled_projections=pooled, return_dict=False)[0]

            if guidance_scale == 1.0:
                return call(latents, timesteps, embeds.cond, embeds.pooled)
            out = call(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                       torch.cat([embeds.uncond, embeds.cond]), torch.cat([embeds.uncond_pooled, embeds.pooled]))
            v_u, v_c = out.chunk(2)
            return v_u + guidance_scale * (v_c - v_u)
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        guidance = (torch.full((b,), guidance_scale, device=latents.device, dtype=torch.float32)
                    if transformer.config.guidance_embeds else None)
        out = transformer(
            hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w),  # 2x2 patches -> (B, h w / 4, 4 C)
            timestep=timesteps.to(latents.dtype) / 1000, guidance=guidance, pooled_projections=embeds.pooled,
            encoder_hidden_states=embeds.cond,
            txt_ids=torch.zeros(embeds.cond.shape[1], 3, device=latents.device, dtype=latents.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype),
            return_dict=False)[0]
        scale = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)

    @staticmethod
    def _guided(unet, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,  # noqa: ANN001
                guidance_scale: float) -> torch.Tensor:
        if guidance_scale == 1.0:
            return unet(latents, timesteps, embeds.cond, added_cond_kwargs=embeds.added_cond_kwargs()).sample
        # one batched call, unconditional half first, as the diffusers pipelines do
        added = embeds.added_cond_kwargs()
        if added is not None:
            uncond_added = embeds.added_cond_kwargs(unconditional=True)
            added = {k: torch.cat([uncond_added[k], v]) for k, v in added.items()}
        out = unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                   torch.cat([embeds.uncond, embeds.cond]), added_cond_kwargs=added).sample
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
    @contextlib.contextmanager
    def _vae_precision(self) -> Iterator[None]:
        """SDXL's VAE overflows in fp16: like its pipeline, run it in fp32 when its config asks to."""
        upcast = self.is_sdxl and self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            self.vae.to(torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(torch.float16)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel latent mean and std (1, C, 1, 1) of a VAE that declares them (some SDXL VAEs)."""
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is None or std is None:
            return None
        shape = (1, len(mean), 1, 1)
        return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(shape),
                torch.tensor(std, device=like.device, dtype=like.dtype).view(shape))

    def _latent_shift(self) -> float:
        """The VAE's ``shift_factor`` for flow models (the SD pipelines ignore it)."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0) if self.is_flow else 0.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x_0 latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1] (float32)."""
        scale = self.vae.config.scaling_factor
        with torch.no_grad(), self._vae_precision():
            z = latents.to(self.vae.dtype)
            stats = self._latent_stats(z)
            if stats is not None:
                z = z * stats[1] / scale + stats[0]  # the pipelines' exact arithmetic
            else:  # SD3's and FLUX's VAEs also shift the latents
                z = z / scale + self._latent_shift()
            x = self.vae.decode(z).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> scaled latents (B, C, h, w) (mode of the posterior)."""
        scale = self.vae.config.scaling_factor
        with torch.no_grad(), self._vae_precision():
            z = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.mode()
            stats = self._latent_stats(z)
            z = (z - self._latent_shift()) * scale if stats is None else (z - stats[0]) * scale / stats[1]
        return z.to(self.dtype)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) at the model's native resolution. FLUX's transformer takes 4 C packed channels and
        has no sample size: its native image size is the VAE's (1024 for FLUX.1)."""
        if self.is_flux:
            scale = self.pipe.vae_scale_factor
            size = 2 * (self.vae.config.sample_size // (scale * 2))
            return (self.unet.config.in_channels // 4, size, size)
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
        """``epsilon``, ``v_prediction`` or ``sample`` (the DDIM scheduler's), ``flow`` (velocity of a flow model)."""
        return "flow" if self.is_flow else self.scheduler.config.prediction_type

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The DDIM timesteps, high to low, (T,) long; a flow model's 1000 t, high to low, (T,) float."""
        if self.is_flow:
            return self._flow_schedule(num_steps)[0].clone()
        self.scheduler.set_timesteps(num_steps, device=self.device)
        return self.scheduler.timesteps.clone()

    def _flow_schedule(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A flow model's timesteps (T,) and times t (T + 1,) (ending at 0), as its pipeline sets them:
        the scheduler's shift (SD3: fixed; FLUX: ``mu`` from the image sequence length, on FLUX's
        linear sigmas)."""
        if num_steps not in self._flow_schedules:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            config, kwargs = self.scheduler.config, {}
            if config.get("use_dynamic_shifting", False):
                _, h, w = self.latent_shape
                patch = 2 if self.is_flux else self.unet.config.patch_size
                kwargs["mu"] = calculate_shift((h // patch) * (w // patch), config.get("base_image_seq_len", 256),
                                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                               config.get("max_shift", _MAX_SHIFT["Flux" if self.is_flux
                                                                                  else "StableDiffusion3"]))
            if self.is_flux and not config.get("use_flow_sigmas", False):
                self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device=self.device,
                                             **kwargs)
            else:
                self.scheduler.set_timesteps(num_steps, device=self.device, **kwargs)
            self._flow_schedules[num_steps] = (self.scheduler.timesteps.clone(), self.scheduler.sigmas.clone().float())
        return self._flow_schedules[num_steps]

    def flow_times(self, timesteps: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(t (B,), t_next (B,), t_cap) of a flow model's steps at ``timesteps`` (B,) of the
        ``num_steps`` schedule; t_cap is the schedule's second time (Flow-GRPO's sigma at t = 1)."""
        schedule, sigmas = self._flow_schedule(num_steps)
        schedule, sigmas = schedule.to(timesteps.device), sigmas.to(timesteps.device)
        index = (schedule[None] - timesteps.float()[:, None]).abs().argmin(1)
        t_cap = float(sigmas[1]) if len(sigmas) > 2 else 0.0
        return sigmas[index], sigmas[index + 1], t_cap

    @property
    def num_train_timesteps(self) -> int:
        """The length of the training noise schedule (1000 for Stable Diffusion)."""
        return self.scheduler.config.num_train_timesteps

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
        """The adapter's weights in peft's naming (``...lora_A.weight``), which ``load_lora_weights``
        reads as it is. Not diffusers' legacy naming: its converter renames only attention
        projections, and a file mixing both namings (LoRA on convolutions too) loads without the
        attention weights."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet)

    def save_lora(self, folder: str | Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(folder)`` loads.

        Saved through this model's own pipeline class (SD, SDXL, SD3 or FLUX), whose LoRA format its
        ``load_lora_weights`` expects.
        """
        if self.lora_config is None:
            raise RuntimeError("this model has no LoRA adapter to save (full fine-tuning saves the UNet)")
        folder = Path(folder)
        part = "transformer" if self.is_flow else "unet"
        type(self.pipe).save_lora_weights(
            folder, **{f"{part}_lora_layers": {k: v.detach().cpu().contiguous()  # channels-last convs
                                     for k, v in self.lora_state_dict().items()},
                       f"{part}_lora_adapter_metadata": self.lora_config.to_dict()},
            safe_serialization=True,
        )
        return folder / "pytorch_lora_weights.safetensors"

    def load_lora(self, folder: str | Path) -> None:
        """Load LoRA weights saved by :meth:`save_lora` (or any diffusers LoRA of this family) into the UNet."""
        folder = Path(folder)
        if not (folder / "pytorch_lora_weights.safetensors").is_file():
            raise ModelLoadError(f"no pytorch_lora_weights.safetensors in {folder}; give the 'lora' folder of a run")
        self.pipe.load_lora_weights(str(folder))
        # the loaded adapter is this model's LoRA from now on: reference() disables it, KL sees it
        configs = getattr(self.unet, "peft_config", {})
        if not configs:
            raise ModelLoadError(f"{folder} holds no UNet LoRA weights for this model")
        self.lora_config = next(reversed(configs.values()))
