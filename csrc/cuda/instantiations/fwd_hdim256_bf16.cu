// Instantiation: fwd, head dim 256, bf16. Generated; one (op, dtype, head dim) per file so that
// builds run in parallel and a reduced set can be selected (DILATED_SPARSE_CUDA_INSTANTIATIONS).
#include "../kernels.cuh"

namespace dilated_sparse::cuda {
template void launch_fwd<__nv_bfloat16, 256>(const Params&, int64_t, cudaStream_t);
static const Registrar kReg(kOpFwd, 1, 256, &launch_fwd<__nv_bfloat16, 256>);
}  // namespace dilated_sparse::cuda
