"""The names tenants use for models: each served model's id, and the admin's aliases (e.g.
``chat-small`` → ``SmolLM2-135M-Instruct``), which move from one model to another without clients
changing anything. Torch-free.

A name is resolved in order: a model's id (a model a worker of the pool has announced, live or
not), then an alias; else 404 ``model_not_found`` naming the models the tenant may use. An alias
may not be a model's id (409), and may point at a model no worker serves yet (its requests get
503 until one does, as a model whose pool has no live worker). Which models a tenant may use:
``allowed_models`` empty means every one; else the list names ids or aliases, and a request is
allowed when it names one of them, or its model is one of them or one an alias there points at
(a tenant allowed ``chat-small`` follows the alias when it moves). Refused: 403
``model_not_allowed`` naming the model.

The aliases live in the store; the catalog holds them in memory, replaced whole on every
change (``set_aliases``): an admin change takes effect on the replica that made it before it
answers, and on the others when their admin stream brings it (``gateway.replica_sync``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from gateway.errors import Conflict, ModelNotAllowed, ModelNotFound

__all__ = ["ModelCatalog", "ModelName"]


@dataclass(frozen=True, slots=True)
class ModelName:
    """A name a tenant may use: ``name`` (an id or an alias) for the model ``model_id``."""

    name: str
    model_id: str

    @property
    def is_alias(self) -> bool:
        return self.name != self.model_id


class ModelCatalog:
    """``known_models()``: the ids of the models whose pools exist (the registry's)."""

    def __init__(self, known_models: Callable[[], Collection[str]]) -> None:
        self.known_models = known_models
        self._aliases: dict[str, str] = {}

    def set_aliases(self, aliases: Mapping[str, str]) -> None:
        self._aliases = dict(aliases)

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def check_alias(self, alias: str) -> None:
        """Conflict when ``alias`` is already a model's id."""
        if alias in self.known_models():
            raise Conflict(f"{alias!r} is a model's id; an alias needs another name")

    def resolve(self, name: str, allowed: Sequence[str]) -> ModelName:
        """The model ``name`` means for a tenant allowed ``allowed`` (module docstring)."""
        known = self.known_models()
        if name in known:
            resolved = ModelName(name, name)
        elif name in self._aliases:
            resolved = ModelName(name, self._aliases[name])
        else:
            names = ", ".join(n.name for n in self.names(allowed)) or "none"
            raise ModelNotFound(
                f"the model {name!r} does not exist; this key may use: {names}", param="model"
            )
        if not self.is_allowed(resolved, allowed):
            raise ModelNotAllowed(
                f"this key may not use the model {name!r} (it may use: "
                f"{', '.join(n.name for n in self.names(allowed)) or 'none'})",
                param="model",
            )
        return resolved

    def names(self, allowed: Sequence[str]) -> list[ModelName]:
        """Every name the tenant may use, models first, then aliases, each sorted (an alias
        that a model's id took since, which ``resolve`` no longer reaches, is left out)."""
        known = self.known_models()
        models = [ModelName(m, m) for m in sorted(known)]
        aliases = [ModelName(a, m) for a, m in sorted(self._aliases.items()) if a not in known]
        return [n for n in [*models, *aliases] if self.is_allowed(n, allowed)]

    def is_allowed(self, name: ModelName, allowed: Sequence[str]) -> bool:
        """Whether a tenant allowed ``allowed`` may use ``name``: it is named there, or its
        model is, or an alias named there now points at its model (a name there that is a
        model's id means that model, whatever alias has the same name)."""
        if not allowed:
            return True
        known = self.known_models()
        models = {a if a in known else self._aliases.get(a, a) for a in allowed}
        return name.name in allowed or name.model_id in models
