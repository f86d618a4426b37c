// Instantiation: dkv, head dim 32, fp16. Generated; one (op, dtype, head dim) per file so that
// builds run in parallel and a reduced set can be selected (DILATED_SPARSE_CUDA_INSTANTIATIONS).
#include "../kernels.cuh"

namespace dilated_sparse::cuda {
template void launch_dkv<__half, 32>(const Params&, int64_t, cudaStream_t);
static const Registrar kReg(kOpDkv, 0, 32, &launch_dkv<__half, 32>);
}  // namespace dilated_sparse::cuda
