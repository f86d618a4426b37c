// Registers the CPU kernels of the dilated_sparse ops (schemas: csrc/ops.cpp).
#include "attention_cpu.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(dilated_sparse, CPU, m) {
  m.impl("block_sparse_attn_fwd", &dilated_sparse::cpu::block_sparse_attn_fwd_cpu);
  m.impl("block_sparse_attn_bwd", &dilated_sparse::cpu::block_sparse_attn_bwd_cpu);
  m.impl("block_sparse_attn_weights", &dilated_sparse::cpu::block_sparse_attn_weights_cpu);
}
