"""Admission: whether a generation request the gatekeeper let through is served, and as what.

Decide, then do: admission answers with a plain value, ``Admitted`` (the class, weight and
priority the request is served with, its prompt as token ids, its token limit, and the quota it
reserved), and the route acts on it: it queues a ``Generation`` and answers. A refusal is the
``ClientError`` raised, with its status and OpenAI's code. In the order the route takes them,
the cheap refusals first:

    check_servable(body)          503 no_worker (none for a while), 404 model_not_found
    slo_class(tenant, header, …)  400 an unknown class, 403 slo_class_not_allowed
    admit(tenant, body, class)    429 queue_full (the tenant's backlog, before any tokenizing);
                                  400 a prompt that does not encode, makes no token or does not
                                  fit the context with max_tokens (a long prompt tokenized off
                                  the loop, ``gateway.prompts``); 429 / 503 quotas (reserved,
                                  ``gateway.quotas``): the only step that holds anything

Three steps rather than one so that the route can record what each established: the request's
span is named after its model once that is one we serve, and a refusal is counted in the class
it asked for once that is known. ``Admitted.quota`` must be settled exactly once, when the
request ends (``QuotaManager.settle``). Torch-free.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.config import Config
from gateway.dispatch import Dispatcher
from gateway.errors import ClassNotAllowed, ClientError, ContextLengthExceeded, ModelNotFound
from gateway.gatekeeper import class_rank
from gateway.openai_requests import GenerationRequest
from gateway.prompts import PromptEncoder, is_long_prompt
from gateway.quotas import Admission, QuotaManager
from gateway.tenants import Tenant
from gateway.workers import WorkerRegistry

__all__ = ["DEMOTED_WEIGHT_FACTOR", "AdmissionControl", "Admitted", "PromptWait"]

DEMOTED_WEIGHT_FACTOR = 0.01

# How the route awaits a long prompt's tokenizing (its tenant's turn, a thread): until its
# client leaves, say.
PromptWait = Callable[[Awaitable[list[int]]], Awaitable[list[int]]]


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request let in, and what it is served as. Demoted (over a quota under the ``demote``
    policy): the lowest class, and its tenant's weight times ``DEMOTED_WEIGHT_FACTOR``."""

    slo_class: str
    rank: int  # the class's
    tpot_target_s: float | None  # the class's
    weight: float
    prompt_token_ids: list[int]
    max_tokens: int  # the request's, or what the context leaves after the prompt
    cache_salt: bytes  # the tenant's prefix-cache scope
    quota: Admission  # what it reserved: settle it exactly once, when the request ends

    @property
    def is_demoted(self) -> bool:
        return self.quota.demoted


@dataclass(frozen=True, slots=True)
class AdmissionControl:
    """The admission of generation requests (module docstring), over the parts it reads."""

    config: Config  # the SLO classes
    registry: WorkerRegistry  # the served model and its context length
    dispatcher: Dispatcher  # whether any worker can serve; the tenants' queues
    prompts: PromptEncoder
    quotas: QuotaManager

    def served_models(self) -> list[str]:
        model_id = self.registry.model_id
        return [] if model_id is None else [model_id]

    def check_servable(self, body: GenerationRequest) -> None:
        """``NoWorkerAvailable`` when no worker could serve for a while; ``ModelNotFound`` for a
        model not served here."""
        self.dispatcher.check_can_serve()
        if body.model not in self.served_models():
            raise ModelNotFound(
                f"model {body.model!r} is not served here; GET /v1/models lists the served models",
                param="model",
            )

    def slo_class(self, tenant: Tenant, header: str | None, body: GenerationRequest) -> str:
        """The class the request asks for (the header, else the body, else the tenant's
        default), if it is configured and the tenant may use it."""
        name = header or body.slo_class or tenant.default_class
        if self.config.slo_class(name) is None:
            known = [c.name for c in self.config.slo_classes]
            raise ClientError(f"unknown SLO class {name!r}; known: {known}", param="fairgate_class")
        if name not in tenant.allowed_classes:
            raise ClassNotAllowed(
                f"this tenant may not use SLO class {name!r} (allowed: {tenant.allowed_classes})",
                param="fairgate_class",
            )
        return name

    async def admit(
        self, tenant: Tenant, body: GenerationRequest, slo_class: str, *, wait_long: PromptWait
    ) -> Admitted:
        """The rest of admission (module docstring), the quota reserved last."""
        # Cheap refusals first: a tenant whose queue is full or standing is told so before its
        # prompt costs any tokenizing.
        self.dispatcher.check_backlog(tenant.tenant_id, class_rank(self.config, slo_class))
        max_model_len = self.registry.max_model_len
        encoding = self.prompts.encode(tenant.tenant_id, body, max_model_len)
        prompt_token_ids = await (wait_long(encoding) if is_long_prompt(body) else encoding)
        num_prompt_tokens = len(prompt_token_ids)
        if num_prompt_tokens >= max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {num_prompt_tokens} tokens; this model's context length is "
                f"{max_model_len}",
                param="messages" if body.kind == "chat" else "prompt",
            )
        max_tokens = body.max_tokens or max_model_len - num_prompt_tokens
        if num_prompt_tokens + max_tokens > max_model_len:
            raise ContextLengthExceeded(
                f"this model's context length is {max_model_len} tokens; the prompt has "
                f"{num_prompt_tokens} and max_tokens asks for {max_tokens} more",
                param="max_tokens",
            )
        quota = await self.quotas.admit(tenant, estimated_tokens=num_prompt_tokens + max_tokens)
        weight = tenant.weight
        if quota.demoted:
            slo_class = self.config.lowest_class.name
            weight *= DEMOTED_WEIGHT_FACTOR
        served_in = self.config.slo_class(slo_class) or self.config.lowest_class
        return Admitted(
            slo_class=slo_class,
            rank=class_rank(self.config, slo_class),
            tpot_target_s=served_in.tpot_target_s,
            weight=weight,
            prompt_token_ids=prompt_token_ids,
            max_tokens=max_tokens,
            cache_salt=_cache_salt(tenant),
            quota=quota,
        )


def _cache_salt(tenant: Tenant) -> bytes:
    """Scopes the workers' prefix cache to the tenant (chosen here, never by a client)."""
    return hashlib.sha256(b"fairgate-prefix-cache\0" + tenant.tenant_id.encode()).digest()[:16]
