"""engine.tokenizer against transformers' tokenizer for the same GGUF file, plus the parts
transformers has no counterpart for (incremental detokenization, loading errors)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import pre_tokenizers

from engine.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError, _bytes_to_unicode

REPO_ROOT = Path(__file__).resolve().parents[2]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = {
    "prose": "The quick brown fox jumps over the lazy dog. It's what they'd've said, isn't it?",
    "python": (
        "def fib(n: int) -> int:\n"
        "    if n < 2:\n"
        "        return n\n"
        "    return fib(n - 1) + fib(n - 2)\n\n\n"
        "class A:\n\tdef f(self):\n\t\treturn {'a': [1, 2]}  # tab-indented\n"
    ),
    "french": "Là-bas, l'élève a mangé une crème brûlée à côté du garçon naïf.",
    "german": "Größere Übungen für Ärzte: Straße, Maß, Fußgängerübergänge.",
    "vietnamese": "Tiếng Việt có dấu: người, được, những, chữ quốc ngữ.",
    "cjk": "你好，世界！日本語のテキストとカタカナ。한국어 텍스트입니다.",
    "emoji": "Thumbs 👍👍🏽👍🏿, family 👩‍👩‍👧‍👦, flag 🇫🇷, heart ❤️ and 🧑🏽‍💻.",
    "whitespace": "a  b   c    d\n\ne\n\n\nf\t\tg \n h   \n\n  ",
    "trailing_spaces": "line with trailing spaces   ",
    "leading_spaces": "   leading spaces",
    "numbers": "In 2024, pi ≈ 3.14159, 1,000,000 items cost $12.50; call 555-0100 x42.",
    "digits_after_whitespace": "Steps:\n\n1. first\n\n2. second\n   3 spaced\t\t4 tabbed",
    "special_tokens": "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "special_inline": "text<|endoftext|>more <repo_name> and <|im_end|>",
    "fake_special": "<|im_start |> and <im_start> are not special",
    "empty": "",
    "single_space": " ",
    "newlines_only": "\n\n\n",
    "mixed": "Résumé: 東京 2023 — “quotes” ‘single’ … 🙂\r\nend",
}

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hi there!"}],
    "with_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Write 2 + 2 in Python:\n```\nprint(2 + 2)\n```"},
    ],
    "multi_turn_no_system": [
        {"role": "user", "content": "Bonjour 👋"},
        {"role": "assistant", "content": "Salut !"},
        {"role": "user", "content": "Ça va ?"},
    ],
}

# Every control token of the default model's vocabulary: they must each encode to one id.
SMOLLM2_CONTROL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
]


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path(default_gguf_path: Path) -> Path:
    return default_gguf_path


@pytest.fixture(scope="module")
def tok(gguf_path: Path) -> Tokenizer:
    return Tokenizer.load(gguf_path)


@pytest.fixture(scope="module")
def hf_raw(gguf_path: Path) -> Any:
    """transformers' tokenizer for the same file, exactly as transformers builds it."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_gguf_backend(hf_raw: Any) -> BackendTokenizer:
    """A copy of transformers' backend before `hf` below patches it."""
    return BackendTokenizer.from_str(hf_raw.backend_tokenizer.to_str())


@pytest.fixture(scope="module")
def hf(hf_raw: Any, hf_gguf_backend: BackendTokenizer) -> Any:
    """The reference: transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer.

    transformers' GGUF loader has no rule for `tokenizer.ggml.pre == "smollm"` and splits with
    plain GPT-2 rules, while SmolLM2's tokenizer.json (and llama.cpp) first isolate every digit.
    Vocabulary, merges, special tokens and decoding all still come from transformers.
    """
    hf_raw.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return hf_raw


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory: pytest.TempPathFactory, hf: Any, tok: Tokenizer) -> Path:
    """An HF-style directory for the same tokenizer: tokenizer.json saved by `tokenizers`."""
    directory = tmp_path_factory.mktemp("smollm2")
    hf.backend_tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "chat_template": tok.chat_template,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [2, 0]}), encoding="utf-8"
    )
    return directory


CORPUS_PARAMS = [pytest.param(text, id=name) for name, text in CORPUS.items()]


# --- encode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [False, True])
@pytest.mark.parametrize("text", CORPUS_PARAMS)
def test_encode_matches_transformers(
    tok: Tokenizer, hf: Any, text: str, add_special_tokens: bool
) -> None:
    expected = hf(text, add_special_tokens=add_special_tokens)["input_ids"]
    assert tok.encode(text, add_special_tokens=add_special_tokens) == expected


@pytest.mark.parametrize("text", CORPUS_PARAMS)
def test_unpatched_transformers_differs_only_on_whitespace_before_digits(
    tok: Tokenizer, hf_gguf_backend: BackendTokenizer, text: str
) -> None:
    ours = tok.encode(text)
    theirs = hf_gguf_backend.encode(text, add_special_tokens=False).ids
    if re.search(r"\s\s\d", text):
        assert tok.decode(ours) == tok.decode(theirs)  # same text, split differently
    else:
        assert ours == theirs


def test_smollm_isolates_digits_like_its_own_tokenizer(
    tok: Tokenizer, hf_gguf_backend: BackendTokenizer
) -> None:
    # llama.cpp's "smollm" pre-tokenizer and SmolLM2's tokenizer.json: "\n\n" stays one token.
    newline_pair, newline = tok.token_to_id("ĊĊ"), tok.token_to_id("Ċ")
    assert tok.encode("x\n\n1") == [tok.token_to_id("x"), newline_pair, tok.token_to_id("1")]
    assert hf_gguf_backend.encode("x\n\n1").ids == [
        tok.token_to_id("x"),
        newline,
        newline,
        tok.token_to_id("1"),
    ]


@pytest.mark.parametrize("token", SMOLLM2_CONTROL_TOKENS)
def test_control_tokens_in_text_are_single_ids(tok: Tokenizer, token: str) -> None:
    token_id = tok.token_to_id(token)
    assert token_id is not None
    assert tok.encode(f"a{token}b") == [tok.encode("a")[0], token_id, tok.encode("b")[0]]


def test_default_model_metadata(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)  # <|im_start|>, <|im_end|>
    assert tok.stop_token_ids == frozenset({2, 0})  # <|im_end|>, <|endoftext|>
    assert tok.add_bos_token is False
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")


# --- decode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS_PARAMS)
def test_decode_matches_transformers(tok: Tokenizer, hf: Any, text: str) -> None:
    token_ids = tok.encode(text)
    assert tok.decode(token_ids, skip_special_tokens=False) == text
    for skip in (False, True):
        expected = hf.decode(token_ids, skip_special_tokens=skip)
        assert tok.decode(token_ids, skip_special_tokens=skip) == expected


def test_decode_skips_special_tokens_by_default(tok: Tokenizer) -> None:
    token_ids = tok.encode("<|im_start|>user\nHello<|im_end|>")
    assert tok.decode(token_ids) == "user\nHello"
    assert tok.decode(token_ids, skip_special_tokens=False) == "<|im_start|>user\nHello<|im_end|>"


def test_decode_ignores_ids_past_the_vocabulary(tok: Tokenizer) -> None:
    assert tok.decode([*tok.encode("ok"), tok.vocab_size + 5]) == "ok"


# --- chat template -------------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf: Any, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == expected
    assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == hf.encode(
        expected, add_special_tokens=False
    )


CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if loop.index > 2 %}{% break %}{% endif %}"
    "{% if m.role not in ['user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + m.role) }}{% endif %}"
    "{% generation %}[{{ m.role }}] {{ m.content | tojson }}{% endgeneration %}\n"
    "{% endfor %}"
    "{{ {'tools': tools, 'eos': eos_token, 'unk': unk_token, 'pad': pad_token} | tojson }}\n"
    "{{ strftime_now('%Y') | length }}{{ extra_var | default('none') }}"
    "{% if add_generation_prompt %}>>{% endif %}"
)


@pytest.fixture(scope="module")
def custom_dir(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    directory = tmp_path_factory.mktemp("custom")
    (directory / "tokenizer.json").write_bytes((smol_dir / "tokenizer.json").read_bytes())
    (directory / "chat_template.jinja").write_text(CUSTOM_TEMPLATE, encoding="utf-8")
    config = json.loads((smol_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config |= {"chat_template": "ignored: chat_template.jinja wins", "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def test_template_globals_and_filters_match_transformers(custom_dir: Path, hf: Any) -> None:
    custom = Tokenizer.from_dir(custom_dir)
    messages = [
        {"role": "user", "content": 'Quote "this" & <that> — é'},
        {"role": "assistant", "content": "ok"},
        {"role": "system", "content": "never reached: loop breaks first"},
    ]
    for kwargs in ({}, {"extra_var": "X"}):
        expected = hf.apply_chat_template(
            messages, chat_template=CUSTOM_TEMPLATE, tokenize=False, **kwargs
        )
        text = custom.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
        assert text == expected
    assert custom.apply_chat_template(messages[:1]).endswith(">>")


def test_template_raise_exception_is_a_tokenizer_error(custom_dir: Path) -> None:
    custom = Tokenizer.from_dir(custom_dir)
    with pytest.raises(TokenizerError, match="bad role system"):
        custom.apply_chat_template([{"role": "system", "content": "x"}])


def test_encode_chat_adds_bos_once(custom_dir: Path) -> None:
    custom = Tokenizer.from_dir(custom_dir)  # add_bos_token: true, and the template writes BOS
    assert custom.add_bos_token
    token_ids = custom.encode_chat([{"role": "user", "content": "hi"}])
    assert token_ids[0] == custom.bos_token_id and token_ids[1] != custom.bos_token_id
    assert custom.encode("hi", add_special_tokens=True) == [
        custom.bos_token_id,
        *custom.encode("hi"),
    ]


def test_no_chat_template_is_a_clear_error(tmp_path: Path, smol_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((smol_dir / "tokenizer.json").read_bytes())
    bare = Tokenizer.load(tmp_path)
    assert bare.chat_template is None and bare.bos_token_id is None
    with pytest.raises(TokenizerError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


# --- from_dir and load ---------------------------------------------------------------------------


def test_from_dir_matches_gguf(smol_dir: Path, tok: Tokenizer) -> None:
    from_dir = Tokenizer.load(smol_dir)
    assert from_dir.vocab_size == tok.vocab_size
    assert (from_dir.bos_token_id, from_dir.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert from_dir.stop_token_ids == tok.stop_token_ids
    assert from_dir.add_bos_token is False
    for text in CORPUS.values():
        assert from_dir.encode(text) == tok.encode(text)
    messages = CONVERSATIONS["multi_turn"]
    assert from_dir.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_from_dir_reads_generation_config_eos(tmp_path: Path, smol_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((smol_dir / "tokenizer.json").read_bytes())
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}', encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).stop_token_ids == frozenset({7, 0, 2})


def test_load_rejects_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="neither"):
        Tokenizer.load(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(TokenizerError, match="neither"):
        Tokenizer.load(tmp_path / "notes.txt")
    (tmp_path / "junk.gguf").write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(TokenizerError, match="not a readable GGUF"):
        Tokenizer.load(tmp_path / "junk.gguf")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json


def _write_gguf(path: Path, model: str, pre: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab", "<s>"])
    writer.add_token_types([1, 1, 1, 3])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2", "smollm"])
def test_small_gguf_with_each_pre_tokenizer(tmp_path: Path, pre: str) -> None:
    path = tmp_path / "small.gguf"
    _write_gguf(path, "gpt2", pre)
    small = Tokenizer.from_gguf(path)
    assert small.vocab_size == 4
    assert small.encode("ab<s>ba") == [2, 3, 1, 0]
    assert small.decode([2, 3, 1, 0]) == "abba"
    assert small.bos_token_id is None and small.chat_template is None


def test_gguf_rejects_unsupported_tokenizers(tmp_path: Path) -> None:
    _write_gguf(tmp_path / "spm.gguf", "llama", "default")
    with pytest.raises(TokenizerError, match="'llama'"):
        Tokenizer.from_gguf(tmp_path / "spm.gguf")
    _write_gguf(tmp_path / "odd.gguf", "gpt2", "no-such-pre")
    with pytest.raises(TokenizerError, match="no-such-pre"):
        Tokenizer.from_gguf(tmp_path / "odd.gguf")


# --- incremental detokenizer ---------------------------------------------------------------------


def _stream(tok: Tokenizer, token_ids: list[int], *, skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return [detok.push(token_id) for token_id in token_ids] + [detok.flush()]


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", CORPUS_PARAMS)
def test_incremental_matches_decode(tok: Tokenizer, text: str, skip: bool) -> None:
    token_ids = tok.encode(text)
    chunks = _stream(tok, token_ids, skip=skip)
    assert "".join(chunks) == tok.decode(token_ids, skip_special_tokens=skip)
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_incremental_holds_back_partial_characters(tok: Tokenizer) -> None:
    token_ids = tok.encode("你好")  # 4 tokens, none a whole character on its own
    assert all(tok.decode([token_id]) == "\ufffd" for token_id in token_ids)
    chunks = _stream(tok, token_ids)
    assert "" in chunks[:-1]
    assert "".join(chunks) == "你好"
    assert chunks[-1] == ""  # nothing left for flush: the last push completed the text


def test_incremental_flush_returns_an_unfinished_character(tok: Tokenizer) -> None:
    token_ids = tok.encode("ok 你")[:-1]  # the last byte of 你 is missing
    chunks = _stream(tok, token_ids)
    assert chunks[-1].endswith("\ufffd")
    assert "".join(chunks) == tok.decode(token_ids)


def test_incremental_window_stays_small_on_invalid_bytes(tok: Tokenizer) -> None:
    # A lone UTF-8 continuation byte decodes to U+FFFD forever; held tokens must not pile up.
    continuation_byte = tok.token_to_id("Ģ")  # byte 0x80 in GPT-2's byte alphabet
    assert continuation_byte is not None
    detok = IncrementalDetokenizer(tok)
    chunks = [detok.push(continuation_byte) for _ in range(500)] + [detok.flush()]
    assert "".join(chunks) == "\ufffd" * 500
    assert len(detok._token_ids) <= 40  # the window, not the whole stream


def test_incremental_long_hold_never_cuts_a_character(tok: Tokenizer) -> None:
    # 16 stray lead bytes, then 中 byte by byte: every push ends in U+FFFD, so the hold passes its
    # cap right when a cut after the 17th lead byte would split 中.
    spelling = _bytes_to_unicode()
    lead = tok.token_to_id(spelling[0xE4])
    zhong = [tok.token_to_id(spelling[b]) for b in "中".encode()]
    assert lead is not None and None not in zhong
    token_ids = [lead] * 16 + [i for i in zhong if i is not None]
    chunks = _stream(tok, token_ids)
    assert "".join(chunks) == tok.decode(token_ids) == "\ufffd" * 16 + "中"


def test_incremental_window_stays_small_on_skipped_special_tokens(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    assert detok.push(tok.encode("Hi")[0]) == "Hi"
    assert [detok.push(tok.eos_token_id or 0) for _ in range(500)] == [""] * 500
    assert detok.push(tok.encode(" there")[0]) == " there"
    assert len(detok._token_ids) <= 2


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_incremental_matches_decode_on_random_ids(tok: Tokenizer, data: st.DataObject) -> None:
    token_ids = data.draw(
        st.lists(st.integers(0, tok.vocab_size - 1), max_size=40), label="token_ids"
    )
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    chunks = _stream(tok, token_ids, skip=skip)
    assert "".join(chunks) == tok.decode(token_ids, skip_special_tokens=skip)


# --- torch-freedom -------------------------------------------------------------------------------


def test_import_does_not_pull_in_torch() -> None:
    code = (
        "import sys, engine.tokenizer; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
