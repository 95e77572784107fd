"""Text <-> token ids and chat templates, over Hugging Face's `tokenizers` library."""

from __future__ import annotations

from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from engine.errors import InvalidRequestError


def _raise(message: str) -> None:
    raise InvalidRequestError(f"chat template: {message}")


class Tokenizer:
    """A model's tokenizer: encode, decode, special ids and its chat template."""

    def __init__(self, backend: HFTokenizer, eos_token_ids: tuple[int, ...], bos_token_id: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None) -> None:
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(chat_template) if chat_template else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] + ids) if self.add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def template_has_tools(self) -> bool:
        """Whether the chat template renders `tools` itself (else the caller writes them into a message)."""
        return bool(self.chat_template) and "tools" in self.chat_template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        if self._template is None:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError("each message needs a string 'role' and a string 'content'")
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        extra = {"tools": tools} if tools is not None else {}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=bos, eos_token=eos, **extra)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
        """The prompt's ids. `continue_final_message` (vLLM's): the last message is left open, cut
        right after its content, for the model to go on with it (a prefilled answer)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt and
                                        not continue_final_message, tools=tools)
        if continue_final_message:
            last = messages[-1]["content"]
            at = text.rfind(last) if last else -1
            if at < 0:
                raise InvalidRequestError("continue_final_message: the chat template does not render the last "
                                          "message's content as given")
            text = text[: at + len(last)]
        # Templates write the BOS themselves where the model wants one.
        return self.backend.encode(text, add_special_tokens=False).ids
