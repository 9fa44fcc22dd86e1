"""Model names (``gateway.model_catalog``): ids, aliases, and what a tenant may use."""

from __future__ import annotations

import pytest

from gateway.errors import Conflict, ModelNotAllowed, ModelNotFound
from gateway.model_catalog import ModelCatalog, ModelName

MODELS = {"SmolLM2-135M-Instruct", "tiny-random-llama"}


def _catalog() -> ModelCatalog:
    catalog = ModelCatalog(lambda: MODELS)
    catalog.set_aliases({"chat-small": "tiny-random-llama"})
    return catalog


def test_an_id_and_an_alias_resolve_to_their_model() -> None:
    catalog = _catalog()
    assert catalog.resolve("SmolLM2-135M-Instruct", []) == ModelName(
        "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"
    )
    resolved = catalog.resolve("chat-small", [])
    assert resolved.model_id == "tiny-random-llama" and resolved.is_alias


def test_a_moved_alias_resolves_to_its_new_model_at_once() -> None:
    catalog = _catalog()
    catalog.set_aliases({"chat-small": "SmolLM2-135M-Instruct"})
    assert catalog.resolve("chat-small", []).model_id == "SmolLM2-135M-Instruct"


def test_an_unknown_model_is_a_404_naming_what_the_tenant_may_use() -> None:
    with pytest.raises(ModelNotFound) as raised:
        _catalog().resolve("gpt-4", ["chat-small"])
    assert raised.value.status == 404 and raised.value.param == "model"
    assert "may use: tiny-random-llama, chat-small" in str(raised.value)


def test_a_model_the_tenant_may_not_use_is_a_403_naming_it() -> None:
    with pytest.raises(ModelNotAllowed) as raised:
        _catalog().resolve("SmolLM2-135M-Instruct", ["chat-small"])
    assert raised.value.status == 403 and raised.value.code == "model_not_allowed"
    assert "'SmolLM2-135M-Instruct'" in str(raised.value)


def test_a_tenant_allowed_an_alias_follows_it_and_may_use_its_model_by_id() -> None:
    catalog = _catalog()
    assert catalog.resolve("tiny-random-llama", ["chat-small"]).model_id == "tiny-random-llama"
    catalog.set_aliases({"chat-small": "SmolLM2-135M-Instruct"})
    assert catalog.resolve("chat-small", ["chat-small"]).model_id == "SmolLM2-135M-Instruct"


def test_names_lists_models_then_aliases_the_tenant_may_use() -> None:
    catalog = _catalog()
    assert [n.name for n in catalog.names([])] == [
        "SmolLM2-135M-Instruct",
        "tiny-random-llama",
        "chat-small",
    ]
    assert [n.name for n in catalog.names(["tiny-random-llama"])] == [
        "tiny-random-llama",
        "chat-small",
    ]


def test_an_alias_may_not_take_a_models_id() -> None:
    with pytest.raises(Conflict):
        _catalog().check_alias("tiny-random-llama")
    _catalog().check_alias("chat-large")  # a free name


def test_a_model_that_takes_an_aliass_name_later_wins_and_widens_nothing() -> None:
    """An alias made before a worker announced a model of that id (a restart, another replica):
    the model's id wins, the names are listed once, and a tenant allowed that model by its id
    is not given the alias's target too."""
    known = {"tiny-random-llama"}
    catalog = ModelCatalog(lambda: known)
    catalog.set_aliases({"big": "tiny-random-llama"})
    known.add("big")  # a model called "big" comes up
    assert catalog.resolve("big", []) == ModelName("big", "big")
    assert [n.name for n in catalog.names([])] == ["big", "tiny-random-llama"]
    with pytest.raises(ModelNotAllowed):
        catalog.resolve("tiny-random-llama", ["big"])
