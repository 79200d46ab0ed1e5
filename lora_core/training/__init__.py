"""Training: the exact-resume loop (``loop``: ``train``, ``evaluate``, ``TrainConfig``), its checkpoint
(``state``), data (``data``: packed blocks, prompt/response masking), the chunked causal-LM loss
(``losses``), what a run shows (``progress``) and, on a CPU, malloc keeping what a step frees
(``host_memory``). Users of the layers, never used by them."""
