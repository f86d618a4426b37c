// Instantiation: dkv, head dim 96, bf16. Generated; one (op, dtype, head dim) per file so that
// builds run in parallel and a reduced set can be selected (DILATED_SPARSE_CUDA_INSTANTIATIONS).
#include "../kernels.cuh"

namespace dilated_sparse::cuda {
template void launch_dkv<__nv_bfloat16, 96>(const Params&, int64_t, cudaStream_t);
static const Registrar kReg(kOpDkv, 1, 96, &launch_dkv<__nv_bfloat16, 96>);
}  // namespace dilated_sparse::cuda
