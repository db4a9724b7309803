"""Prompt + document -> token ids, through the model's chat template, tokenised once.

Each prompt is rendered once with a sentinel where the document goes, and split there: the part
before it (chat header + system prompt + instruction) is the prefix every request of the prompt
shares token for token, which is what prefix caching reuses; the part after it is the end of the user
turn and the assistant header. A request is `prefix + document tokens + suffix`, so documents are
tokenised once each (in batches, by the Rust tokenizer) and never re-rendered as text.

render.layout = "document_first" (prompts.py): the prefix is the chat header alone (the same for every
prompt), the suffix the instruction + the end of the turn, so a request is `header + document + suffix` and
the requests of one document share `header + document` token for token: one KV prefix serves all its
prompts (`prefix_len` covers the document). The document budget is then the smallest of the prompts', so a
long document is cut at the same token for every prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.config.run_config import DOCUMENT_FIRST, DOCUMENT_LAST
from engine.errors import RenderError
from engine.render.prompts import PLACEHOLDER, Prompt

SENTINEL = "\u2063DOCUMENT\u2063"  # invisible separator characters: never in a chat template
CHARS_PER_TOKEN_CAP = 16  # documents are cut to budget * this many characters before tokenising


@dataclass(frozen=True)
class RenderedPrompt:
    prompt: Prompt
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    max_new_tokens: int
    doc_budget: int  # document tokens that fit: context - max_new_tokens - template tokens

    @property
    def name(self) -> str:
        return self.prompt.name


def chat_text(tokenizer, user_content: str, system_prompt: str = "") -> str:
    """One user message through the model's own chat template (thinking switched off where it exists)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user_content}]
    if not getattr(tokenizer, "chat_template", None):
        raise RenderError("the tokenizer has no chat template; use an instruction-tuned model")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


class Renderer:
    def __init__(self, tokenizer, prompts: list[Prompt], context: int, max_new_tokens: int | None,
                 system_prompt: str = "", reserve: int = 0):
        self.tokenizer = tokenizer
        self.fast = tokenizer.backend_tokenizer  # the Rust tokenizer: batch encode without Python overhead
        self.context = context
        self.layout = prompts[0].layout if prompts else DOCUMENT_LAST
        if any(p.layout != self.layout for p in prompts):
            raise RenderError("the prompts of one run must share one layout (render.layout)")
        self.rendered: dict[str, RenderedPrompt] = {}
        for prompt in prompts:
            text = chat_text(tokenizer, prompt.template.replace(PLACEHOLDER, SENTINEL), system_prompt)
            if text.count(SENTINEL) != 1:
                raise RenderError(f"prompt {prompt.name!r}: the chat template changed the document placeholder")
            before, after = text.split(SENTINEL)
            new = max_new_tokens or prompt.max_new_tokens
            prefix, suffix = self._ids(before), self._ids(after)
            budget = context - reserve - new - len(prefix) - len(suffix)
            if budget < 16:
                raise RenderError(f"prompt {prompt.name!r}: context {context} leaves {budget} tokens for the document "
                                  f"after {new} new tokens and {len(prefix) + len(suffix)} template tokens"
                                  + (f" ({reserve} kept free for the backend)" if reserve else ""))
            self.rendered[prompt.name] = RenderedPrompt(prompt, tuple(prefix), tuple(suffix), new, budget)
        if self.layout == DOCUMENT_FIRST and self.rendered:
            headers = {r.prefix_ids for r in self.rendered.values()}
            if len(headers) != 1:  # the chat template put prompt-dependent text before the document
                raise RenderError("document_first: the chat template renders a different header before the "
                                  "document for different prompts, so they cannot share its prefix")
            shared = min(r.doc_budget for r in self.rendered.values())  # one cut for every prompt
            self.rendered = {n: RenderedPrompt(r.prompt, r.prefix_ids, r.suffix_ids, r.max_new_tokens, shared)
                             for n, r in self.rendered.items()}

    def _ids(self, text: str) -> list[int]:
        return self.fast.encode(text, add_special_tokens=False).ids

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each document, long ones cut first at CHARS_PER_TOKEN_CAP x the largest budget."""
        cap = max(r.doc_budget for r in self.rendered.values()) * CHARS_PER_TOKEN_CAP
        texts = [t if len(t) <= cap else t[:cap] for t in texts]
        return [e.ids for e in self.fast.encode_batch_fast(texts, add_special_tokens=False)]

    def truncate(self, text: str, ids: list[int], budget: int) -> list[int]:
        """The first `budget` tokens or fewer, ending at a line break, else a word break, when there is one
        in the last quarter of the kept text; token-exact (no re-tokenising of the cut text)."""
        enc = self.fast.encode(text[: budget * CHARS_PER_TOKEN_CAP], add_special_tokens=False)
        offsets = enc.offsets
        end_char = offsets[budget - 1][1]
        kept = text[:end_char]
        floor = int(end_char * 0.75)
        cut = kept.rfind("\n", floor)
        if cut < 0:
            cut = max(kept.rfind(" ", floor), kept.rfind("\t", floor))
        if cut <= 0:
            return enc.ids[:budget]
        n = budget
        while n > 0 and offsets[n - 1][1] > cut:
            n -= 1
        return enc.ids[:n] if n > 0 else enc.ids[:budget]

    def request_ids(self, name: str, text: str, doc_ids: list[int]) -> tuple[list[int], bool]:
        """The full prompt token ids for one document, and whether the document was truncated."""
        r = self.rendered[name]
        truncated = len(doc_ids) > r.doc_budget or len(text) > r.doc_budget * CHARS_PER_TOKEN_CAP
        if truncated:
            doc_ids = self.truncate(text, doc_ids, r.doc_budget) if len(doc_ids) > r.doc_budget else doc_ids
        return [*r.prefix_ids, *doc_ids, *r.suffix_ids], truncated

    def prefix_len(self, name: str, ids: list[int]) -> int:
        """Leading tokens of the request `ids` that other requests share: the prompt's header and instruction
        (document_last), or the chat header and the whole document (document_first)."""
        r = self.rendered[name]
        return len(ids) - len(r.suffix_ids) if self.layout == DOCUMENT_FIRST else len(r.prefix_ids)
