// Instantiation: fwd, head dim 32, fp16. Generated; one (op, dtype, head dim) per file so that
// builds run in parallel and a reduced set can be selected (DILATED_SPARSE_CUDA_INSTANTIATIONS).
#include "../kernels.cuh"

namespace dilated_sparse::cuda {
template void launch_fwd<__half, 32>(const Params&, int64_t, cudaStream_t);
static const Registrar kReg(kOpFwd, 0, 32, &launch_fwd<__half, 32>);
}  // namespace dilated_sparse::cuda
