"""The decode worker process: ``service.DecodeService``, and ``service.ColocatedService`` for the
colocated mode (started by ``fairgate decode-worker [--colocated]``)."""
