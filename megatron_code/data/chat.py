"""Instruction examples as chat messages, and the chat templates that turn them into token ids
plus a loss mask (1 on the tokens the model learns to produce: every assistant turn).

Input shapes (one JSON object per line):

    {"instruction": "...", "input": "...", "output": "..."}              Alpaca (input optional)
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}   multi-turn
    {"prompt": "...", "completion": "..."}

Templates:

- `RoleTokenTemplate`, for a tokenizer with our reserved role tokens (data/tokenizer.py):
  `<|system|>text<|end|><|user|>text<|end|><|assistant|>text<|end|>...`, the role tokens
  inserted as ids (text never turns into them). Loss on each assistant text and its `<|end|>`.
- `HFChatTemplate`, the model's own Jinja template from a Hugging Face tokenizer folder,
  rendered by transformers. Each assistant turn is the text the conversation through it adds to
  the conversation before it with the generation prompt; that text carries the loss.
- `TextTemplate`, for a tokenizer with neither (a base model's): `### User:\n...` headers as
  plain text, the end-of-document token closing each assistant turn.

The pieces are encoded one by one (a prompt's encoding never depends on its response, as at
generation time). `describe()` is recorded with the data; `check_template` compares it with what
the training tokenizer gives.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from megatron_code.data.errors import DataError
from megatron_code.data.tokenizer import CHAT_TOKENS, HFTokenizer, Tokenizer

ROLES = ("system", "user", "assistant")
TEMPLATE_KINDS = ("auto", "role_tokens", "hf", "text")


# ------------------------------------------------------------------------------------- examples


def to_messages(obj: dict, where: str) -> list[dict[str, str]]:
    """The conversation an input object holds, checked: known roles, string contents, at least
    one assistant turn and no empty response. Errors are one line starting with `where`."""
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{i}] has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: messages[{i}].content holds {type(m['content']).__name__}, "
                                "expected a string")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "instruction" in obj:
        user = _string(obj, "instruction", where)
        if obj.get("input"):
            user += "\n\n" + _string(obj, "input", where)
        messages = [{"role": "user", "content": user}]
        if "output" in obj:
            messages.append({"role": "assistant", "content": _string(obj, "output", where)})
    elif "prompt" in obj:
        messages = [{"role": "user", "content": _string(obj, "prompt", where)}]
        if "completion" in obj:
            messages.append({"role": "assistant", "content": _string(obj, "completion", where)})
    else:
        present = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise DataError(f"{where}: not an instruction example: expected 'messages', 'instruction'/'output' or "
                        f"'prompt'/'completion' (keys present: {present})")
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise DataError(f"{where}: no assistant turn: the example has nothing to learn (a response is required)")
    for i in answers:
        if not messages[i]["content"].strip():
            raise DataError(f"{where}: empty response (assistant turn {answers.index(i) + 1} of {len(answers)})")
    return messages


def _string(obj: dict, key: str, where: str) -> str:
    if not isinstance(obj[key], str):
        raise DataError(f"{where}: {key!r} holds {type(obj[key]).__name__}, expected a string")
    return obj[key]


# ------------------------------------------------------------------------------------ templates


@dataclass(frozen=True)
class Piece:
    """A run of an example: text to encode, or ids to insert as they are; `loss` marks what the
    model learns to produce."""
    text: str | None
    ids: tuple[int, ...]
    loss: bool


class ChatTemplate(ABC):
    tokenizer: Tokenizer

    @abstractmethod
    def pieces(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[Piece]:
        """The conversation as pieces; `generation_prompt` appends what opens an assistant turn."""

    @abstractmethod
    def describe(self) -> dict:
        """What identifies the template (recorded with the data, compared at training time)."""

    @property
    @abstractmethod
    def stop_ids(self) -> set[int]:
        """Ids that end an assistant turn."""

    def encode_batch(self, conversations: list[list[dict[str, str]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids int64, loss mask uint8) per conversation; all texts go to the tokenizer in one batch."""
        split = [self.pieces(messages) for messages in conversations]
        texts = [p.text for pieces in split for p in pieces if p.text is not None]
        flat, lengths = self.tokenizer.encode_flat(texts)
        ends = np.cumsum(lengths)
        out, t = [], 0
        for pieces in split:
            ids, mask = [], []
            for p in pieces:
                if p.text is None:
                    part = np.asarray(p.ids, np.int64)
                else:
                    part = flat[ends[t] - lengths[t]: ends[t]].astype(np.int64)
                    t += 1
                ids.append(part)
                mask.append(np.full(len(part), p.loss, np.uint8))
            out.append((np.concatenate(ids), np.concatenate(mask)))
        return out

    def encode(self, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_batch([messages])[0]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of a conversation ending with a user turn, followed by the opening of the
        assistant's reply: what a tuned model continues at generation time."""
        ids = []
        for p in self.pieces(messages, generation_prompt=True):
            ids += list(p.ids) if p.text is None else self.tokenizer.encode(p.text)
        return ids


class RoleTokenTemplate(ChatTemplate):
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        missing = [t for t in CHAT_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise DataError(f"tokenizer {tokenizer.path} lacks the role tokens {', '.join(missing)}: train it with "
                            "tools/train_tokenizer.py, or use a Hugging Face tokenizer that has a chat template")
        self.role_ids = {role: tokenizer.token_to_id(t) for role, t in zip(ROLES, CHAT_TOKENS)}
        self.end_id = tokenizer.token_to_id(CHAT_TOKENS[3])

    def pieces(self, messages, generation_prompt=False):
        out = []
        for m in messages:
            learn = m["role"] == "assistant"
            out += [Piece(None, (self.role_ids[m["role"]],), False), Piece(m["content"], (), learn),
                    Piece(None, (self.end_id,), learn)]
        if generation_prompt:
            out.append(Piece(None, (self.role_ids["assistant"],), False))
        return out

    def describe(self):
        return {"kind": "role_tokens", "tokens": {t: self.tokenizer.token_to_id(t) for t in CHAT_TOKENS},
                "layout": "<|role|>content<|end|> per message; loss on assistant content and its <|end|>"}

    @property
    def stop_ids(self):
        return {self.end_id}


class TextTemplate(ChatTemplate):
    HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.eod = tokenizer, tokenizer.eod_id

    def pieces(self, messages, generation_prompt=False):
        out = []
        for m in messages:
            learn = m["role"] == "assistant"
            out += [Piece(self.HEADERS[m["role"]], (), False), Piece(m["content"], (), learn),
                    *([Piece(None, (self.eod,), True)] if learn else []), Piece("\n\n", (), False)]
        if generation_prompt:
            out.append(Piece(self.HEADERS["assistant"], (), False))
        return out

    def describe(self):
        return {"kind": "text", "headers": self.HEADERS, "eod": self.eod,
                "layout": "header, content, end of document after assistant content, blank line"}

    @property
    def stop_ids(self):
        return {self.eod}


def hf_chat_template(folder: Path) -> tuple[str, str] | None:
    """(template, where it was found) of a Hugging Face tokenizer folder, or None."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(), jinja.name
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return (template, config.name) if isinstance(template, str) else None


class HFChatTemplate(ChatTemplate):
    def __init__(self, tokenizer: HFTokenizer, template: str, where: str):
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            raise DataError(f"{tokenizer.path}: its chat template is rendered by transformers, which is not "
                            "installed (pip install transformers)") from None
        self.tokenizer, self.template, self.where = tokenizer, template, where
        self._render_fn = render_jinja_template
        # the special-token strings templates refer to (bos_token, eos_token, ...)
        self.special = tokenizer.special_names

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        rendered, _ = self._render_fn([messages], chat_template=self.template,
                                      add_generation_prompt=generation_prompt, **self.special)
        return rendered[0]

    def pieces(self, messages, generation_prompt=False):
        out, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = self._render(messages[:i], True), self._render(messages[:i + 1], False)
            if not before.startswith(done) or not through.startswith(before):
                raise DataError(f"{self.tokenizer.path}: the chat template ({self.where}) renders a conversation "
                                "so that an earlier part changes when a turn is added; its assistant turns "
                                "cannot be located for the loss mask")
            out += [Piece(before[len(done):], (), False), Piece(through[len(before):], (), True)]
            done = through
        rest = self._render(messages, generation_prompt)
        if not rest.startswith(done):
            raise DataError(f"{self.tokenizer.path}: the chat template ({self.where}) renders the whole "
                            "conversation differently from its parts")
        out.append(Piece(rest[len(done):], (), False))
        return [p for p in out if p.text]

    def describe(self):
        return {"kind": "hf", "source": self.where,
                "sha256": hashlib.sha256(self.template.encode()).hexdigest(), "special_tokens": self.special}

    @cached_property
    def stop_ids(self):
        """End of document, and the first token the template puts after an assistant's text."""
        probe = "Xq7"
        answer = self.pieces([{"role": "user", "content": "u"}, {"role": "assistant", "content": probe}])[1].text
        after = self.tokenizer.encode(answer[answer.index(probe) + len(probe):]) if probe in answer else []
        return {self.tokenizer.eod_id, *after[:1]}


def template_for(tokenizer: Tokenizer, kind: str = "auto") -> ChatTemplate:
    """`auto`: a Hugging Face folder's own chat template when it has one, else our role tokens
    when the tokenizer has them, else plain-text headers."""
    if kind not in TEMPLATE_KINDS:
        raise DataError(f"chat template {kind!r} is not one of {', '.join(TEMPLATE_KINDS)}")
    found = hf_chat_template(Path(tokenizer.path)) if isinstance(tokenizer, HFTokenizer) else None
    if kind == "hf" or (kind == "auto" and found):
        if found is None:
            raise DataError(f"tokenizer {tokenizer.path} has no chat template (no chat_template.jinja and no "
                            "chat_template in tokenizer_config.json)")
        return HFChatTemplate(tokenizer, *found)
    has_roles = all(tokenizer.token_to_id(t) is not None for t in CHAT_TOKENS)
    if kind == "text" or (kind == "auto" and not has_roles):
        return TextTemplate(tokenizer)
    return RoleTokenTemplate(tokenizer)


def check_template(recorded: dict, tokenizer: Tokenizer, prefix: str) -> ChatTemplate:
    """The template data at `prefix` was made with, rebuilt from `tokenizer`; a DataError when
    the tokenizer now gives a different one."""
    kind = recorded.get("kind")
    try:
        template = template_for(tokenizer, kind if kind in TEMPLATE_KINDS[1:] else "role_tokens")
    except DataError as e:
        raise DataError(f"{prefix}: made with the chat template {kind!r}, which {e}") from None
    now = template.describe()
    if now != recorded:
        changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
        raise DataError(f"{prefix}: made with a different chat template than the tokenizer {tokenizer.path} gives "
                        f"now ({', '.join(changed)} differ): re-run tools/preprocess_sft.py")
    return template
