"""An Ollama ``Modelfile`` for an exported GGUF file: where the weights are, how a conversation
is rendered (the chat template, translated to Ollama's Go template), where a reply stops, and
the system prompt.

Only ChatML is translated (SmolLM2, Qwen and most small chat models use it), and only when the
model's own template renders a conversation exactly as ChatML does; for any other template the
``TEMPLATE`` is left out and Ollama falls back on the GGUF's ``tokenizer.chat_template``.

The system prompt: the one every training example shared, else the default the chat template
inserts when a conversation brings none (SmolLM2's "You are a helpful AI assistant named
SmolLM..."). Ollama adds ``SYSTEM`` only to conversations without a system message, which is
what such a template does too.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from tunesmith.models.export import readable

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"

# Ollama's Go template for ChatML: each message, then the assistant's turn to answer; the
# else-branch serves the old prompt/system API.
CHATML_OLLAMA = (
    "{{- if .Messages }}\n"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
    "{{ else }}\n"
    "{{- if .System }}<|im_start|>system\n"
    "{{ .System }}<|im_end|>\n"
    "{{ end }}{{ if .Prompt }}<|im_start|>user\n"
    "{{ .Prompt }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
    "{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"
)


def _render(tokenizer: Any, messages: list[dict]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template that needs other roles or arguments: not ChatML
        return None


def chatml(role: str, content: str) -> str:
    return f"{CHATML_START}{role}\n{content}{CHATML_END}\n"


def is_chatml(tokenizer: Any) -> bool:
    """Whether the chat template renders a conversation exactly as ChatML does."""
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
             {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    expected = "".join(chatml(m["role"], m["content"]) for m in probe)
    return _render(tokenizer, probe) == expected + f"{CHATML_START}assistant\n"


def default_system(tokenizer: Any) -> str | None:
    """The system prompt a ChatML template inserts into a conversation that has none."""
    text = _render(tokenizer, [{"role": "user", "content": "U"}]) or ""
    found = re.match(re.escape(f"{CHATML_START}system\n") + r"(.*?)" + re.escape(CHATML_END),
                     text, flags=re.S)
    return found.group(1) if found else None


def _quoted(text: str) -> str:
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, tokenizer: Any, *, system: str | None = None,
                   temperature: float | None = None) -> tuple[str, list[str]]:
    """The Modelfile for ``gguf_name`` (a file beside it), and notes on what was left out."""
    notes: list[str] = []
    lines = [f"# Ollama: ollama create NAME -f {Path(gguf_name).stem}.Modelfile",
             f"FROM ./{gguf_name}", ""]
    stops: list[str] = []
    if is_chatml(tokenizer):
        lines += [f"TEMPLATE {_quoted(CHATML_OLLAMA)}", ""]
        stops += [CHATML_START, CHATML_END]
        system = system if system is not None else default_system(tokenizer)
    else:
        notes.append("the chat template is not ChatML: no TEMPLATE written, Ollama uses the "
                     "GGUF's tokenizer.chat_template")
        lines += ["# TEMPLATE: the chat template is not ChatML; Ollama reads it from the GGUF",
                  ""]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    if system is not None and '"""' in system:
        notes.append('the system prompt holds """, which a Modelfile cannot quote; left out')
        system = None
    if system is not None:
        lines += [f"SYSTEM {_quoted(system)}", ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if temperature is not None:
        lines.append(f"PARAMETER temperature {temperature:g}")
    return "\n".join(lines) + "\n", notes


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        readable(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
