"""Shapes the tests count by hand."""

from adallava_kernels import ModelShape

# 4 layers, 6 heads over 2 KV heads (GQA), 520 neurons in 6 groups of 87, 87, 87, 87, 86, 86.
GQA6 = ModelShape(hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2, head_dim=32,
                  intermediate_size=520, vocab_size=1000)
