"""The adapters a server can apply: uploaded LoRA files, stored by content hash, with a unique name.

Layout of the adapters directory (one pair per adapter):

    <id>.safetensors   the uploaded file, byte for byte (A1111's hash is of the file)
    <id>.json          its record: name, format, ranks, targets, hashes, the model it was checked on

`id` is the canonical content hash (`CanonicalAdapter.content_hash`): the same adapter uploaded
as kohya or as diffusers is one adapter. Every write is atomic (a temporary file in the same
directory, then `os.replace`), and the record is written last, so it is the commit marker: a
crash leaves either a complete adapter or none. On start the directory is scanned again, so
adapters survive a restart.

An upload is checked before it is stored: safetensors only (pickles are refused with the
reason), parsed into the canonical form, and matched against the base model. An unknown or
unmatched target or a shape mismatch refuses the whole upload, naming the keys; nothing is ever
partly applied.

Textual-inversion embeddings are served (prompt_encoding.py): an adapter may be LoRA, LoRA with
embeddings (pivotal tuning, A1111 bundles, cloneofsimo) or embeddings alone (an A1111/kohya,
diffusers or SDXL embedding file). Each vector's width must be the text encoder's hidden size,
and each token must fit one CLIP chunk. An A1111/kohya embedding file does not hold its token:
it is the adapter's name, as A1111 names an embedding after its file (`formats/embedding.py`).
Adapters that are embeddings alone are also indexed by token (`embedding_index.py`), so a prompt
can use them by name, as in A1111.

Some formats need more of the model than its weight shapes: cloneofsimo files its module order,
kohya SDXL files its UNet config. `model_layouts` (model name -> `ModelLayout`) gives them, both at
upload and when a stored file is parsed again after a restart, against the model it was checked on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from impasto.lora import AdapterFormatError, CanonicalAdapter, a1111_short_hash, load_adapter, match_targets, whole_file_sha256
from impasto.lora.canonical import split_target
from impasto.lora.files import write_json

from .embedding_index import EmbeddingTokenIndex
from .errors import AlreadyExists, InvalidArgument, NotFound
from .model_layout import ModelLayout
from .prompt_encoding import CHUNK_TEXT_TOKENS

log = logging.getLogger(__name__)

# Names appear in `<lora:name:weight>` tags, so no ':' '<' '>' or spaces.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MIN_ID_PREFIX = 8
FORMATS = ("kohya", "diffusers", "peft", "cloneofsimo", "embedding")


@dataclass(frozen=True)
class AdapterRecord:
    id: str
    name: str
    format: str
    ranks: tuple[int, ...]
    num_targets: int
    size_bytes: int
    sha256: str  # A1111's hash of the file
    has_embeddings: bool
    model: str  # the model it was matched against at upload
    components: tuple[str, ...]
    created: float = 0.0
    warnings: tuple[str, ...] = field(default=(), compare=False)
    tokens: tuple[tuple[str, int], ...] = ()  # textual-inversion (token, number of vectors)
    # sha256 of the whole file, A1111's hash of an embedding (`TI hashes`); kept for
    # embedding-only adapters, the ones listed there (a LoRA's file can be large to hash twice).
    whole_file_sha256: str = ""

    @property
    def short_hash(self) -> str:
        return a1111_short_hash(self.sha256)

    @property
    def is_embedding_only(self) -> bool:
        """Embeddings and no LoRA module: listed under `TI hashes`, and usable by name."""
        return self.has_embeddings and self.num_targets == 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["ranks"], d["components"], d["warnings"] = list(self.ranks), list(self.components), list(self.warnings)
        d["tokens"] = [list(t) for t in self.tokens]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "AdapterRecord":
        d = dict(d)
        for key in ("ranks", "components", "warnings"):
            d[key] = tuple(d.get(key, ()))
        d["tokens"] = tuple((str(t), int(n)) for t, n in d.get("tokens", ()))
        return cls(**d)


def _check_tokens(adapter: CanonicalAdapter) -> None:
    """What the prompt tokenizer needs of an adapter's tokens (widths are match_targets' job)."""
    seen: dict[str, str] = {}
    for token, per_component in adapter.embeddings.items():
        if not token.strip() or token != token.strip():
            raise InvalidArgument("data", f"embedding token {token!r} is empty or starts or ends with a space; it could not be written in a prompt")
        if token.lower() in seen:
            # Prompts are matched case-insensitively, as CLIP lowercases them.
            raise InvalidArgument("data", f"embedding tokens {seen[token.lower()]!r} and {token!r} differ only in case")
        seen[token.lower()] = token
        counts = {c: int(v.shape[0]) for c, v in per_component.items()}
        if len(set(counts.values())) != 1:
            raise InvalidArgument("data", f"embedding {token!r} has different numbers of vectors per text encoder: {counts}")
        n = next(iter(counts.values()))
        if not 1 <= n <= CHUNK_TEXT_TOKENS:
            raise InvalidArgument("data", f"embedding {token!r} has {n} vectors; a token takes 1 to {CHUNK_TEXT_TOKENS} (one CLIP chunk)")


def token_counts(adapter: CanonicalAdapter) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((token, int(next(iter(per.values())).shape[0])) for token, per in adapter.embeddings.items()))


class AdapterRegistry:
    def __init__(self, root: Path, model_layouts: Callable[[str], ModelLayout | None] | None = None):
        self.root = Path(root)  # created by the first upload, so a server without adapters writes nothing
        self.model_layouts = model_layouts
        self._records: dict[str, AdapterRecord] = {}
        self._loaded: dict[str, CanonicalAdapter] = {}
        self._views: dict[tuple[str, str], CanonicalAdapter | None] = {}
        self.embedding_index = EmbeddingTokenIndex()
        self._lock = threading.RLock()
        self.scan()

    # --- storage ------------------------------------------------------------------------------
    def _file(self, adapter_id: str) -> Path:
        return self.root / f"{adapter_id}.safetensors"

    def _record_file(self, adapter_id: str) -> Path:
        return self.root / f"{adapter_id}.json"

    def scan(self) -> None:
        """Read every record in the directory again; drop leftovers of interrupted uploads."""
        records = {}
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            try:
                record = AdapterRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("adapter record %s is unreadable, skipped: %s", path, exc)
                continue
            if not self._file(record.id).is_file():
                log.warning("adapter %s (%s): its file is missing, skipped", record.name, record.id)
                continue
            if any(r.name == record.name for r in records.values()):
                log.warning("adapter %s (%s): the name is taken by another record, skipped", record.name, record.id)
                continue
            if record.is_embedding_only and not record.whole_file_sha256:  # stored before it was kept
                record = replace(record, whole_file_sha256=whole_file_sha256(self._file(record.id)))
            records[record.id] = record
        for leftover in self.root.glob(".upload-*") if self.root.is_dir() else []:
            with contextlib.suppress(OSError):
                leftover.unlink()
        with self._lock:
            self._records = records
            self._loaded.clear()
            self._views.clear()
            self.embedding_index = EmbeddingTokenIndex(records.values())
        log.info("adapters: %d in %s", len(records), self.root)

    def new_upload_path(self) -> Path:
        """A temporary file in the adapters directory for an upload's bytes (same filesystem, so
        the final move is one atomic rename). `add` consumes it; `discard` removes it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".safetensors", dir=self.root)
        os.close(fd)
        return Path(tmp)

    @staticmethod
    def discard(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    # --- lookups -------------------------------------------------------------------------------
    def list(self) -> list[AdapterRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.name)

    def resolve(self, ref: str) -> AdapterRecord:
        """By name, id, or an unambiguous id prefix of at least MIN_ID_PREFIX characters."""
        with self._lock:
            if ref in self._records:
                return self._records[ref]
            for record in self._records.values():
                if record.name == ref:
                    return record
            if len(ref) >= MIN_ID_PREFIX:
                found = [r for r in self._records.values() if r.id.startswith(ref.lower())]
                if len(found) == 1:
                    return found[0]
            known = ", ".join(r.name for r in self.list()) or "none"
            raise NotFound(f"unknown adapter '{ref}'; known: {known}")

    def load(self, record: AdapterRecord) -> CanonicalAdapter:
        with self._lock:
            adapter = self._loaded.get(record.id)
        if adapter is None:
            # token_name: an A1111/kohya embedding file's token is the adapter's name (see above).
            adapter = load_adapter(self._file(record.id), format=record.format, token_name=record.name, **self._parse_context(record.model))
            with self._lock:
                self._loaded[record.id] = adapter
        return adapter

    def view(self, record: AdapterRecord, component: str) -> CanonicalAdapter | None:
        """The adapter's modules of one component and, for a text encoder, its embeddings for
        that encoder (None if it has neither), cached: its content hash keys the merged-weights
        cache."""
        key = (record.id, component)
        with self._lock:
            if key in self._views:
                return self._views[key]
        adapter = self.load(record)
        modules = {t: m for t, m in adapter.modules.items() if split_target(t)[0] == component}
        embeddings = {t: {component: per[component]} for t, per in adapter.embeddings.items() if component in per}
        view = None
        if modules or embeddings:
            view = CanonicalAdapter(modules=modules, embeddings=embeddings, source_format=adapter.source_format, file_sha256=adapter.file_sha256)
        with self._lock:
            self._views[key] = view
        return view

    def _parse_context(self, model: str) -> dict:
        layout = self.model_layouts(model) if self.model_layouts is not None else None
        return layout.parse_context() if layout is not None else {}

    # --- changes -------------------------------------------------------------------------------
    def add(
        self,
        upload: Path,
        *,
        name: str,
        format: str | None,
        model: str,
        named_weight_shapes: Mapping[str, tuple[int, ...]],
    ) -> tuple[AdapterRecord, bool]:
        """Check the uploaded file at `upload` and store it; returns (record, already_existed).

        The temporary file is consumed (moved into place or deleted) whatever happens.
        """
        try:
            return self._add(upload, name=name, format=format, model=model, named_weight_shapes=named_weight_shapes)
        finally:
            self.discard(upload)

    @staticmethod
    def check_name(name: str, format: str | None = None, field: str = "name") -> None:
        """The header's checks, done before any byte of the file is received. `field`: the
        request field the name came in (UploadAdapter's `name`, StartTraining's `adapter_name`)."""
        if not NAME_PATTERN.match(name or ""):
            raise InvalidArgument(field, f"{name!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if re.fullmatch(r"[0-9a-f]{64}", name):
            raise InvalidArgument(field, "must not look like an adapter id (64 hex digits)")
        if format is not None and format not in FORMATS:
            raise InvalidArgument("format", f"unknown format {format!r}; known: {', '.join(FORMATS)}")

    def _add(self, upload, *, name, format, model, named_weight_shapes):
        self.check_name(name, format)
        try:
            adapter = load_adapter(upload, format=format, token_name=name, **self._parse_context(model))
        except AdapterFormatError as exc:
            raise InvalidArgument("data", str(exc).replace(str(upload), f"upload '{name}'")) from None
        if not adapter.modules and not adapter.embeddings:
            raise InvalidArgument("data", "the file holds no LoRA modules and no embeddings")
        _check_tokens(adapter)
        report = match_targets(adapter, named_weight_shapes)
        if report.errors:
            raise InvalidArgument("data", f"adapter does not fit model '{model}': " + "; ".join(report.errors))
        adapter_id = adapter.content_hash
        record = AdapterRecord(
            id=adapter_id,
            name=name,
            format=adapter.source_format,
            ranks=tuple(adapter.ranks),
            num_targets=len(adapter.modules),
            size_bytes=upload.stat().st_size,
            sha256=adapter.file_sha256 or "",
            has_embeddings=bool(adapter.embeddings),
            model=model,
            components=tuple(adapter.components),
            created=time.time(),
            warnings=tuple(adapter.warnings + report.warnings),
            tokens=token_counts(adapter),
            whole_file_sha256=whole_file_sha256(upload) if adapter.embeddings and not adapter.modules else "",
        )
        with self._lock:
            existing = self._records.get(adapter_id)
            if existing is not None:
                if existing.name == name:
                    return existing, True
                raise AlreadyExists(f"adapter: this content is already stored as '{existing.name}' (id {adapter_id})")
            holder = next((r for r in self._records.values() if r.name == name), None)
            if holder is not None:
                raise AlreadyExists(f"name: '{name}' is taken by adapter {holder.id}; delete it first or choose another name")
            os.replace(upload, self._file(adapter_id))
            write_json(self._record_file(adapter_id), record.to_json())  # the commit marker, last
            self._records[adapter_id] = record
            self._loaded[adapter_id] = adapter
            self.embedding_index = EmbeddingTokenIndex(self._records.values())
        log.info("adapter %s stored as %s (%s, %d targets, tokens %s)", name, adapter_id, record.format, record.num_targets, [t for t, _ in record.tokens])
        return record, False

    def delete(self, ref: str) -> AdapterRecord:
        with self._lock:
            record = self.resolve(ref)
            # Record first: a crash after it leaves an orphan file, never a record without a file.
            self._record_file(record.id).unlink(missing_ok=True)
            self._file(record.id).unlink(missing_ok=True)
            self._records.pop(record.id, None)
            self._loaded.pop(record.id, None)
            self.embedding_index = EmbeddingTokenIndex(self._records.values())
            for component in ("unet", "text_encoder", "text_encoder_2"):
                self._views.pop((record.id, component), None)
        # Requests already admitted hold the adapter itself, so they finish as asked.
        log.info("adapter %s (%s) deleted", record.name, record.id)
        return record
