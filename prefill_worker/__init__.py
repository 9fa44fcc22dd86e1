"""The prefill worker process: ``service.PrefillService``, run by ``fairgate prefill-worker``."""
