"""The real node model: a base causal LM, the federation's global adapter (hot-reloaded) and an
optional local adapter of the hospital's own.

Hot reload: the server's final adapter lands in ``runs/<name>/checkpoint/`` (peft
``save_pretrained`` format, each file moved in by one rename, and encrypted at rest when a key
ring is configured: see fedllm.models.checkpoints). A directory edited by hand can still be
caught half-written, so the weights file is read once into memory, hashed and parsed from those
bytes (the version always names exactly the weights being served), and a half-written, broken
or tampered adapter is logged and the old one kept; the poller retries when the files change.
The same path refuses an adapter without a valid DP record (``dp-record.json``, bound to the
weights by their hash; see fedllm.models.dp_record): answers are presented as 0 ε
post-processing of a DP release, which only a DP-trained adapter is. ``allow_non_dp_adapters``
lifts that rule for an operator who knowingly serves a non-DP adapter. An adapter whose record
names another base model (by content hash: see fedllm.models.identity) is refused whatever that
setting: applied to other base weights it loads without error and answers nonsense.
Every use of the model, and every swap, holds one lock: requests see either the old adapter or
the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load as load_safetensors
from transformers import PreTrainedModel

from fedllm.config.schema import ModelConfig
from fedllm.models.checkpoints import ADAPTER_WEIGHTS, read_artifact
from fedllm.models.dp_record import (
    DP_RECORD_FILE,
    DPRecord,
    DPRecordError,
    parse_dp_record,
)
from fedllm.models.loading import base_model, load_base_model, load_tokenizer
from fedllm.security.encryption import KeyRingSource
from fedllm.serving.node.backends import Generation

log = structlog.get_logger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
LOCAL_ADAPTER = "local"
BASE_VERSION = "base"
VERSION_CHARS = 12

Role = Literal["global", "vote"]


class AdapterLoadError(RuntimeError):
    """An adapter directory could not be read or does not fit the base model."""


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter read from disk in one go: its config, weights and content hash."""

    config: LoraConfig
    state: dict[str, torch.Tensor]
    version: str
    sha256: str


@dataclass(frozen=True)
class ServedAdapter:
    """The global adapter being served and the DP record it was accepted with.

    One object, replaced whole, so a health probe never pairs one version with another's record.
    ``dp_record`` is None only when ``allow_non_dp_adapters`` let an unrecorded adapter in.
    """

    version: str
    dp_record: DPRecord | None


def adapter_signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Cheap change detector: (name, size, mtime_ns) of the adapter's files that exist.

    The DP record counts: a record arriving after its weights must trigger a retry.
    """
    signature = []
    for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS, DP_RECORD_FILE):
        try:
            stat = (directory / name).stat()
        except OSError:
            continue
        signature.append((name, stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def read_adapter(directory: Path, *, keyring: KeyRingSource | None) -> AdapterFiles:
    """Read a peft ``save_pretrained`` directory; the version is a hash of the weights file."""
    weights = next((directory / n for n in ADAPTER_WEIGHTS if (directory / n).is_file()), None)
    if weights is None:
        raise AdapterLoadError(f"{directory}: no {' or '.join(ADAPTER_WEIGHTS)}")
    try:
        config_bytes = read_artifact(directory / ADAPTER_CONFIG, keyring=keyring)
        raw_config = json.loads(config_bytes.decode("utf-8"))
        data = read_artifact(weights, keyring=keyring)
        if weights.suffix == ".safetensors":
            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        config = LoraConfig.from_peft_type(**raw_config)
    except Exception as error:  # any malformed file must keep the old adapter, not crash
        raise AdapterLoadError(f"{directory}: unreadable adapter: {error}") from error
    if not isinstance(config, LoraConfig):
        raise AdapterLoadError(f"{directory}: not a LoRA adapter ({raw_config.get('peft_type')})")
    config.inference_mode = True
    digest = hashlib.sha256(data).hexdigest()
    return AdapterFiles(config=config, state=state, version=digest[:VERSION_CHARS], sha256=digest)


def read_dp_record(
    directory: Path, files: AdapterFiles, *, keyring: KeyRingSource | None
) -> DPRecord:
    """The DP record that makes ``files`` (read from ``directory``) servable.

    Raises `DPRecordError` with the reason when there is none, it cannot be read (including a
    plaintext record where a key ring expects ciphertext), it is invalid, it says privacy was
    disabled, or it describes other weights.
    """
    path = directory / DP_RECORD_FILE
    if not path.is_file():
        raise DPRecordError(f"{directory}: no {DP_RECORD_FILE} (not a published DP adapter)")
    try:
        data = read_artifact(path, keyring=keyring)
    except Exception as error:  # encrypted without keys, tampered, unreadable: all refusals
        raise DPRecordError(f"{path}: unreadable DP record: {error}") from error
    record = parse_dp_record(data)
    reason = record.refusal(files.sha256)
    if reason is not None:
        raise DPRecordError(reason)
    return record


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available on this machine")
    return torch.device(name)


class ModelBackend:
    """Base model + global adapter (hot-reloaded from ``adapter_dir``) + optional local adapter.

    Text generation and consensus candidates use the global adapter (the DP-trained model:
    post-processing, 0 ε); votes use the local adapter when one is configured (private, so
    only inside charged consensus sessions), else the global model. ``keyring`` (from the
    server's entry point) decrypts adapters encrypted at rest and refuses plaintext ones.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        *,
        adapter_dir: Path | None = None,
        local_adapter: Path | None = None,
        reload_interval_s: float = 5.0,
        device: str = "auto",
        allow_non_dp_adapters: bool = False,
        keyring: KeyRingSource | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._keyring = keyring
        self._reload_lock = threading.Lock()
        self._device = pick_device(device)
        self.base_model = base_model(model_config)
        self._tokenizer = load_tokenizer(model_config)
        self._model: PreTrainedModel | PeftModel = load_base_model(model_config, self._device)
        self._model.eval()
        self._max_positions = _max_positions(self._model)
        self._allow_non_dp = allow_non_dp_adapters
        self._global: str | None = None
        self.served: ServedAdapter | None = None
        self.adapter_issue: str | None = None
        self._has_local = False
        self.model_version = BASE_VERSION
        self.eos_token_id = int(self._tokenizer.eos_token_id)
        self.adapter_dir = adapter_dir
        self._signature: tuple[tuple[str, int, int], ...] = ()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

        if local_adapter is not None:
            self._install(LOCAL_ADAPTER, read_adapter(local_adapter, keyring=keyring))
            self._has_local = True
            log.info("node.local_adapter_loaded", path=str(local_adapter))
        if allow_non_dp_adapters:
            log.warning(
                "node.non_dp_adapters_allowed",
                detail="allow_non_dp_adapters is set: an adapter without a valid DP record "
                "will be served, and its answers carry no DP guarantee",
            )
        log.info(
            "node.base_model",
            name=self.base_model.name,
            revision=self.base_model.revision,
            sha256=self.base_model.sha256,
        )
        if adapter_dir is None:
            log.warning("node.no_global_adapter", detail="serving the base model only")
            return
        self.adapter_issue = f"no adapter in {adapter_dir} yet"
        self.check_for_update()
        if self._global is None:
            log.warning("node.global_adapter_missing", path=str(adapter_dir))
        if reload_interval_s > 0:
            self._poller = threading.Thread(
                target=self._poll, args=(reload_interval_s,), name="adapter-reload", daemon=True
            )
            self._poller.start()

    @property
    def has_global_adapter(self) -> bool:
        """Whether a global adapter is loaded (False: base model only)."""
        return self._global is not None

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    def close(self) -> None:
        """Stop the reload poller (the model itself needs no cleanup)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join()

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.check_for_update()

    def check_for_update(self) -> bool:
        """Reload the global adapter if its files changed; True when a new version is served.

        A stat per call when nothing changed, so it is cheap enough to run on a timer. The
        signature is remembered even when loading fails, so a broken adapter is reported once
        and retried only when its files change again.
        """
        if self.adapter_dir is None:
            return False
        with self._reload_lock:
            return self._reload(self.adapter_dir)

    def _reload(self, adapter_dir: Path) -> bool:
        signature = adapter_signature(adapter_dir)
        if not signature or signature == self._signature:
            return False
        self._signature = signature
        try:
            files = read_adapter(adapter_dir, keyring=self._keyring)
        except AdapterLoadError as error:
            log.error("node.adapter_reload_failed", error=str(error), kept=self.model_version)
            self.adapter_issue = f"adapter not loaded: {error}"
            return False
        record = self._check_dp_record(adapter_dir, files)
        if record is None and not self._allow_non_dp:
            return False
        if record is not None and not self._fits_base_model(record, files):
            return False
        if files.version == self.model_version:  # same weights (e.g. only the record changed)
            self.served = ServedAdapter(files.version, record)
            if record is not None:
                self.adapter_issue = None
            return False
        name = f"global-{files.version}"
        try:
            with self._lock:
                self._install(name, files)
                previous, self._global = self._global, name
                if previous is not None:
                    self._peft().set_adapter(name)
                    self._peft().delete_adapter(previous)
                self.model_version = files.version
                self.served = ServedAdapter(files.version, record)
        except AdapterLoadError as error:
            log.error("node.adapter_reload_failed", error=str(error), kept=self.model_version)
            self.adapter_issue = f"adapter not loaded: {error}"
            return False
        if record is not None:
            self.adapter_issue = None
        log.info(
            "node.adapter_loaded",
            version=files.version,
            path=str(adapter_dir),
            dp_record=None if record is None else record.summary(),
        )
        return True

    def _check_dp_record(self, adapter_dir: Path, files: AdapterFiles) -> DPRecord | None:
        """The adapter's valid DP record, or None after logging why there is none.

        Without ``allow_non_dp_adapters`` None means refused (``adapter.refused``), and the
        adapter being served, or the base model, stays.
        """
        try:
            record = read_dp_record(adapter_dir, files, keyring=self._keyring)
        except DPRecordError as error:
            if self._allow_non_dp:
                log.warning("adapter.served_without_dp_record", reason=str(error))
                self.adapter_issue = (
                    f"serving {files.version} without a valid DP record "
                    f"(allow_non_dp_adapters): {error}"
                )
            else:
                log.error(
                    "adapter.refused",
                    reason=str(error),
                    version=files.version,
                    kept=self.model_version,
                )
                self.adapter_issue = f"adapter {files.version} refused: {error}"
            return None
        return record

    def _fits_base_model(self, record: DPRecord, files: AdapterFiles) -> bool:
        """Whether the adapter was trained on the base model loaded here (by content hash).

        False is a refusal (``adapter.refused``, reported as ``adapter_issue``): the adapter
        being served, or the base model, stays.
        """
        reason = record.base_model_refusal(self.base_model.sha256)
        if reason is None:
            return True
        log.error(
            "adapter.refused",
            reason=reason,
            version=files.version,
            kept=self.model_version,
            base_model=self.base_model.sha256,
        )
        self.adapter_issue = f"adapter {files.version} refused: {reason}"
        return False

    def _peft(self) -> PeftModel:
        if not isinstance(self._model, PeftModel):
            raise AdapterLoadError("no adapter is loaded")
        return self._model

    def _install(self, name: str, files: AdapterFiles) -> None:
        """Add adapter ``name`` with ``files``' weights, or leave the model exactly as it was."""
        with self._lock:
            wrapped_here = not isinstance(self._model, PeftModel)
            try:
                if wrapped_here:
                    self._model = get_peft_model(self._model, files.config, adapter_name=name)
                else:
                    self._model.add_adapter(name, files.config)
                result = set_peft_model_state_dict(self._model, files.state, adapter_name=name)
                unexpected = [k for k in result.unexpected_keys if "lora_" in k]
                missing = [k for k in result.missing_keys if name in k and "lora_" in k]
                if unexpected or missing:
                    raise AdapterLoadError(
                        f"adapter does not fit the base model: {len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors"
                    )
            except Exception as error:
                self._undo_install(name, wrapped_here)
                if isinstance(error, AdapterLoadError):
                    raise
                raise AdapterLoadError(f"adapter does not fit the base model: {error}") from error
            self._model.to(self._device)
            self._model.eval()

    def _undo_install(self, name: str, wrapped_here: bool) -> None:
        if not isinstance(self._model, PeftModel):
            return
        if wrapped_here:
            self._model = self._model.unload()
        elif name in self._model.peft_config:
            self._model.delete_adapter(name)
            active = self._global or (LOCAL_ADAPTER if self._has_local else None)
            if active is not None:
                self._model.set_adapter(active)

    def _encode(self, prompt: str, token_ids: Sequence[int], reserve: int) -> list[int]:
        """Prompt + continuation ids, keeping the most recent ones that fit the context."""
        vocabulary = len(self._tokenizer)
        bad = [i for i in token_ids if not 0 <= i < vocabulary]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocabulary})")
        ids = [*self._tokenizer(prompt)["input_ids"], *token_ids]
        if not ids:
            ids = [self.eos_token_id]
        room = max(1, self._max_positions - reserve)
        return ids[-room:]

    @contextmanager
    def _using(self, role: Role) -> Iterator[PreTrainedModel | PeftModel]:
        """The model, locked and without grads, with the adapter for ``role`` active.

        ``global``: the global adapter (the bare base model before one is loaded); ``vote``:
        the local adapter if configured, else the global one. The name is resolved under the
        lock because a reload may replace the global adapter at any moment.
        """
        with self._lock, torch.no_grad():
            adapter = self._global
            if role == "vote" and self._has_local:
                adapter = LOCAL_ADAPTER
            model = self._model
            if not isinstance(model, PeftModel):
                yield model
            elif adapter is None:
                with model.disable_adapter():
                    yield model
            else:
                model.set_adapter(adapter)
                yield model

    def _logits(self, ids: list[int], role: Role) -> torch.Tensor:
        """Next-token logits after ``ids`` with the adapter for ``role`` active."""
        inputs = torch.tensor([ids], device=self._device)
        with self._using(role) as model:
            output = model(input_ids=inputs, attention_mask=torch.ones_like(inputs))
            return output.logits[0, -1].float()

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        top_p: float = 1.0,
    ) -> Generation:
        """Greedy at temperature 0 (deterministic), else sampled (reproducible with ``seed``)."""
        ids = self._encode(prompt, (), reserve=max_tokens)
        max_tokens = min(max_tokens, self._max_positions - len(ids))
        generator = torch.Generator(device=self._device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        produced: list[int] = []
        finish = "length"
        with self._using("global") as model:
            inputs = torch.tensor([ids], device=self._device)
            mask = torch.ones_like(inputs)
            past = None
            for _ in range(max_tokens):
                output = model(
                    input_ids=inputs, attention_mask=mask, past_key_values=past, use_cache=True
                )
                past = output.past_key_values
                token = _next_token(output.logits[0, -1].float(), temperature, top_p, generator)
                if token == self.eos_token_id:
                    finish = "stop"
                    break
                produced.append(token)
                inputs = torch.tensor([[token]], device=self._device)
                mask = torch.cat([mask, torch.ones_like(inputs)], dim=1)
        return Generation(
            text=self._tokenizer.decode(produced, skip_special_tokens=True),
            prompt_tokens=len(ids),
            completion_tokens=len(produced),
            finish_reason=finish,
        )

    def candidates(self, prompt: str, token_ids: Sequence[int], k: int) -> list[int]:
        """Top-k next tokens of the GLOBAL model (the base model if none is loaded yet)."""
        logits = self._logits(self._encode(prompt, token_ids, reserve=1), "global")
        k = min(k, logits.shape[-1])
        return [int(i) for i in torch.topk(logits, k).indices]

    def vote(self, prompt: str, token_ids: Sequence[int], candidates: Sequence[int]) -> int:
        """Index of the local model's (else the global model's) favourite among candidates."""
        vocabulary = len(self._tokenizer)
        if not candidates:
            raise ValueError("candidates must not be empty")
        bad = [i for i in candidates if not 0 <= i < vocabulary]
        if bad:
            raise ValueError(f"candidate {bad[0]} is outside the vocabulary (size {vocabulary})")
        logits = self._logits(self._encode(prompt, token_ids, reserve=1), "vote")
        scores = logits[torch.tensor(list(candidates), device=logits.device)]
        return int(torch.argmax(scores))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` (special tokens such as EOS dropped)."""
        vocabulary = len(self._tokenizer)
        bad = [i for i in token_ids if not 0 <= i < vocabulary]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocabulary})")
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _max_positions(model: PreTrainedModel) -> int:
    """The model's context length (GPT-2 calls it n_positions)."""
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or config.n_positions)


def _next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """Argmax at temperature 0; otherwise nucleus sampling from softmax(logits / T)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
