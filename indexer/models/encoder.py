"""Load a CLIP model and embed images and texts with torch (onnx_export.py is the only other torch importer).

    encoder = load_encoder("demo")                       # the bundled demo model
    encoder = load_encoder("ViT-B-32", "laion2b_s34b_b79k")  # from the local open_clip cache
    encoder = load_encoder("ViT-B-32", checkpoint="vit-b-32.safetensors")
    vectors = encoder.embed_texts(["a cat sunbathing"])  # (1, 512) float32, L2-normalised

A pretrained tag is looked up in the local caches first and downloaded once where it is missing
(hub.py); offline, a miss fails at once with what to do. `hf-hub:org/name` names a model by the
hub repository holding its open_clip config and weights.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.hf_model import ClsLastHiddenStatePooler, ClsPooler, HFTextEncoder, MeanPooler
from open_clip.transformer import TextTransformer, text_global_pool
from PIL import Image

from indexer.errors import CheckpointError, ModelError
from indexer.models import hub
from indexer.models.hf_tokenizer import HfTokenizer
from indexer.models.identity import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    DEMO_MODEL,
    RANDOM_WEIGHTS,
    ModelId,
    demo_checkpoint,
    demo_config,
    demo_tokenizer,
    sha256_file,
)
from indexer.models.onnx_encoder import probe_picture, token_ends
from indexer.models.pixels import Preprocess, embed_in_batches

__all__ = ["HALF_COSINE", "Encoder", "fetch_weights", "load_encoder", "torch_devices"]

HALF_COSINE = 0.999  # pictures embed in float16 on a GPU where every probe keeps this cosine to float32


def torch_devices() -> list[str]:
    """The devices torch can embed on here: "cpu", "cuda:N" for each GPU it sees, "mps"."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def _check_architecture(name: str) -> None:
    if open_clip.get_model_config(name) is not None:
        return
    known = open_clip.list_models()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Known: {', '.join(known[:12])}, …"
    raise ModelError(f"unknown model architecture '{name}'.{hint}")


def _pretrained_file(architecture: str, tag: str, cache_dir: str | None, offline: bool | None) -> Path:
    """The local weights file of a pretrained tag: from the cache, else downloaded unless offline."""
    config = open_clip.get_pretrained_cfg(architecture, tag)
    if not config:
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        listed = ", ".join(tags) if tags else "none; pass --checkpoint FILE"
        raise ModelError(f"'{tag}' is not a pretrained tag of {architecture}. Its tags: {listed}")
    if config.get("hf_hub"):
        return hub.weights_file(hub.HubFiles.of_tag(architecture, tag, config["hf_hub"]), cache_dir, offline)
    # A few tags are plain URLs, which open_clip keeps in ~/.cache/clip.
    local = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(config["url"])
    if local.is_file():
        return local
    if hub.is_offline(offline):
        raise ModelError(
            f"the weights of {architecture} / {tag} are not on this machine ({local}), and clipseek is offline: "
            "copy that file here from a machine with internet access, or pass --checkpoint FILE"
        )
    try:
        return Path(open_clip.download_pretrained_from_url(config["url"], cache_dir=cache_dir))
    except Exception as error:  # any network failure
        raise ModelError(f"could not download {architecture} / {tag}: {error}") from error


def fetch_weights(architecture: str, tag: str, cache_dir: str | None = None, offline: bool | None = None) -> Path:
    """The local weights file of any open_clip tag, downloaded once where missing (`clipseek models fetch`)."""
    _check_architecture(architecture)
    return _pretrained_file(architecture, tag, cache_dir, offline)


def _read_checkpoint(path: Path) -> None:
    """Read the file as open_clip will, so that a file that cannot be read is told apart from
    one that reads but does not fit: a damaged pickle fails in any way (UnpicklingError,
    IndexError, EOFError, ...), and so does fitting weights to a model."""
    try:
        load_state_dict(str(path), weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):  # torch's weights-only unpickler met a callable
            raise CheckpointError(
                f"{path} is a pickle that would run code when loaded (it holds more than tensors), "
                "so clipseek refuses it. Use a .safetensors checkpoint, or a plain state dict "
                "saved with torch.save."
            ) from error
        raise _unreadable(path, error) from error
    except Exception as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated): {error}")


def _does_not_fit(path: Path, architecture: str, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} does not hold weights for the {architecture} architecture; "
        f"pass the --model it was trained as. ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    )


def load_encoder(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    *,
    device: str | None = None,
    cache_dir: str | None = None,
    offline: bool | None = None,
) -> Encoder:
    """Build an open_clip model with its weights and return an Encoder for it.

    Weights come from `checkpoint` (a local file), else from `pretrained` (an open_clip tag:
    from the local cache, downloaded once where missing; `"random"` initialises randomly on
    purpose), else from the model's default: the bundled weights for `demo`, laion2b_s34b_b79k for
    ViT-B-32. `model` may be `hf-hub:org/name`, a hub repository holding an open_clip config and
    its weights. `offline=True` (or CLIPSEEK_OFFLINE / HF_HUB_OFFLINE where it is None) never
    touches the network. Raises ModelError (or CheckpointError) with a message that says what to do.
    """
    from_hub = model.startswith(hub.HF_HUB_PREFIX)
    if model == DEMO_MODEL:
        open_clip.add_model_config(demo_config())
        if checkpoint is None and pretrained is None:
            checkpoint = demo_checkpoint()
    if from_hub:
        if checkpoint is not None or pretrained is not None:
            raise ModelError(f"{model} takes its weights from its hub repository: drop --pretrained and --checkpoint")
    else:
        _check_architecture(model)
    if checkpoint is None and pretrained is None and not from_hub:
        if model != DEFAULT_MODEL:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
            raise ModelError(f"say which weights {model} should use: --pretrained TAG ({tags}) or --checkpoint FILE")
        pretrained = DEFAULT_PRETRAINED

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    options: dict = {"device": device, "precision": "fp32", "weights_only": True}
    name = model  # what open_clip builds: a folder with config and weights for a hub model
    if from_hub:
        weights = hub.weights_file(hub.files_for(model, None), cache_dir, offline)
        name, sha256 = f"local-dir:{weights.parent}", sha256_file(weights)
    elif checkpoint is not None:
        weights = Path(checkpoint)
        if not weights.is_file():
            raise CheckpointError(f"checkpoint {weights} does not exist")
        pretrained, sha256 = None, sha256_file(weights)
    elif pretrained == RANDOM_WEIGHTS:
        weights, sha256 = None, None
        options["pretrained_text"] = False  # a Hugging Face text tower random too, not its own weights
    else:
        weights, sha256 = _pretrained_file(model, pretrained, cache_dir, offline), None
        tag_config = open_clip.get_pretrained_cfg(model, pretrained)
        # Loading the tag's file by path skips open_clip's per-tag settings; apply them here.
        options["force_quick_gelu"] = bool(tag_config.get("quick_gelu", False))
        for key in ("mean", "std", "interpolation", "resize_mode"):
            if key in tag_config:
                options[f"image_{key}"] = tag_config[key]

    if not from_hub:
        hub.text_files(model, cache_dir, offline)  # a Hugging Face tokenizer's files, say
    if weights is None:
        # Seeded so that a random model is the same in every process (benchmarks compare runs);
        # open_clip's warning about random weights is noise here: they were asked for.
        with torch.random.fork_rng(devices=[]), _quiet_logging(), _needs_transformers(model), hub.client_offline():
            torch.manual_seed(0)
            clip, _, preprocess = open_clip.create_model_and_transforms(model, **options)
    else:
        _read_checkpoint(weights)  # read twice (the second from the page cache) for clear errors
        if not from_hub:  # a hub model's folder names its weights itself
            options["pretrained"] = str(weights)
        try:
            with _needs_transformers(model), hub.client_offline():
                clip, _, preprocess = open_clip.create_model_and_transforms(name, **options)
        except ModelError:
            raise
        except Exception as error:  # open_clip's key conversions and resizing fail in many ways
            raise _does_not_fit(weights, model, error) from error
    try:
        if model == DEMO_MODEL:  # read without transformers, which the demo must not need
            tokenizer = TorchHfTokenizer(
                demo_tokenizer(), open_clip.get_model_config(name)["text_cfg"]["context_length"]
            )
        else:
            with _needs_transformers(model), hub.client_offline():
                tokenizer = open_clip.get_tokenizer(name)
    except ModelError:
        raise
    except Exception as error:  # e.g. a Hugging Face tokenizer that is not available offline
        raise ModelError(f"cannot load the tokenizer of {model}: {error}") from error
    size = clip.visual.preprocess_cfg["size"]
    size = size if isinstance(size, int) else tuple(size)
    if isinstance(size, tuple) and size[0] == size[1]:
        size = size[0]
    identity = ModelId(model, pretrained, sha256, open_clip.get_model_config(name)["embed_dim"], size)
    return Encoder(clip, tokenizer, preprocess, identity, device)


class TorchHfTokenizer(HfTokenizer):
    """A tokenizer.json read by the `tokenizers` library, giving torch's tensors as open_clip's tokenizers do."""

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(super().__call__(texts))


@contextlib.contextmanager
def _needs_transformers(model: str):
    """open_clip builds Hugging Face text towers and tokenizers (multilingual models, SigLIP) with
    the transformers package, and says so in a RuntimeError or an ImportError: say what to install."""
    try:
        yield
    except (ImportError, RuntimeError) as error:
        if "transformers" not in str(error):
            raise
        raise ModelError(
            f"{model} reads text with a Hugging Face text tower or tokenizer, which needs the transformers "
            "package: pip install 'clipseek[hf]'"
        ) from error


@contextlib.contextmanager
def _quiet_logging():
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


# Hugging Face poolers that read only the tokens the attention mask keeps: the mean over them, or
# the first (class) token. (open_clip's MaxPooler fills the kept tokens, not the padding, and
# would not survive trimming.)
MASKED_POOLERS = (MeanPooler, ClsPooler, ClsLastHiddenStatePooler)


def _trim_pool(model: torch.nn.Module, tokenizer) -> tuple[torch.nn.Module, str] | None:
    """The text tower and its pooling when trimming padding leaves the embedding unchanged.

    That holds where attention is causal (no token sees the padding after it) and the pooled
    token is the end-of-text token, which trimming keeps: OpenAI-style towers such as ViT-B-32
    ("argmax" or "eos"). It holds too for Hugging Face text towers (XLM-RoBERTa, NLLB), which
    mask their padding out of attention and pool over the tokens the mask keeps, where the
    padding is on the right ("mask": positions are counted from the start, so cutting the end
    changes none). It does not hold for bidirectional towers without a mask (MobileCLIP-S1/S2,
    SigLIP), appended class tokens (CoCa) or padding on the left (Gemma's, for SigLIP 2).
    """
    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        padding_side = getattr(getattr(tokenizer, "tokenizer", None), "padding_side", None)
        exact = isinstance(text.pooler, MASKED_POOLERS) and padding_side == "right"
        return (text, "mask") if exact and text.config.pad_token_id is not None else None
    if isinstance(model, open_clip.CLIP):
        tower, pool = model, model.text_pool_type
    elif isinstance(text, TextTransformer):
        tower, pool = text, text.pool_type
        if tower.cls_emb is not None or tower.use_pad_mask:
            return None
    else:
        return None
    if tower.attn_mask is None or pool not in ("argmax", "eos"):
        return None
    return tower, pool


class Encoder:
    """A loaded CLIP model that embeds images and texts into L2-normalised float32 rows."""

    def __init__(self, model, tokenizer, preprocess, model_id: ModelId, device: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        # The loader (which owns decoding) applies this to each PIL image before embed_images.
        self.preprocess: Callable[[Image.Image], torch.Tensor] = preprocess
        # The same numbers without torch where the port has them (decoding processes need not load torch).
        self.pixel_preprocess: Callable[[Image.Image], np.ndarray | torch.Tensor] = _ported(model, preprocess)
        self.model_id = model_id
        self.device = device
        self.half_pictures = False  # pictures through float16 autocast (to_device measures whether it is faithful)
        self._trim = _trim_pool(model, tokenizer)

    def to_device(self, device: str, half: bool | None = None) -> Encoder:
        """Move the model to `device` ("cpu", "cuda:N", "mps"); returns self.

        `half`: embed pictures in float16 (torch's autocast: weights stay float32, matrix products
        run in half precision, normalisations in float32). None (the default): on a GPU, where
        half_precision_cosine() measures every probe picture within HALF_COSINE of float32; never
        on the CPU, where float16 is slower than float32. Texts stay float32: one query at a time
        gains nothing from it. The vectors returned are float32 either way.
        """
        self.model.to(device)
        self.device = device
        self.half_pictures = False
        if half is None:
            half = device != "cpu" and self.half_precision_cosine() >= HALF_COSINE
        self.half_pictures = half
        return self

    def half_precision_cosine(self) -> float:
        """The lowest cosine between a probe picture's float16 and float32 vectors, on this device."""
        pixels = [self.preprocess(picture) for picture in _probe_pictures()]
        half, self.half_pictures = self.half_pictures, False
        try:
            exact = self.embed_preprocessed(pixels)
            self.half_pictures = True
            approximate = self.embed_preprocessed(pixels)
        finally:
            self.half_pictures = half
        return float((exact * approximate).sum(1).min())

    @property
    def runs_on(self) -> str:
        """Where pictures embed, for the run's summary and `clipseek status`."""
        return f"{self.device} (torch{', float16' if self.half_pictures else ''})"

    @property
    def logit_scale(self) -> float:
        """The model's learned temperature: cosine similarities times this are its logits."""
        return float(self.model.logit_scale.detach().exp())

    @property
    def logit_bias(self) -> float | None:
        """The sigmoid loss's learned bias (SigLIP's family); None for a model trained with CLIP's softmax."""
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach())

    @property
    def trims_text(self) -> bool:
        """Whether embed_texts drops padding tokens (only where that is exact)."""
        return self._trim is not None

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Embed RGB PIL images: (n, dim) float32, each row of unit length."""
        return embed_in_batches(images, batch_size, self.preprocess, self.embed_preprocessed, self.model_id.dim)

    def embed_preprocessed(self, pixels: Sequence[torch.Tensor | np.ndarray]) -> np.ndarray:
        """Embed one batch of images already put through `preprocess` (as the indexer's workers do;
        arrays where they came from another process, as on Ray; tensors on the GPU where they were
        decoded there)."""
        with torch.inference_mode():
            tensors = [torch.as_tensor(p) for p in pixels]
            if self.device.startswith("cuda") and tensors[0].device.type == "cpu":
                # Stacked into page-locked memory, which the GPU copies from without a staging copy
                # and without holding this thread (torch caches such blocks from batch to batch).
                staging = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
                batch = torch.stack(tensors, out=staging)
            else:
                batch = torch.stack(tensors)
            batch = batch.to(self.device, non_blocking=True)
            kind = torch.device(self.device).type
            with torch.autocast(kind, torch.float16, enabled=self.half_pictures):
                vectors = self.model.encode_image(batch)
            # Normalised in float32: a float16 vector's norm rounds to a few parts in a thousand.
            return torch.nn.functional.normalize(vectors.float(), dim=-1).cpu().numpy()

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, trim: bool = True) -> np.ndarray:
        """Embed texts: (n, dim) float32, each row of unit length.

        With `trim` (the default) a batch is cut to its longest real token sequence where that
        gives the same embedding; texts are batched by length so short ones are not padded to
        long ones. `trim=False` always runs the full context length.
        """
        tokens = self.tokenizer(list(texts))
        out = np.zeros((len(texts), self.model_id.dim), np.float32)
        trim = trim and self._trim is not None
        order = torch.argsort(self._ends(tokens), descending=True, stable=True) if trim else torch.arange(len(texts))
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                batch = tokens[rows].to(self.device)
                vectors = self._encode_trimmed(batch) if trim else self.model.encode_text(batch, normalize=True)
                out[rows.numpy()] = vectors.float().cpu().numpy()
        return out

    def _ends(self, tokens: torch.Tensor) -> torch.Tensor:
        """Where each text's last token that matters is (see token_ends)."""
        tower, pool = self._trim
        return torch.from_numpy(token_ends(tokens.numpy(), pool, special_id(tower, pool)))

    def _encode_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        tower, pool = self._trim
        return text_forward(tower, pool, tokens[:, : int(self._ends(tokens).max()) + 1])

    @property
    def text_pooling(self) -> tuple[torch.nn.Module, str] | None:
        """The text tower and its pooling ("argmax", "eos" or "mask") where trimming is exact, else None."""
        return self._trim


def _ported(model, preprocess: Callable) -> Callable:
    """open_clip's transform as a Preprocess (PIL and numpy) where that is ported and gives its
    numbers on a probe picture (as the ONNX export checks), else the transform itself."""
    try:
        ported = Preprocess.from_open_clip(model.visual.preprocess_cfg)
    except (AttributeError, KeyError, TypeError, ValueError):
        return preprocess
    picture = probe_picture().resize((301, 257))
    return ported if np.allclose(ported(picture), preprocess(picture).numpy(), atol=1e-5) else preprocess


def _probe_pictures() -> list[Image.Image]:
    """Pictures unlike each other (smooth, inverted, noise, flat), for half_precision_cosine."""
    smooth = probe_picture()
    noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return [
        smooth,
        smooth.transpose(Image.Transpose.ROTATE_90).point(lambda value: 255 - value),
        Image.fromarray(noise),
        Image.new("RGB", (200, 150), (40, 120, 200)),
    ]


def eos_id(tower: torch.nn.Module) -> int | None:
    return getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))


def special_id(tower: torch.nn.Module, pool: str) -> int | None:
    """The token that token_ends looks for: the end token ("eos"), the padding ("mask"), none ("argmax")."""
    return tower.config.pad_token_id if pool == "mask" else eos_id(tower)


def text_forward(tower: torch.nn.Module, pool: str, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's text forward (CLIP.encode_text / TextTransformer.forward) on tokens cut to any
    length n: position embeddings and the causal mask are cut to n too; a Hugging Face tower
    ("mask") takes any length as it is. The ONNX export traces it."""
    if pool == "mask":
        return torch.nn.functional.normalize(tower(tokens), dim=-1)
    n = tokens.shape[1]
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast) + tower.positional_embedding[:n].to(cast)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
    x = text_global_pool(tower.ln_final(x), tokens, pool, eos_token_id=eos_id(tower))
    projection = tower.text_projection
    if isinstance(projection, torch.nn.Linear):
        x = projection(x)
    elif projection is not None:
        x = x @ projection
    return torch.nn.functional.normalize(x, dim=-1)
