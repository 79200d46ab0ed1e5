"""Training: the exact-resume loop (``loop``: ``train``, ``evaluate``, ``TrainConfig``), its checkpoint
(``state``), data (``data``: packed blocks, prompt/response masking) and the chunked causal-LM loss
(``losses``). Users of the layers, never used by them."""
