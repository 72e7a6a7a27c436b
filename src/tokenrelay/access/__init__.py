"""Who may call a model, how much, and what they used: gateway keys (``keys``), limits per key
(``limits``) and the usage ledger (``usage``). The request guard that reads a key is
``api/auth.py``; the one place a request to a model is admitted and accounted for is the
gateway (``relay/gateway.py``)."""
