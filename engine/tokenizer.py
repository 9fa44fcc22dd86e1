"""Text <-> token ids for one model, its chat template, and streaming detokenization.

Torch-free on purpose: the gateway imports this module to render chat templates, count prompt
tokens and turn streamed token ids back into text, and it must not pay for (or depend on) torch.

Two sources are supported:

* a GGUF file (the default model): the vocabulary, merges and special ids are read from its
  metadata and rebuilt as a ``tokenizers`` byte-level BPE, the way transformers' GGUF loader does,
  except where that loader disagrees with the model's own tokenizer (see ``_pre_tokenizer``);
* an HF model directory with ``tokenizer.json`` (any model type ``tokenizers`` can load).

Chat templates are rendered with jinja2 in the same sandboxed environment transformers uses, so a
prompt rendered here is byte-for-byte the prompt the model card's examples produce.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from gguf import Keys, TokenType
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from engine.config import ModelLoadError, open_gguf, read_json_object
from transfer.messages import TokenizerSpec

__all__ = ["BrokenChatTemplate", "IncrementalDetokenizer", "Tokenizer", "TokenizerError"]


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded, or a chat that its template refuses to render.

    A ``ValueError`` so that callers that validate user input (a malformed conversation) can map it
    to a client error; the message always names the file or the problem.
    """


class BrokenChatTemplate(TokenizerError):
    """The model's chat template does not compile: the model's fault, not the conversation's."""


# Split regexes by ``tokenizer.ggml.pre``, as transformers' GGUF loader and llama.cpp define them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {
    **dict.fromkeys(
        ("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# GPT-2's own regex (built into ``ByteLevel``), after first isolating every digit. This is
# StarCoder's scheme, which SmolLM inherited: llama.cpp splits "smollm" this way and SmolLM2's own
# tokenizer.json is ``Sequence[Digits(individual_digits=True), ByteLevel]``.
_DIGITS_THEN_GPT2 = frozenset(("smollm", "starcoder", "refact", "codeshell"))
_GPT2 = frozenset(("gpt2", "default"))

# The named special tokens a chat template can refer to, as transformers names them.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_SPECIAL_ID_KEYS = (
    Keys.Tokenizer.BOS_ID,
    Keys.Tokenizer.EOS_ID,
    Keys.Tokenizer.UNK_ID,
    Keys.Tokenizer.PAD_ID,
)

# End-of-turn markers that chat models emit instead of (or besides) their EOS. Only counted as stop
# tokens when the vocabulary has them as *special* tokens, so that ordinary text can never stop a
# generation; the list is short on purpose, naming the markers of the model families we serve.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML: SmolLM, Qwen
    "<|endoftext|>",  # GPT-2 / SmolLM / Qwen document end
    "<|eot_id|>",  # Llama 3 end of turn
    "<|eom_id|>",  # Llama 3.1 end of message (tool call)
    "<|end_of_text|>",  # Llama 3 document end
    "<|end|>",  # Phi-3
    "<end_of_turn>",  # Gemma
)

# How many pushed tokens the detokenizer holds back, waiting for a UTF-8 character to complete,
# before it looks for an earlier place to cut. A character is at most 4 bytes and every held token
# carries at least one (tokens that decode to nothing are dropped), so a longer hold means invalid
# bytes from the model or text whose tokens all end mid-character; the cap keeps pushes cheap.
_MAX_HELD_TOKENS = 16


class Tokenizer:
    """One model's tokenizer: BPE encode/decode, special ids, stop ids and chat template.

    Build it with :meth:`load` (or :meth:`from_gguf` / :meth:`from_dir`) and treat it as
    read-only: one instance is shared by every request, and encode/decode/render never mutate it
    (the compiled template is cached on first use; a race there only compiles it twice).
    """

    __slots__ = (
        "_backend",
        "_compiled_template",
        "_dropped_chars",
        "_extra_stop_token_ids",
        "_special_token_ids",
        "_template_tokens",
        "add_bos_token",
        "bos_token_id",
        "chat_template",
        "eos_token_id",
        "max_bytes_per_token",
        "stop_token_ids",
        "vocab_size",
    )

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_stop_token_ids: Sequence[int] = (),
        special_token_ids: Mapping[str, int | None] | None = None,
        add_bos_token: bool,
        chat_template: str | None,
    ) -> None:
        # BOS/EOS are added (or not) by this class, never by the backend: a tokenizer.json may
        # carry truncation, padding or a post-processor that would silently change prompt ids.
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.chat_template = chat_template
        # Kept as given for ``to_spec``, which rebuilds this tokenizer through this method.
        self._extra_stop_token_ids = tuple(extra_stop_token_ids)
        self.stop_token_ids: frozenset[int] = self._find_stop_token_ids(extra_stop_token_ids)
        # The named special tokens a chat template sees, as transformers passes them.
        ids = dict(special_token_ids or {"bos_token": bos_token_id, "eos_token": eos_token_id})
        self._special_token_ids = ids
        self._template_tokens: dict[str, str] = {
            name: token
            for name, token_id in ids.items()
            if token_id is not None and (token := backend.id_to_token(token_id)) is not None
        }
        self._compiled_template: jinja2.Template | None = None
        # The most text bytes one token can stand for, where that bounds a prompt's token count
        # from below (``min_num_tokens``); None where the tokenizer can drop or shrink text.
        self.max_bytes_per_token: int | None = None
        self._dropped_chars = ""  # characters that make no token (a byte the vocabulary lacks)
        bound = _max_bytes_per_token(backend)
        if bound is not None:
            self.max_bytes_per_token, self._dropped_chars = bound

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """A ``.gguf`` file or an HF model directory holding ``tokenizer.json``."""
        path = Path(path)
        if path.is_file() and path.suffix == ".gguf":
            return cls.from_gguf(path)
        if path.is_dir():
            return cls.from_dir(path)
        raise TokenizerError(f"{path}: neither a .gguf file nor a model directory")

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Rebuild the tokenizer described by a GGUF file's ``tokenizer.*`` metadata."""
        try:
            reader = open_gguf(path)
        except ModelLoadError as exc:
            raise TokenizerError(str(exc)) from exc

        def field(key: str) -> Any:
            value = reader.fields.get(key)
            return None if value is None else value.contents()

        model_type = field(Keys.Tokenizer.MODEL)
        if model_type != "gpt2":
            raise TokenizerError(
                f"{path}: tokenizer.ggml.model is {model_type!r}; only 'gpt2' (byte-level BPE) is "
                "supported from GGUF. Point at the model's HF directory (tokenizer.json) instead."
            )
        tokens: list[str] = field(Keys.Tokenizer.LIST) or []
        token_types: list[int] = field(Keys.Tokenizer.TOKEN_TYPE) or []
        merges: list[str] = field(Keys.Tokenizer.MERGES) or []
        if not tokens:
            raise TokenizerError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens")
        try:
            backend = _byte_level_bpe(tokens, token_types, merges, field(Keys.Tokenizer.PRE))
        except TokenizerError as exc:
            raise TokenizerError(f"{path}: {exc}") from exc

        special_ids: dict[str, int | None] = {
            name: field(key)
            for name, key in zip(_SPECIAL_TOKEN_NAMES, _GGUF_SPECIAL_ID_KEYS, strict=True)
        }
        # transformers adds the named special tokens as special even when the file marks them
        # normal, so that their text in a prompt maps to the one id.
        named = [tokens[i] for i in special_ids.values() if i is not None and 0 <= i < len(tokens)]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named])
        eot_ids = [field(Keys.Tokenizer.EOT_ID), field(Keys.Tokenizer.EOM_ID)]
        return cls(
            backend,
            bos_token_id=special_ids["bos_token"],
            eos_token_id=special_ids["eos_token"],
            extra_stop_token_ids=[i for i in eot_ids if i is not None],
            special_token_ids=special_ids,
            add_bos_token=bool(field(Keys.Tokenizer.ADD_BOS)),
            chat_template=field(Keys.Tokenizer.CHAT_TEMPLATE),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """An HF model directory: ``tokenizer.json``, plus ``tokenizer_config.json`` (chat
        template, BOS/EOS, ``add_bos_token``), ``chat_template.jinja`` and
        ``generation_config.json`` (extra EOS ids) when present."""
        path = Path(path)
        try:
            backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise TokenizerError(f"{path}: cannot load tokenizer.json: {exc}") from exc
        config = _read_json_object(path / "tokenizer_config.json")

        def token_id(name: str) -> int | None:
            token = config.get(name)
            if isinstance(token, dict):  # a serialized AddedToken
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        bos_token_id, eos_token_id = token_id("bos_token"), token_id("eos_token")
        add_bos_token = config.get("add_bos_token")
        if not isinstance(add_bos_token, bool):
            # No explicit flag: transformers keeps the tokenizer.json post-processor, so whether
            # it adds BOS is whatever that post-processor does.
            with_specials = backend.encode("", add_special_tokens=True).ids
            add_bos_token = bos_token_id is not None and with_specials[:1] == [bos_token_id]

        template_path = path / "chat_template.jinja"
        chat_template = (
            template_path.read_text(encoding="utf-8")
            if template_path.is_file()
            else _default_template(config.get("chat_template"))
        )
        generation_eos = _read_json_object(path / "generation_config.json").get("eos_token_id")
        if isinstance(generation_eos, int):
            generation_eos = [generation_eos]
        extra_stops = [i for i in generation_eos or () if isinstance(i, int)]
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            extra_stop_token_ids=extra_stops,
            special_token_ids={name: token_id(name) for name in _SPECIAL_TOKEN_NAMES},
            add_bos_token=add_bos_token,
            chat_template=chat_template,
        )

    @classmethod
    def from_spec(cls, spec: TokenizerSpec) -> Tokenizer:
        """The tokenizer a worker described with :meth:`to_spec` (``GET /v1/tokenizer``): built
        the way the worker built its own, so ids, stop ids and chat prompts are the same."""
        try:
            backend = BackendTokenizer.from_str(spec.backend_json)
        except Exception as exc:  # tokenizers raises a bare Exception for JSON it cannot read
            raise TokenizerError(f"a tokenizer spec whose backend cannot load: {exc}") from exc
        return cls(
            backend,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
            extra_stop_token_ids=spec.extra_stop_token_ids,
            special_token_ids=spec.special_token_ids,
            add_bos_token=spec.add_bos_token,
            chat_template=spec.chat_template,
        )

    def to_spec(self) -> TokenizerSpec:
        """What :meth:`from_spec` rebuilds this tokenizer from: the backend's JSON and this
        class's own arguments. Serializes the whole vocabulary (16 ms for SmolLM2): call it
        once and keep the result."""
        return TokenizerSpec(
            backend_json=self._backend.to_str(),
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            extra_stop_token_ids=list(self._extra_stop_token_ids),
            special_token_ids=dict(self._special_token_ids),
            add_bos_token=self.add_bos_token,
            chat_template=self.chat_template,
        )

    # --- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token strings in the text (``<|im_start|>``) become
        their special ids, as in transformers; ``add_special_tokens`` prepends BOS when this
        tokenizer's ``add_bos_token`` says the model expects one. EOS is never appended: these
        are prompts, and the model is to continue them."""
        # The batch call releases the GIL while it works (the single one holds it), so a long
        # prompt tokenized in a thread does not stall the caller's event loop; same ids.
        try:
            [encoding] = self._backend.encode_batch_fast([text], add_special_tokens=False)
        except TypeError as exc:  # a lone surrogate: not text the backend can take
            raise TokenizerError("the text is not valid Unicode") from exc
        token_ids: list[int] = encoding.ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            return [self.bos_token_id, *token_ids]
        return token_ids

    def min_num_tokens(self, texts: Sequence[str]) -> int:
        """A lower bound on the tokens of these texts (0 when this tokenizer gives none), found
        without tokenizing, so that an over-long prompt is refused before any work is spent on
        it: every character the tokenizer keeps is at least one UTF-8 byte, and no token stands
        for more than ``max_bytes_per_token`` bytes. A scan of the text (milliseconds per
        megabyte): look at ``len(text) // max_bytes_per_token`` first."""
        if self.max_bytes_per_token is None:
            return 0
        num_kept = sum(
            len(text) - sum(text.count(dropped) for dropped in self._dropped_chars)
            for text in texts
        )
        return num_kept // self.max_bytes_per_token

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids``. Ids outside the vocabulary (a model's embedding rows are
        often padded past it) decode to nothing; bytes that are not valid UTF-8 become U+FFFD."""
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token as spelled in the vocabulary, or ``None``."""
        return self._backend.token_to_id(token)

    # --- chat --------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render a conversation as transformers' ``apply_chat_template(tokenize=False)`` does:
        the template sees ``messages``, ``add_generation_prompt``, ``tools`` and ``documents``
        (``None`` unless passed), the named special tokens and any ``extra`` variables."""
        template = self._template()
        context: dict[str, Any] = {"tools": None, "documents": None, **self._template_tokens}
        context |= extra
        context["messages"] = [dict(message) for message in messages]
        context["add_generation_prompt"] = add_generation_prompt
        try:
            return template.render(**context)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"the chat template refused this conversation: {exc}") from exc

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Render then encode. BOS is prepended only when the model wants one and the template
        did not already write it (most templates that need BOS write it themselves)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        bos_token = self._template_tokens.get("bos_token")
        already_has_bos = bos_token is not None and text.startswith(bos_token)
        return self.encode(text, add_special_tokens=not already_has_bos)

    def _template(self) -> jinja2.Template:
        if self._compiled_template is None:
            if self.chat_template is None:
                raise TokenizerError("this model has no chat template; use a plain completion")
            try:
                self._compiled_template = _JINJA_ENV.from_string(self.chat_template)
            except jinja2.TemplateError as exc:
                raise BrokenChatTemplate(
                    f"the model's chat template does not compile: {exc}"
                ) from exc
        return self._compiled_template

    def _find_stop_token_ids(self, extra_stop_token_ids: Sequence[int]) -> frozenset[int]:
        special_ids = {
            token_id
            for token_id, added in self._backend.get_added_tokens_decoder().items()
            if added.special
        }
        stops = {self.eos_token_id, *extra_stop_token_ids} - {None}
        for token in _END_OF_TURN_TOKENS:
            token_id = self._backend.token_to_id(token)
            if token_id in special_ids:
                stops.add(token_id)
        return frozenset(i for i in stops if i is not None)


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text, never splitting a UTF-8 character.

    The prefix-offset/read-offset algorithm of vLLM and TGI. Only a small window of ids is kept:
    the tokens emitted last time (context, so that decoding starts where the text did) and those
    not emitted yet. Each push decodes the window and emits the text past the context. While that
    text ends in U+FFFD its tail is probably an incomplete character, so it is held back::

        window  | emitted last time | held (tail decodes to ...U+FFFD) |
                  ^ 0                 ^ read_offset                      ^ newest

    After an emission the window drops its old context and the emitted tokens become the new one,
    so a push costs O(window), not O(stream). Every window start is a character boundary, which
    makes the concatenation of all pushes and the final :meth:`flush` exactly
    ``tokenizer.decode(all_ids)`` for byte-level tokenizers. One instance per stream; not
    thread-safe.
    """

    __slots__ = ("_prefix_text", "_read_offset", "_skip", "_tok", "_token_ids")

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._token_ids: list[int] = []  # the window, not the stream
        self._read_offset = 0
        self._prefix_text = ""  # decode of token_ids[:read_offset]

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completed (often ``""``)."""
        self._token_ids.append(token_id)
        text = self._decode(self._token_ids)
        if len(text) == len(self._prefix_text):
            # Only skipped special tokens are held: they decode to nothing, anywhere. Dropping
            # them keeps the window (and the context before them) as it was.
            del self._token_ids[self._read_offset :]
            return ""
        if not text.endswith("\ufffd"):
            return self._emit_up_to(len(self._token_ids), text)
        if len(self._token_ids) - self._read_offset > _MAX_HELD_TOKENS:
            boundary = self._last_clean_boundary(text)
            if boundary is not None:
                return self._emit_up_to(boundary, self._decode(self._token_ids[:boundary]))
        return ""

    def flush(self) -> str:
        """End of stream: return whatever was held back, U+FFFD included."""
        return self._emit_up_to(len(self._token_ids), self._decode(self._token_ids))

    def _decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=self._skip)

    def _emit_up_to(self, boundary: int, text: str) -> str:
        """Emit ``text`` (the window decoded up to ``boundary``) past the context, then make
        tokens ``[read_offset:boundary]`` the new context."""
        new_text = text[len(self._prefix_text) :]
        del self._token_ids[: self._read_offset]
        self._read_offset = boundary - self._read_offset
        self._prefix_text = self._decode(self._token_ids[: self._read_offset])
        return new_text

    def _last_clean_boundary(self, text: str) -> int | None:
        """A recent token boundary that no character straddles, for a window held too long.

        Reached only when many pushes in a row ended in U+FFFD: invalid bytes from the model, or
        a long run of text whose tokens all end mid-character. A boundary is clean when decoding
        the two sides apart gives the same text as decoding them together (a straddled character
        would come out as two or more U+FFFD) and at least 3 characters, hence 3 bytes, follow
        it: no future byte can then change how the bytes before it decode.
        """
        lowest = max(self._read_offset + 1, len(self._token_ids) - _MAX_HELD_TOKENS // 2)
        for boundary in range(len(self._token_ids) - 1, lowest - 1, -1):
            tail = self._decode(self._token_ids[boundary:])
            if len(tail) < 3:
                continue
            if self._decode(self._token_ids[:boundary]) + tail == text:
                return boundary
        return None


# --- building a byte-level BPE from GGUF ---------------------------------------------------------


def _byte_level_bpe(
    tokens: Sequence[str], token_types: Sequence[int], merges: Sequence[str], pre: str | None
) -> BackendTokenizer:
    """Mirror transformers' GGUF loader (``byte_level_tokenizer`` and
    ``add_gguf_special_tokens``) so that ids, added tokens and decoding agree with it."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Some converters store a token as raw text rather than in the byte alphabet; respell it.
    vocab = {
        token
        if set(token) <= alphabet
        else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merge_pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise TokenizerError(f"malformed merge {merge!r} in tokenizer.ggml.merges")
        merge_pairs.append((left, right))
    backend = BackendTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merge_pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()

    typed = list(zip(tokens, token_types, strict=False))
    # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel (transformers
    # skips it too): adding it would mint an id past the vocabulary.
    control = [t for t, kind in typed if kind == TokenType.CONTROL and set(t) <= alphabet]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    # User-defined tokens (``<think>``) are matched whole in text, but are not special.
    user = [t for t, kind in typed if kind == TokenType.USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return backend


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """How text is cut before BPE, by ``tokenizer.ggml.pre``.

    transformers' GGUF loader has no entry for "smollm" and falls back to plain GPT-2 splitting,
    which differs from SmolLM2's real tokenizer where whitespace runs precede a digit ("\\n\\n1"
    gives [Ċ, Ċ, 1] instead of [ĊĊ, 1]). We follow the model (and llama.cpp) there.
    """
    name = pre or "default"
    if name in _SPLIT_BY_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[name]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if name in _GPT2:
        return gpt2
    known = sorted([*_SPLIT_BY_PRE, *_DIGITS_THEN_GPT2, *_GPT2])
    raise TokenizerError(f"unsupported tokenizer.ggml.pre {name!r}; supported: {known}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes spell themselves, the rest map to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    spelling = {b: chr(b) for b in printable}
    spelling |= {b: chr(256 + n) for n, b in enumerate(others)}
    return spelling


# --- HF directory helpers ------------------------------------------------------------------------


_LOSSLESS_PRE_TOKENIZERS = frozenset({"ByteLevel", "Digits", "Split", "Sequence"})


def _max_bytes_per_token(backend: BackendTokenizer) -> tuple[int, str] | None:
    """For a byte-level BPE with no normalizer and pre-tokenizers that keep every byte, the most
    bytes of text one token covers: each byte of the text lands in exactly one token, and a
    vocabulary token's string spells one byte per character (an added token is matched in the
    raw text, so its UTF-8 length counts). None for any other tokenizer (a normalizer or a
    pre-tokenizer may drop text, an unknown-token may cover a whole word)."""
    description = json.loads(backend.to_str())
    pre_tokenizer = description.get("pre_tokenizer")
    kinds: list[str] = []

    def walk(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        kinds.append(str(node.get("type")))
        if node.get("type") == "Split" and node.get("behavior") == "Removed":
            return False
        return all(walk(child) for child in node.get("pretokenizers", []))

    if (
        description.get("normalizer") is not None
        or description.get("model", {}).get("type") != "BPE"
        or not walk(pre_tokenizer)
        or "ByteLevel" not in kinds
        or not set(kinds) <= _LOSSLESS_PRE_TOKENIZERS
    ):
        return None
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    vocabulary = backend.get_vocab(with_added_tokens=False)
    # A byte the vocabulary lacks is dropped (no byte fallback, no unknown token). SmolLM2's
    # lacks six ASCII control characters, which are counted out of the text, and lead bytes
    # (0xC0-0xFF) that valid UTF-8 never or hardly uses: a longer character still keeps its
    # continuation bytes. A continuation byte missing would let a whole character vanish, and
    # then there is no bound.
    missing = {b for b, symbol in enumerate(_byte_symbols()) if symbol not in vocabulary}
    if any(0x80 <= b < 0xC0 for b in missing):
        return None
    dropped = "".join(chr(b) for b in sorted(missing) if b < 0x80)
    longest = max((len(token) for token in vocabulary if token not in added), default=1)
    return max(longest, *(len(token.encode("utf-8")) for token in added)), dropped


def _byte_symbols() -> list[str]:
    """The character byte-level BPE spells each byte with (GPT-2's ``bytes_to_unicode``):
    printable Latin-1 bytes as themselves, the others as 256 and up, in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols: list[str] = []
    num_shifted = 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + num_shifted))
            num_shifted += 1
    return symbols


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when the (optional) file is absent."""
    if not path.is_file():
        return {}
    try:
        return read_json_object(path)
    except ModelLoadError as exc:
        raise TokenizerError(str(exc)) from exc


def _default_template(value: Any) -> str | None:
    """``chat_template`` is a string, or a list of ``{"name", "template"}`` (use "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default":
                template = entry.get("template")
                return template if isinstance(template, str) else None
    return None


# --- the chat-template environment (as transformers.utils.chat_template_utils builds it) ---------


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (transformers marks assistant turns with
    it for training masks) and render its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 -- jinja2's Extension declares it as a plain class attr

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own ``tojson`` HTML-escapes; templates expect plain JSON, as transformers gives them.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _make_jinja_env() -> ImmutableSandboxedEnvironment:
    # Templates come from model repositories, i.e. untrusted code: sandboxed and immutable.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_JINJA_ENV = _make_jinja_env()
