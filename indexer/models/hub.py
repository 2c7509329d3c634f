"""Model weights from the Hugging Face hub: found in its cache, or fetched once, without torch.

    hub.prepare("ViT-B-32", None, None)    # the default's weights: cached, else downloaded now
    hub.prepare("ViT-B-32", None, None, offline=True)   # cached, else ModelError at once

open_clip keeps its weights in the hub's cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub), one folder per repository; clipseek reads and fills the same cache, so
a folder copied from another machine is found. A download shows the hub's progress bar (size and
rate) where stderr is a terminal. Offline (`offline=True`, CLIPSEEK_OFFLINE=1 or HF_HUB_OFFLINE=1)
nothing touches the network. Before downloading, one request asks the hub for the file without
retries, so an unreachable hub fails in well under a second instead of the hub client's minute of
retries; a download cut in the middle leaves no entry in the cache (the hub client writes to an
`.incomplete` file and renames it only when its size is right).

The models of choices.py and `hf-hub:org/name` models are resolved here without torch; other
open_clip tags are resolved by the encoder from open_clip's own table (which needs torch), through
`weights_file` all the same.

A model whose tokenizer or text tower is Hugging Face's (multilingual models, SigLIP) also reads
those repositories' small files (tokenizer, configuration); `text_files` fetches them the same
way, and `client_offline` then keeps transformers from asking the network for them again (it
retries an unreachable hub for over a minute per file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from importlib import util
from pathlib import Path

from indexer.errors import CheckpointError, ModelError
from indexer.models.choices import choice_of
from indexer.models.identity import DEFAULT_MODEL, DEFAULT_PRETRAINED, DEMO_MODEL, RANDOM_WEIGHTS

__all__ = [
    "HF_HUB_PREFIX",
    "HubFiles",
    "cached",
    "client_offline",
    "files_for",
    "is_offline",
    "prepare",
    "text_files",
    "text_repos",
    "weights_file",
]

log = logging.getLogger("clipseek")

HF_HUB_PREFIX = "hf-hub:"  # open_clip's prefix for a model named by its hub repository
OFFLINE_VARIABLES = ("CLIPSEEK_OFFLINE", "HF_HUB_OFFLINE")
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's names, safest first
CONFIG_FILE = "open_clip_config.json"
PROBE_TIMEOUT = 5.0  # seconds for the hub to answer the first request
# What transformers reads of a tokenizer's or a text tower's repository when open_clip builds the
# model (the text tower's weights come with the model's own): each that the repository has.
TEXT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


def is_offline(offline: bool | None = None) -> bool:
    """Whether the network is forbidden: `offline` when given, else CLIPSEEK_OFFLINE or HF_HUB_OFFLINE."""
    if offline is not None:
        return offline
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


@dataclass(frozen=True)
class HubFiles:
    """A model's files on the hub: the first of `candidates` the repository has holds the weights;
    a model named by its repository (`hf-hub:`) has its open_clip config there too."""

    repo: str
    candidates: tuple[str, ...]
    label: str  # the model as a user names it
    fetch_args: str  # what `clipseek models fetch` takes to fetch it
    config: str | None = None
    before: tuple[str, ...] = ()  # small files fetched before the weights, each where the repository has it
    checkpoint: bool = True  # whether `--checkpoint FILE` can stand in for these weights

    @classmethod
    def of_tag(cls, architecture: str, tag: str, hf_hub: str) -> HubFiles:
        """From open_clip's `hf_hub` entry of a tag: `org/repo/` or `org/repo/file`."""
        repo, filename = os.path.split(hf_hub)
        candidates = (filename.rsplit(".", 1)[0] + ".safetensors", filename) if filename else WEIGHTS_FILES
        label, fetch_args = f"{architecture} / {tag}", f"{architecture} --pretrained {tag}"
        return cls(repo, tuple(dict.fromkeys(candidates)), label, fetch_args)


def files_for(architecture: str, pretrained: str | None) -> HubFiles | None:
    """The hub files of an `hf-hub:` model or a listed model, known without torch; else None."""
    if architecture.startswith(HF_HUB_PREFIX):
        repo = architecture[len(HF_HUB_PREFIX) :]
        return HubFiles(repo, WEIGHTS_FILES, architecture, architecture, CONFIG_FILE)
    choice = choice_of(architecture, pretrained) if pretrained else None
    return None if choice is None else HubFiles.of_tag(architecture, choice.pretrained, choice.hf_repo + "/")


def prepare(
    model: str | None,
    pretrained: str | None,
    checkpoint: str | os.PathLike | None,
    *,
    cache_dir: str | None = None,
    offline: bool | None = None,
) -> None:
    """Check, before torch is imported, what can be: that a checkpoint file exists, and that the
    weights of a listed or `hf-hub:` model are in the cache, fetching them unless offline.
    Raises CheckpointError or ModelError with what to do."""
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise CheckpointError(f"checkpoint {checkpoint} does not exist")
        return
    model = model or DEFAULT_MODEL
    if model == DEFAULT_MODEL and pretrained is None:
        pretrained = DEFAULT_PRETRAINED
    if model == DEMO_MODEL:
        return
    text_files(model, cache_dir, offline)
    if pretrained == RANDOM_WEIGHTS:
        return
    files = files_for(model, pretrained)
    if files is not None:
        weights_file(files, cache_dir, offline)


def text_repos(architecture: str) -> tuple[str, ...]:
    """The hub repositories an open_clip architecture reads its tokenizer or text tower's
    configuration from: none for CLIP's own tokenizer. Read from open_clip's config file without
    importing open_clip (which imports torch)."""
    spec = util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec else []
    try:
        config = json.loads((Path(folders[0]) / "model_configs" / f"{architecture}.json").read_text("utf-8"))
        text = config["text_cfg"]
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        return ()
    return tuple(dict.fromkeys(text[key] for key in ("hf_tokenizer_name", "hf_model_name") if key in text))


def text_files(architecture: str, cache_dir: str | os.PathLike | None = None, offline: bool | None = None) -> None:
    """The tokenizer and text-tower files `architecture` reads from the hub: in the cache, else
    fetched now unless offline; ModelError at once where they cannot be had, or where open_clip
    could not read them (it builds such models with the transformers package)."""
    repos = text_repos(architecture)
    if repos and util.find_spec("transformers") is None:
        raise ModelError(
            f"{architecture} reads text with a Hugging Face text tower or tokenizer, which needs the transformers "
            "package: pip install 'clipseek[hf]'"
        )
    for repo in repos:
        files = HubFiles(repo, TEXT_FILES, f"the tokenizer files of {architecture} ({repo})", architecture)
        if _text_files_cached(files, cache_dir):
            continue
        if is_offline(offline):
            raise _missing(files, cache_dir, "clipseek is offline (--offline, CLIPSEEK_OFFLINE or HF_HUB_OFFLINE)")
        _fetch_text_files(files, cache_dir)


@contextlib.contextmanager
def client_offline():
    """The hub client (and transformers through it) kept off the network: for building a model
    whose hub files `text_files` has put in the cache."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _text_files_cached(files: HubFiles, cache_dir: str | os.PathLike | None) -> bool:
    """Whether a tokenizer's repository is in the cache: its configuration is fetched last, so it
    marks a complete fetch."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(files.repo, "tokenizer_config.json", cache_dir=cache_root(cache_dir))
    return found is not None  # a file, or the hub's record that the repository has none


def _fetch_text_files(files: HubFiles, cache_dir: str | os.PathLike | None) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    hub, root = endpoint(), cache_root(cache_dir)
    try:
        with _quiet_hub():
            get_hf_file_metadata(hf_hub_url(files.repo, TEXT_FILES[0], endpoint=hub), timeout=PROBE_TIMEOUT)
    except (EntryNotFoundError, RepositoryNotFoundError):
        pass  # the hub answers: each file is asked for below
    except Exception as error:  # the network client's connection, timeout and HTTP errors
        raise _missing(files, cache_dir, f"the model hub at {hub} cannot be reached ({_short(error)})") from None
    log.info(f"downloading {files.label} from {hub}, once")
    order = [name for name in files.candidates if name != "tokenizer_config.json"] + ["tokenizer_config.json"]
    for name in order:
        try:
            with _quiet_hub():
                hf_hub_download(files.repo, name, cache_dir=root, endpoint=hub)
        except RepositoryNotFoundError:
            raise ModelError(f"the model hub at {hub} has no repository {files.repo} ({files.label})") from None
        except EntryNotFoundError:
            continue  # each repository has some of these files
        except Exception as error:
            raise ModelError(f"the download of {files.label} failed ({_short(error)}): run the command again") from None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub's cache folder. The variables are read on each call (the hub client reads them
    once, on import), so that a process can point clipseek at another cache or hub."""
    from huggingface_hub import constants

    return Path(cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def repo_folder(files: HubFiles, cache_dir: str | os.PathLike | None = None) -> Path:
    """The repository's folder in the cache: what to copy to a machine without internet access."""
    from huggingface_hub.file_download import repo_folder_name

    return cache_root(cache_dir) / repo_folder_name(repo_id=files.repo, repo_type="model")


def cached(files: HubFiles, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The weights file in the cache (with the config beside it, where there is one), or None."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = cache_root(cache_dir)
    if files.config and not isinstance(try_to_load_from_cache(files.repo, files.config, cache_dir=cache_dir), str):
        return None
    for candidate in files.candidates:
        found = try_to_load_from_cache(files.repo, candidate, cache_dir=cache_dir)
        if isinstance(found, str):
            return Path(found)
    return None


def weights_file(files: HubFiles, cache_dir: str | os.PathLike | None = None, offline: bool | None = None) -> Path:
    """The local weights file: from the cache, else downloaded into it unless offline."""
    found = cached(files, cache_dir)
    if found is not None:
        return found
    if is_offline(offline):
        raise _missing(files, cache_dir, "clipseek is offline (--offline, CLIPSEEK_OFFLINE or HF_HUB_OFFLINE)")
    return _fetch(files, cache_dir)


def _fetch(files: HubFiles, cache_dir: str | os.PathLike | None) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    hub, cache_dir = endpoint(), cache_root(cache_dir)
    found = None
    for candidate in files.candidates:
        try:
            with _quiet_hub():
                url = hf_hub_url(files.repo, candidate, endpoint=hub)
                found = candidate, get_hf_file_metadata(url, timeout=PROBE_TIMEOUT, endpoint=hub).size
            break
        except EntryNotFoundError:
            continue
        except RepositoryNotFoundError:
            raise ModelError(f"the model hub at {hub} has no repository {files.repo} ({files.label})") from None
        except Exception as error:  # the network client's connection, timeout and HTTP errors
            reason = f"the model hub at {hub} cannot be reached ({_short(error)})"
            raise _missing(files, cache_dir, reason) from None
    if found is None:
        raise ModelError(f"the hub repository {files.repo} holds none of {', '.join(files.candidates)}")
    name, size = found
    size_text = f"{size / 1e6:,.0f} MB" if size else "size unknown"
    log.info(f"downloading {files.label} ({size_text}) from {hub} into {repo_folder(files, cache_dir)}, once")
    try:
        with _quiet_hub():
            if files.config:
                config = hf_hub_download(files.repo, files.config, cache_dir=cache_dir, endpoint=hub)
                _fetch_own_tokenizer(files.repo, Path(config), cache_dir, hub)
            for extra in files.before:
                with contextlib.suppress(EntryNotFoundError):
                    hf_hub_download(files.repo, extra, cache_dir=cache_dir, endpoint=hub)
            return Path(hf_hub_download(files.repo, name, cache_dir=cache_dir, endpoint=hub))
    except Exception as error:  # a cut connection, a full disk, a hub error: nothing half-made is kept
        raise ModelError(
            f"the download of {files.label} failed ({_short(error)}); the cache holds no partial copy: "
            "run the command again to download it"
        ) from None


def _fetch_own_tokenizer(repo: str, config: Path, cache_dir: Path, hub: str) -> None:
    """A model whose config names a Hugging Face tokenizer keeps its files beside the weights,
    where open_clip reads them (before the weights, whose presence marks a complete download)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    if not json.loads(config.read_text("utf-8")).get("model_cfg", {}).get("text_cfg", {}).get("hf_tokenizer_name"):
        return
    for name in TEXT_FILES:
        with contextlib.suppress(EntryNotFoundError):  # each repository has some of these files
            hf_hub_download(repo, name, cache_dir=cache_dir, endpoint=hub)


def _missing(files: HubFiles, cache_dir: str | os.PathLike | None, reason: str) -> ModelError:
    folder = repo_folder(files, cache_dir)
    weights = files.candidates != TEXT_FILES
    either = weights and files.checkpoint
    return ModelError(
        f"{'the weights of ' if weights else ''}{files.label} are not on this machine, and {reason}. "
        f"{'Either run' if either else 'Run'} `clipseek models fetch {files.fetch_args}` on a machine with "
        f"internet access and copy the folder {folder.name} from its model cache (~/.cache/huggingface/hub) "
        f"into {folder.parent} here"
        + (", or pass --checkpoint FILE with these weights as a local .safetensors file." if either else ".")
    )


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


@contextlib.contextmanager
def _quiet_hub():
    """The hub client's warnings (retries, resumed downloads) would bury clipseek's one message;
    its progress bar stays."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
