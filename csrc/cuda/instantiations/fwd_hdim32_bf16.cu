// Instantiation: fwd, head dim 32, bf16. Generated; one (op, dtype, head dim) per file so that
// builds run in parallel and a reduced set can be selected (DILATED_SPARSE_CUDA_INSTANTIATIONS).
#include "../kernels.cuh"

namespace dilated_sparse::cuda {
template void launch_fwd<__nv_bfloat16, 32>(const Params&, int64_t, cudaStream_t);
static const Registrar kReg(kOpFwd, 1, 32, &launch_fwd<__nv_bfloat16, 32>);
}  // namespace dilated_sparse::cuda
