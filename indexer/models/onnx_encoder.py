"""Embed images and texts with ONNX Runtime: the query path that imports neither torch nor open_clip.

    encoder = OnnxEncoder(folder, model_id)      # an export made by indexer/onnx_export.py
    encoder.embed_texts(["a cat sunbathing"])    # (1, dim) float32, the torch path's vectors

An export is a folder: the text and image towers as ONNX files, the tokenizer's files (CLIP's
merges, or a Hugging Face tokenizer's folder: SigLIP, SigLIP 2, the multilingual models) and a
manifest.json saying which model they are (its ModelId), how to tokenise, trim and preprocess,
its score scale (logit scale and bias), and what each tower gave for a fixed probe when it was
exported. Each tower also has a copy with 8-bit weights; a query's text
goes through it where the export measured it faithful (see OnnxEncoder), on the CPU in the form
ONNX Runtime's graph optimisations gave it at export (loaded with them off). Each tower is loaded
on its first use; its files must have their recorded sizes and checksums, and it must
reproduce its probe (cosine ≥ PROBE_COSINE), before it embeds anything: a damaged file gives an
error, never a wrong vector. This is the only module that imports onnxruntime.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from indexer.errors import DeviceError, ModelError
from indexer.models.identity import ModelId
from indexer.models.pixels import Preprocess, embed_in_batches

if TYPE_CHECKING:
    from indexer.models.hf_tokenizer import HfTokenizer
    from indexer.models.tokenizer import ClipTokenizer

__all__ = [
    "FORMAT",
    "INT8_COSINE",
    "INT8_PROBE_TEXTS",
    "MANIFEST",
    "PROBE_TEXT",
    "ExportBrokenError",
    "OnnxEncoder",
    "cuda_provider",
    "file_checksum",
    "probe_picture",
    "token_ends",
]

FORMAT = 7  # of the export folder; an export of another format is made again (7: the int8 text tower optimised)
MANIFEST = "manifest.json"
PROBE_TEXT = "a photo of a cat sunbathing on a windowsill"
PROBE_COSINE = 0.9999  # a tower must give at least this cosine to its exported probe vector
INT8_COSINE = 0.999  # the int8 text tower embeds queries where every probe text keeps this cosine to float32
INT8_PROBE_TEXTS = (  # queries as people type them: short and long, in several scripts
    "cat",
    "a dog",
    PROBE_TEXT,
    "a large red circle",
    "a small blue square over sand",
    "two children playing football on a beach at sunset, seen from far away",
    "black and white portrait of an old man with a beard, wearing a hat, in the rain",
    "screenshot of a spreadsheet",
    "the Eiffel Tower at night",
    "a handwritten note on yellow paper",
    "一只晒太阳的猫",
    "夕暮れの富士山",
    "강아지와 고양이",
    "قطة نائمة",
    "🐱☀️",
    "NSFW",
    "a photo of " + "many " * 40 + "birds",  # past the context length
)


class ExportBrokenError(ModelError):
    """An export is missing, damaged or of another model: it is made again, or torch embeds."""


def probe_picture() -> Image.Image:
    """A fixed picture with structure at every scale, embedded at export and checked at load."""
    y, x = np.mgrid[0:256, 0:256].astype(np.float32)
    rgb = np.stack([x, y, 128 + 127 * np.sin(x / 9) * np.cos(y / 13)], axis=-1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def token_ends(tokens: np.ndarray, pool: str, special: int | None) -> np.ndarray:
    """Where each row's last token that the tower's vector depends on is, for trimming: the end
    token, the highest id ("argmax") or the `special` id ("eos"); or, for a tower that masks
    its padding ("mask"), the last token that is not the padding id `special`."""
    if pool == "argmax":
        return tokens.argmax(1)
    if pool == "eos":
        return (tokens == special).argmax(1)
    return tokens.shape[1] - 1 - (tokens != special)[:, ::-1].argmax(1)


def cuda_provider() -> bool:
    """Whether this ONNX Runtime has its CUDA provider (the onnxruntime-gpu package)."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def file_checksum(path: Path) -> int:
    """CRC-32 of a file: it catches damage to any weight, which the probes alone would not (a
    token's embedding row only matters to texts with that token). Computed over a read-only map
    of the file, with no copy out of the page cache: xlm-roberta-base's 280 MB int8 text tower
    takes 0.07 s of CPU, against 0.13 s read in blocks."""
    with open(path, "rb") as stream:
        if os.fstat(stream.fileno()).st_size == 0:  # an empty file cannot be mapped
            return zlib.crc32(b"")
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return zlib.crc32(mapped)


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportBrokenError(f"no ONNX export at {folder}") from None
    except (OSError, ValueError) as error:
        raise ExportBrokenError(f"the ONNX export at {folder} has an unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportBrokenError(f"the ONNX export at {folder} is of another format")
    return manifest


class OnnxEncoder:
    """A model's export, embedding into L2-normalised float32 rows like indexer.models.encoder.Encoder."""

    def __init__(
        self,
        folder: str | Path,
        model_id: ModelId,
        rebuild: Callable[[ExportBrokenError], None] | None = None,
        int8: str = "faithful",
        device: str = "cpu",
    ):
        """Open the export in `folder`, which must be of `model_id`. `rebuild` makes the export
        again (it needs torch); a tower found damaged is rebuilt once, else it is an error.
        `int8`: which towers embed with their weights quantised to 8 bits: "faithful" (the
        text tower where the export measured every INT8_PROBE_TEXTS within INT8_COSINE of
        float32: a query's text is embedded on every request, and reading a quarter of the
        weights halves its latency; pictures, embedded once for the index, stay float32),
        "all" (opt-in: both, about twice as fast, slightly different vectors) or "none".
        `device`: "cpu", or "cuda:N" for ONNX Runtime's CUDA provider on that GPU (pictures and
        texts in float32 there; the int8 text tower, where used, runs on the CPU provider)."""
        if int8 not in ("faithful", "all", "none"):
            raise ValueError(f"int8 must be 'faithful', 'all' or 'none', not {int8!r}")
        self.folder = Path(folder)
        self.device = device
        self._int8 = int8
        self._rebuild = rebuild
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._rebuilding = threading.Lock()
        self._sessions: dict[str, Future] = {}
        self._read(model_id)

    def _read(self, model_id: ModelId) -> None:
        manifest = read_manifest(self.folder)
        try:
            exported = ModelId.from_dict(manifest["model"])
        except (KeyError, TypeError) as error:
            raise ExportBrokenError(f"the ONNX export at {self.folder} names no model ({error})") from None
        if exported != model_id:
            raise ExportBrokenError(f"the ONNX export at {self.folder} is of {exported}, not of {model_id}")
        self.manifest = manifest
        self.model_id = model_id
        self.logit_scale: float = manifest["logit_scale"]
        self.logit_bias: float | None = manifest["logit_bias"]
        self.preprocess = Preprocess.from_dict(manifest["image"]["preprocess"])
        self.pixel_preprocess = self.preprocess  # the indexer's decoding processes run it: it pickles
        self._tokenizer: ClipTokenizer | HfTokenizer | None = None
        self.int8_towers = frozenset({"text", "image"} if self._int8 == "all" else ())
        if self._int8 == "faithful":
            try:
                faithful = manifest["text_int8"]["cosine"] >= INT8_COSINE
            except (KeyError, TypeError) as error:
                raise ExportBrokenError(f"the ONNX export at {self.folder} has no int8 measurement ({error})") from None
            self.int8_towers = frozenset({"text"} if faithful else ())

    @property
    def runs_on(self) -> str:
        """Where pictures embed, for the run's summary and `clipseek status`."""
        return f"{self.device} (ONNX Runtime)"

    @property
    def trims_text(self) -> bool:
        return self.manifest["text"]["trim"]

    @property
    def tokenizer(self) -> ClipTokenizer | HfTokenizer:
        with self._tokenizer_lock:  # not self._lock: checking the text tower tokenises its probe
            if self._tokenizer is None:
                # Imported here (ftfy's tables take 0.05 s): a cold query's text tower starts
                # loading in its thread first, and a picture's embedding never needs them.
                from indexer.models.hf_tokenizer import HfTokenizer
                from indexer.models.tokenizer import ClipTokenizer

                text = self.manifest["text"]
                vocab = self.folder / text["vocab"]
                if text.get("tokenizer", "clip") == "hf":  # a manifest that names no tokenizer has CLIP's
                    self._tokenizer = HfTokenizer(vocab, text["context_length"], text["clean"], text["strip_sep_token"])
                else:
                    special = tuple(text["special_tokens"])
                    self._tokenizer = ClipTokenizer(vocab, text["context_length"], text["clean"], special)
            return self._tokenizer

    # -- embedding -------------------------------------------------------------------------

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Embed RGB PIL images: (n, dim) float32, each row of unit length."""
        return embed_in_batches(images, batch_size, self.preprocess, self.embed_preprocessed, self.model_id.dim)

    def embed_preprocessed(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Embed one batch of images already put through `preprocess`."""
        return _run(self._session("image"), np.stack(list(pixels)))

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, trim: bool = True) -> np.ndarray:
        """Embed texts: (n, dim) float32, each row of unit length; batched (one at a time through int8
        weights) and trimmed as the torch path does."""
        self._loading("text")
        tokens = self.tokenizer(list(texts))
        out = np.zeros((len(texts), self.model_id.dim), np.float32)
        trim = trim and self.trims_text
        order = np.argsort(-self._ends(tokens), kind="stable") if trim else np.arange(len(texts))
        if "text" in self.int8_towers:
            # 8-bit activations are scaled over the whole batch (dynamic quantisation): one text at
            # a time keeps a text's vector the same whatever it is embedded with.
            batch_size = 1
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = _run(self._session("text"), self._cut(tokens[rows]) if trim else tokens[rows])
        return out

    def _ends(self, tokens: np.ndarray) -> np.ndarray:
        text = self.manifest["text"]
        return token_ends(tokens, text["pool"], text["pad_id"] if text["pool"] == "mask" else text["eos_id"])

    def _cut(self, tokens: np.ndarray) -> np.ndarray:
        """A batch cut after its last token that matters: causal attention, or a mask over the
        padding, makes the padding after it irrelevant."""
        return tokens[:, : int(self._ends(tokens).max()) + 1]

    # -- loading and checking the towers ---------------------------------------------------

    def _session(self, tower: str):
        return self._loading(tower).result()

    def _loading(self, tower: str) -> Future:
        """The tower's session, loaded in a thread of its own from the first call on: a cold text
        query tokenises while ONNX Runtime reads the model (which releases the GIL)."""
        with self._lock:
            if tower not in self._sessions:
                future = self._sessions[tower] = Future()
                threading.Thread(target=self._settle, args=(tower, future), daemon=True).start()
            return self._sessions[tower]

    def _settle(self, tower: str, future: Future) -> None:
        try:
            future.set_result(self._checked(tower))
        except BaseException as error:  # handed to every caller of _session, which raises it
            future.set_exception(error)

    def _checked(self, tower: str):
        try:
            return self._load(tower)
        except ExportBrokenError as error:
            if self._rebuild is None:
                raise
            with self._rebuilding:
                self._rebuild(error)
                self._read(self.model_id)
            return self._load(tower)

    def measured_probes(self) -> dict[str, list[float]]:
        """What each tower gives for its probe now, unchecked: how an export records its probes."""
        return {tower: self._probe(tower, self._load(tower, check=False)).tolist() for tower in ("text", "image")}

    def _load(self, tower: str, check: bool = True):
        import onnxruntime

        entry = self.manifest[f"{tower}_int8" if tower in self.int8_towers else tower]
        # The tower as ONNX Runtime's graph optimisations left it at export, where there is one:
        # loaded with them off, it gives the same vectors, and its session is made sooner.
        optimized = entry.get("optimized") if not self.device.startswith("cuda") else None
        files, model = (optimized or entry)["files"], (optimized or entry)["model"]
        for name, (size, _) in files.items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != size:
                raise ExportBrokenError(f"the ONNX export's {name} at {self.folder} is missing or truncated")
        # The checksums are computed while ONNX Runtime reads the files (both release the GIL);
        # the session is used only if they agree.
        damaged: Future = Future()
        checking = threading.Thread(target=lambda: damaged.set_result(self._damaged(files)))
        checking.start()
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
        if optimized:
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        # Idle threads sleep instead of spinning: spinning took a core from FAISS and the decoding
        # workers (warm text queries: p50 36 → 24 ms, p99 72 → 31 ms on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        failure = None
        providers: list = ["CPUExecutionProvider"]
        if self.device.startswith("cuda"):
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(self.device.partition(":")[2] or 0)}))
        try:
            session = onnxruntime.InferenceSession(str(self.folder / model), options, providers=providers)
        except Exception as error:  # onnxruntime has its own exception for each kind of damage
            failure = error
        checking.join()
        if damaged.result():
            raise ExportBrokenError(f"the ONNX export's {damaged.result()} at {self.folder} is damaged (checksum)")
        if failure is not None:
            message = f"the ONNX export's {model} at {self.folder} is damaged ({failure})"
            raise ExportBrokenError(message) from None
        if len(providers) > 1 and "CUDAExecutionProvider" not in session.get_providers():
            # ONNX Runtime falls back to the CPU, with a warning, where CUDA's libraries do not load.
            raise DeviceError(
                f"ONNX Runtime could not start its CUDA provider on {self.device} (CUDA or cuDNN libraries "
                "missing or of another version): install the CUDA and cuDNN that onnxruntime-gpu names, "
                "or use --device cpu"
            )
        if not check:
            return session
        cosine = float(self._probe(tower, session) @ np.asarray(entry["probe"], np.float32))
        if not cosine >= PROBE_COSINE:
            raise ExportBrokenError(
                f"the ONNX export's {model} at {self.folder} no longer gives its probe vector (cosine {cosine:.6f})"
            )
        return session

    def _damaged(self, files: dict[str, list[int]]) -> str | None:
        """The first of `files` whose checksum is not the recorded one."""
        bad = (name for name, (_, checksum) in files.items() if file_checksum(self.folder / name) != checksum)
        return next(bad, None)

    def _probe(self, tower: str, session) -> np.ndarray:
        if tower == "image":
            return _run(session, self.preprocess(probe_picture())[None])[0]
        tokens = self.tokenizer([PROBE_TEXT])
        return _run(session, self._cut(tokens) if self.trims_text else tokens)[0]


def _run(session, batch: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: batch})[0].astype(np.float32, copy=False)
