"""Batched multi-adapter LoRA: the slot table (an allocator of device slots), batched layers, CPU and Triton kernels."""
