"""LoRA itself, from the math up::

    functional   the reference formulas (the CPU path; what every fast path is tested against), merged_weight
    bases        the frozen W₀ behind one protocol: DenseBase, NF4Base (+ nf4_linear, its autograd)
    fused        one autograd Function per layer (the CUDA path)
    layer        LoRALinear: holds a base and its adapter; qlora: QLoRALinear (an NF4 base)
    config       LoraConfig;  surgery: apply / merge / unmerge / unload;  adapters: PEFT-layout files

Which path a call takes is decided in ``lora_core.dispatch``.
"""
