"""Everything that crosses a process boundary.

Torch-free (the gateway imports these): ``messages`` (every wire message), ``errors`` (the error
hierarchy and its wire form), ``http`` (server-side conventions), ``client`` (the caller's side,
and one request driven through a prefill and a decode worker).

The KV data plane (torch): ``kv_layout`` (cache layout, handshake checks, transfer plans),
``kv_pair`` (a pair's process group and store keys), ``kv_sender`` (prefill side),
``kv_receiver`` (decode side), ``failpoints`` (fault injection for tests).
"""
