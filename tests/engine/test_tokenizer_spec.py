"""A tokenizer travels as a ``TokenizerSpec`` (``Tokenizer.to_spec`` / ``from_spec``, served on a
worker's ``GET /v1/tokenizer``): the one rebuilt from it encodes, renders chats and stops exactly
as the original, for the default model's GGUF tokenizer (which ``tiny`` and ``null`` borrow) and
for an HF directory's with BOS added, extra stop ids and its own template."""

from __future__ import annotations

import json

import msgspec
import pytest

from engine.model_store import resolve_model, tokenizer_path
from engine.tokenizer import Tokenizer, TokenizerError
from tests.engine.test_tokenizer import CONVERSATIONS, CORPUS
from transfer.messages import TokenizerSpec, decode_message, encode_message, tokenizer_digest

# Renders BOS itself, and a marker after the last turn, so a rebuilt tokenizer that lost its
# template or its named special tokens renders something else.
_DIR_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}|{{ eos_token }}]{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<<{{ pad_token }}>>{% endif %}"
)


@pytest.fixture(scope="module")
def gguf_tok() -> Tokenizer:
    """The tokenizer the ``tiny`` (and ``null``) model uses: the default model's GGUF."""
    path = tokenizer_path(resolve_model("tiny"))
    assert path == tokenizer_path(resolve_model("default"))
    return Tokenizer.load(path)


@pytest.fixture(scope="module")
def dir_tok(tmp_path_factory: pytest.TempPathFactory, gguf_tok: Tokenizer) -> Tokenizer:
    """An HF directory: the same vocabulary, but BOS added, a generation-config stop id and a
    template of its own, so every ``__init__`` argument differs from the GGUF tokenizer's."""
    directory = tmp_path_factory.mktemp("hf-tokenizer")
    (directory / "tokenizer.json").write_text(gguf_tok.to_spec().backend_json, encoding="utf-8")
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (directory / "chat_template.jinja").write_text(_DIR_TEMPLATE, encoding="utf-8")
    (directory / "generation_config.json").write_text('{"eos_token_id": [7]}', encoding="utf-8")
    tok = Tokenizer.from_dir(directory)
    assert tok.add_bos_token and 7 in tok.stop_token_ids  # what the fixture is for
    return tok


@pytest.fixture(params=["gguf", "hf_dir"])
def tok(request: pytest.FixtureRequest, gguf_tok: Tokenizer, dir_tok: Tokenizer) -> Tokenizer:
    return gguf_tok if request.param == "gguf" else dir_tok


def _over_the_wire(spec: TokenizerSpec) -> TokenizerSpec:
    return decode_message(encode_message(spec), TokenizerSpec)


def test_the_rebuilt_tokenizer_encodes_renders_and_stops_as_the_original(tok: Tokenizer) -> None:
    rebuilt = Tokenizer.from_spec(_over_the_wire(tok.to_spec()))
    assert rebuilt.vocab_size == tok.vocab_size
    assert (rebuilt.bos_token_id, rebuilt.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert rebuilt.add_bos_token == tok.add_bos_token
    assert rebuilt.stop_token_ids == tok.stop_token_ids
    assert rebuilt.max_bytes_per_token == tok.max_bytes_per_token is not None
    assert rebuilt.chat_template == tok.chat_template
    texts = [*CORPUS.values(), "a\x01b\x02c <|im_start|><|im_end|><|endoftext|>"]
    for text in texts:
        token_ids = tok.encode(text)
        assert rebuilt.encode(text) == token_ids, text
        assert rebuilt.encode(text, add_special_tokens=True) == tok.encode(
            text, add_special_tokens=True
        )
        assert rebuilt.decode(token_ids) == tok.decode(token_ids)
        assert rebuilt.decode(token_ids, skip_special_tokens=False) == tok.decode(
            token_ids, skip_special_tokens=False
        )
        assert rebuilt.min_num_tokens([text]) == tok.min_num_tokens([text])
    im_start = tok.token_to_id("<|im_start|>")
    assert im_start is not None and rebuilt.encode(CORPUS["special_tokens"]).count(im_start) == 2
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (True, False):
            rendered = tok.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt
            )
            assert (
                rebuilt.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
                == rendered
            )
        assert rebuilt.encode_chat(messages) == tok.encode_chat(messages)


def test_a_rebuilt_tokenizer_describes_itself_with_the_same_spec_and_digest(
    tok: Tokenizer,
) -> None:
    spec = tok.to_spec()
    again = Tokenizer.from_spec(_over_the_wire(spec)).to_spec()
    assert again == spec
    assert tokenizer_digest(encode_message(again)) == tokenizer_digest(encode_message(spec))


def test_the_digest_tells_tokenizers_apart(gguf_tok: Tokenizer, dir_tok: Tokenizer) -> None:
    gguf_spec, dir_spec = gguf_tok.to_spec(), dir_tok.to_spec()
    assert gguf_spec.backend_json == dir_spec.backend_json  # the same vocabulary ...
    assert dir_spec.add_bos_token and dir_spec.extra_stop_token_ids == [7]
    # ... so only the other fields tell them apart, and the digest sees them.
    digests = {tokenizer_digest(encode_message(spec)) for spec in (gguf_spec, dir_spec)}
    assert len(digests) == 2
    assert all(len(digest) == 64 and int(digest, 16) >= 0 for digest in digests)
    no_template = msgspec.structs.replace(gguf_spec, chat_template=None)
    assert tokenizer_digest(encode_message(no_template)) not in digests


def test_a_spec_whose_backend_cannot_load_is_a_tokenizer_error(gguf_tok: Tokenizer) -> None:
    broken = msgspec.structs.replace(gguf_tok.to_spec(), backend_json='{"model": 3}')
    with pytest.raises(TokenizerError, match="backend cannot load"):
        Tokenizer.from_spec(broken)


def test_the_spec_is_the_gguf_tokenizers_own_arguments(gguf_tok: Tokenizer) -> None:
    spec = gguf_tok.to_spec()
    assert (spec.bos_token_id, spec.eos_token_id, spec.add_bos_token) == (1, 2, False)
    assert spec.special_token_ids == {
        "bos_token": 1,
        "eos_token": 2,
        "unk_token": 0,
        "pad_token": 2,
    }
    assert spec.extra_stop_token_ids == []
    assert spec.chat_template is not None and "<|im_start|>" in spec.chat_template
    assert json.loads(spec.backend_json)["model"]["type"] == "BPE"
