"""A model's tokenizer and chat template as data, for the wire.

The scheduler and gateway may run on hosts without the driver's model
directory (docs/scale-out.md), so a driver reads the files they need once
(`read_tokenizer_files`) and sends them in its ModelDescription
(`tokenizer_files`); they build their tokenizer and chat formatter from
those contents (`tokenizer_from_files`, `formatter_from_files`) and never
from the described path. The files are bounded in size, with an error
naming the file and the limit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from text.chat import ChatFormatter
from text.errors import CheckpointError
from text.tokenizer import BYTE_TOKENIZER_FILE, ByteTokenizer, HFTokenizer, Tokenizer

HF_FILE, HF_CONFIG = "tokenizer.json", "tokenizer_config.json"
SHIPPED_FILES = (HF_FILE, HF_CONFIG, BYTE_TOKENIZER_FILE)
# All files together; the largest common tokenizer.json (~17 MB, Gemma) fits
# with room, far under the kernel's 256 MiB message limit.
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024


def read_tokenizer_files(model_dir: str | Path, *,
                         max_bytes: int = MAX_TOKENIZER_BYTES) -> dict[str, str]:
    """The driver's side: the tokenizer files present in `model_dir`."""
    root = Path(model_dir)
    names = (HF_FILE, HF_CONFIG) if (root / HF_FILE).is_file() else (BYTE_TOKENIZER_FILE,)
    files: dict[str, str] = {}
    for name in names:
        path = root / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size + _total(files) > max_bytes:
            raise CheckpointError(f"{path}: {size} bytes; the tokenizer files sent to the scheduler and "
                                  f"gateway may hold at most {max_bytes} bytes in all",
                                  detail={"file": str(path)})
        try:
            files[name] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not readable as UTF-8 text ({exc})",
                                  detail={"file": str(path)}) from None
    if not files:
        raise CheckpointError(f"{root / HF_FILE}: missing (a model directory needs tokenizer.json)",
                              detail={"file": str(root / HF_FILE)})
    return files


def _total(files: Mapping[str, str]) -> int:
    return sum(len(v.encode("utf-8")) for v in files.values())


def check_files(files: Mapping[str, str], origin: str, *, max_bytes: int = MAX_TOKENIZER_BYTES) -> None:
    """The receiving side's checks: known names, some tokenizer, bounded."""
    unknown = sorted(set(files) - set(SHIPPED_FILES))
    if unknown:
        raise CheckpointError(f"{origin}: tokenizer files {unknown} are not among {list(SHIPPED_FILES)}")
    if HF_FILE not in files and BYTE_TOKENIZER_FILE not in files:
        raise CheckpointError(f"{origin}: sent no tokenizer ({HF_FILE} or {BYTE_TOKENIZER_FILE}); "
                              "a driver must describe its tokenizer in tokenizer_files")
    total = _total(files)
    if total > max_bytes:
        raise CheckpointError(f"{origin}: tokenizer files of {total} bytes, over the {max_bytes}-byte limit")


def tokenizer_from_files(files: Mapping[str, str], origin: str, *, eos_token_ids: Sequence[int] = (),
                         bos_token_id: int | None = None) -> Tokenizer:
    """A tokenizer from the files a driver sent (`origin` names it in errors)."""
    check_files(files, origin)
    if HF_FILE in files:
        special = _json_object(files.get(HF_CONFIG), f"{origin}/{HF_CONFIG}") if HF_CONFIG in files else {}
        return HFTokenizer(f"{origin}/{HF_FILE}", eos_token_ids=eos_token_ids, bos_token_id=bos_token_id,
                           special=special, text=files[HF_FILE])
    where = f"{origin}/{BYTE_TOKENIZER_FILE}"
    spec = _json_object(files[BYTE_TOKENIZER_FILE], where)
    if spec.get("type") != "byte":
        raise CheckpointError(f"{where}: expected {{\"type\": \"byte\", ...}}", detail={"file": where})
    try:
        return ByteTokenizer(int(spec.get("bos_token_id", 256)), int(spec.get("eos_token_id", 257)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bos/eos ids are not integers ({exc})", detail={"file": where}) from None


def formatter_from_files(files: Mapping[str, str], origin: str) -> ChatFormatter:
    """The chat formatter from the files a driver sent (its tokenizer_config's template, if any)."""
    check_files(files, origin)
    return ChatFormatter.from_config(files.get(HF_CONFIG), f"{origin}/{HF_CONFIG}")


def _json_object(text: str | None, where: str) -> dict[str, Any]:
    try:
        loaded = json.loads(text or "")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: not readable JSON ({exc})", detail={"file": where}) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{where}: expected a JSON object", detail={"file": where})
    return loaded
