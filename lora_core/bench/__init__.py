"""Benchmark harnesses, each a ``lora-core bench SUITE`` (``common`` holds what they share)::

    kernels   the NF4 kernels against cuBLAS bf16, the reference and bitsandbytes   (GPU)
    layers    one adapted layer: fused LoRA / QLoRA / DoRA against the frozen layer and PEFT   (GPU)
    e2e       end-to-end fine-tuning: lora_core against PEFT (+ bitsandbytes), tokens/s and peak memory
              (e2e_report: its targets, table and plot)
    mixed     mixed-adapter batches: one adapter per row vs one adapter for all, and PEFT   (GPU or CPU)

Each writes its JSON and plot under ``benchmarks/results/`` (benchmarks/README.md says how to read them).
"""
