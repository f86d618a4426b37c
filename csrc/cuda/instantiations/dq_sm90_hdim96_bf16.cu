// Experiment (branch d96-narrow): D96 in the D128 tiles, products over 96 columns.
#include "../kernels_sm90.cuh"

namespace dilated_sparse::cuda {
DS_REGISTER_DQ_SM90(__nv_bfloat16, 1, 128, 4, 2, 64, kSchedPingPong | kThreeQuarterScoreK | kHalfOut, 0)
DS_REGISTER_DQ_DS_SM90_AS(__nv_bfloat16, 1, 128, 96, 5)
}  // namespace dilated_sparse::cuda
